"""The 8-GPU and multinode launch scripts in examples/ build valid configs with the layouts they promise.

A stand-in `torchrun` on PATH records its arguments instead of launching; the flags after
pretrain_gpt.py then go through the real parser with WORLD_SIZE = nodes x processes per node.
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_sr.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def _launch_args(script: str, env_extra: dict, tmp_path: Path) -> list[str]:
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    record = tmp_path / "args"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {record}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", DATA="data/x_text_document",
               TOKENIZER="data/tok.model", **env_extra)
    subprocess.run(["bash", str(REPO / "examples" / script)], env=env, check=True, timeout=60)
    return record.read_text().split("\0")[:-1]


@pytest.mark.parametrize("script, env, world, layout", [
    ("pretrain_gpt_1.3b_8gpu.sh", {}, 8, (2, 2, 2)),
    ("pretrain_gpt_6.7b_multinode.sh", {"NNODES": "4", "MASTER_ADDR": "node0"}, 32, (8, 2, 2)),
])
def test_example_launch_scripts(script, env, world, layout, tmp_path, monkeypatch):
    args = _launch_args(script, env, tmp_path)
    launcher, flags = args[:args.index("pretrain_gpt.py")], args[args.index("pretrain_gpt.py") + 1:]
    nodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    assert nodes * int(launcher[launcher.index("--nproc-per-node") + 1]) == world
    monkeypatch.chdir(REPO)  # the scripts name their YAML relative to the repository
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = parse_config(flags)
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size) == layout
    assert p.use_distributed_optimizer and p.sequence_parallel
    assert cfg.optimizer.precision == "bf16-sr"
