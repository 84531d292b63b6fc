"""Config: Megatron flag names, YAML files mirroring them, CLI precedence, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sr.config import ConfigError, build_parser, parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]

MEGATRON_FLAGS = ("--num-layers --hidden-size --num-attention-heads --ffn-hidden-size --seq-length "
                  "--max-position-embeddings --micro-batch-size --global-batch-size --train-iters --lr --min-lr "
                  "--lr-decay-style --lr-warmup-iters --lr-decay-iters --weight-decay --clip-grad --adam-beta1 "
                  "--adam-beta2 --adam-eps --init-method-std --hidden-dropout --attention-dropout --seed --data-path "
                  "--split --tokenizer-model --save --load --save-interval --eval-interval --eval-iters "
                  "--log-interval --tensorboard-dir --recompute-activations --precision --optimizer-state-dtype "
                  "--grad-dtype --config --position-embedding-type --swiglu").split()


def test_every_megatron_flag_is_accepted():
    known = set(build_parser()._option_string_actions)
    assert not [f for f in MEGATRON_FLAGS if f not in known]


def test_yaml_keys_mirror_flags_and_cli_wins(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("num-layers: 3\nhidden_size: 96\nnum-attention-heads: 4\nlr: 3.0e-4\n"
                        "mock-data: true\nprecision: bf16-mp\ndata-path: [a, b]\n")
    cfg = parse_config(["--config", str(cfg_file), "--hidden-size", "128", "--tokenizer-model", "t.model"])
    assert cfg.model.num_layers == 3
    assert cfg.model.hidden_size == 128  # command line overrides the file
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.precision == "bf16-mp"
    assert cfg.data.data_path == ["a", "b"]
    assert cfg.model.ffn_hidden_size == 4 * 128 and cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.optimizer.lr_decay_iters == cfg.training.train_iters


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size", "100", "--num-attention-heads", "3"],
     "--hidden-size 100 is not divisible by --num-attention-heads 3"),
    (["--micro-batch-size", "4", "--global-batch-size", "10"],
     "--global-batch-size 10 is not divisible by --micro-batch-size 4 x data-parallel size 1"),
    (["--seq-length", "2048", "--max-position-embeddings", "1024"],
     "--seq-length 2048 is longer than --max-position-embeddings 1024"),
    (["--precision", "fp16"], "--precision"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_inconsistent_settings_are_named(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(TINY + argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_unknown_key_and_bad_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num-layers: 2\nnum-layer: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'num-layer'"):
        parse_config(["--config", str(bad), "--mock-data"])
    bad.write_text("num-layers: two\n")
    with pytest.raises(ConfigError, match="num-layers expects int"):
        parse_config(["--config", str(bad), "--mock-data"])


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden-sise: 64\n")
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown key 'hidden-sise'" in lines[0], proc.stderr


@pytest.mark.parametrize("name", ["125m", "350m", "1.3b", "2.7b", "6.7b", "tiny_quickstart"])
def test_example_configs_parse(name, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1" if name == "tiny_quickstart" else "8")  # the sizes they are meant for
    cfg = parse_config(["--config", str(REPO / "examples" / f"gpt_{name}.yaml"), "--mock-data"])
    assert cfg.optimizer.precision == "bf16-sr"
    if name != "tiny_quickstart":
        script = (REPO / "examples" / f"gpt_{name}.sh").read_text()
        assert f"examples/gpt_{name}.yaml" in script and "torchrun" in script


def test_megatron_defaults_and_no_abbreviations():
    """Silent differences from Megatron-LM (issue 13): the decay style defaults to linear, SwiGLU's FFN rounds
    down to a multiple of 64, and a flag is never taken as an abbreviation of a longer one."""
    base = "--mock-data --num-layers 2 --hidden-size 4096 --num-attention-heads 32 --seq-length 16".split()
    cfg = parse_config(base + ["--swiglu"])
    assert cfg.optimizer.lr_decay_style == "linear" and cfg.model.ffn_hidden_size == 10880
    # --optimizer adam is Megatron's AdamW here too, not an abbreviation of --optimizer-state-dtype
    cfg = parse_config(base + ["--optimizer", "adam"])
    assert cfg.optimizer.optimizer == "adam" and cfg.optimizer.optimizer_state_dtype == "fp32"
    with pytest.raises(ConfigError, match="^--optimizer sgd: not supported"):
        parse_config(base + ["--optimizer", "sgd"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --optimizer-state"):
        parse_config(base + ["--optimizer-state", "bf16"])  # a prefix of a flag is not that flag
