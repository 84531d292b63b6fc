"""kill -9 at random moments of a run that checkpoints every iteration, then resume: `latest` always loads,
no temporary file survives the next start, and the finished run equals an uninterrupted one bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ITERS = 24
KILLS = 4
ARGS = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        f"--micro-batch-size 2 --train-iters {ITERS} --log-interval 1 --eval-interval 0 --eval-iters 1 "
        "--lr 3e-3 --device cpu --save-interval 1 --precision bf16-sr").split()


def _start(save: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "pretrain_gpt.py", *ARGS, "--save", str(save), "--load", str(save)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _final_tensors(save: Path) -> dict:
    payload = torch.load(save / f"iter_{ITERS:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    opt = payload["optimizer"]
    return {**payload["model"], **{f"m{i}": t for i, t in enumerate(opt["exp_avg"])},
            **{f"v{i}": t for i, t in enumerate(opt["exp_avg_sq"])}}


@pytest.mark.slow
def test_random_kills_during_training_and_saving_then_resume(tmp_path):
    rng = random.Random(7)
    killed_save, straight = tmp_path / "killed", tmp_path / "straight"
    reference = _start(straight)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-2000:]
    kills = 0
    for attempt in range(KILLS + 1):  # KILLS killed runs, each resumed; the last one runs to the end
        proc = _start(killed_save)
        target = rng.randint(1, 4) if attempt < KILLS else ITERS + 1  # progress lines before the kill
        seen, output = 0, []
        for line in proc.stdout:
            output.append(line)
            if " iteration " in line and "consumed samples" in line:
                seen += 1
                if seen == target:
                    time.sleep(rng.uniform(0.0, 0.03))  # lands in training, or in the iteration's save
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
        rc = proc.wait(timeout=300)
        text = "".join(output)
        assert "error" not in text.lower() or rc == -signal.SIGKILL, text[-2000:]
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, text[-2000:]
    assert kills == KILLS and rc == 0
    leftovers = [p.name for p in killed_save.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    a, b = _final_tensors(straight), _final_tensors(killed_save)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
