"""Megatron's checkpoint switches: --no-load-optim, --no-load-rng, --finetune, --use-checkpoint-args,
--exit-on-missing-checkpoint, --ckpt-format and --exit-signal-handler, each with Megatron's meaning."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_sr.config import ConfigError, parse_config
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 4 --log-interval 1000 --eval-interval 0 --eval-iters 1 "
        "--lr 3e-3 --hidden-dropout 0.1 --attention-dropout 0.1 --device cpu").split()


class _AtStart(Observer):
    """What the trainer holds once the checkpoint is loaded, before the first iteration."""

    def log(self, message: str) -> None:
        self.lines = [*getattr(self, "lines", []), message]

    def on_train_start(self, trainer) -> None:
        opt = trainer.optimizer
        self.step_count = opt.step_count
        self.moments = torch.cat([m.float().view(-1) for m in opt.exp_avg]).clone()
        self.weights = torch.cat([p.detach().float().view(-1) for p in trainer.model_chunks[0].parameters()]).clone()
        self.rng = torch.get_rng_state()
        self.hidden = trainer.cfg.model.hidden_size


def _run(*extra: str) -> tuple[object, _AtStart]:
    observer = _AtStart()
    return pretrain(parse_config(TINY + list(extra)), observer), observer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "run"
    _run("--train-iters", "3", "--save", str(root))
    return root


def test_plain_resume_restores_optimizer_and_rng(saved, tmp_path):
    result, at = _run("--train-iters", "5", "--load", str(saved), "--save", str(tmp_path / "b"))
    assert at.step_count == 3 and at.moments.abs().sum() > 0 and result.state.iteration == 5
    _, fresh = _run("--train-iters", "1")
    assert not torch.equal(at.rng, fresh.rng)


def test_no_load_optim_and_no_load_rng(saved, tmp_path):
    _, resumed = _run("--train-iters", "5", "--load", str(saved), "--save", str(tmp_path / "a"))
    result, at = _run("--train-iters", "5", "--load", str(saved), "--save", str(tmp_path / "b"), "--no-load-optim")
    assert at.step_count == 0 and not at.moments.any()  # fresh Adam: the moments were not loaded
    assert torch.equal(at.weights, resumed.weights) and torch.equal(at.rng, resumed.rng)
    assert result.state.iteration == 5  # the iteration still comes from the checkpoint
    _, no_rng = _run("--train-iters", "5", "--load", str(saved), "--save", str(tmp_path / "c"), "--no-load-rng")
    _, fresh = _run("--train-iters", "1")
    assert no_rng.step_count == 3 and torch.equal(no_rng.rng, fresh.rng) and not torch.equal(no_rng.rng, resumed.rng)


def test_finetune_takes_the_weights_only(saved, tmp_path):
    _, resumed = _run("--train-iters", "5", "--load", str(saved), "--save", str(tmp_path / "a"))
    result, at = _run("--train-iters", "2", "--load", str(saved), "--save", str(tmp_path / "ft"), "--finetune")
    assert torch.equal(at.weights, resumed.weights) and at.step_count == 0 and not at.moments.any()
    assert result.state.iteration == 2 and len(result.train_losses) == 2
    assert result.state.consumed_train_samples == 2 * 4
    assert (tmp_path / "ft" / "latest_checkpointed_iteration.txt").read_text() == "2"
    # finetuning into the directory it loads from would move its latest back: refused without the override
    with pytest.raises(ValueError, match="holds iteration 3, later than iteration 0"):
        _run("--train-iters", "2", "--load", str(saved), "--save", str(saved), "--finetune")


def test_use_checkpoint_args_takes_the_saved_model_shape(saved, tmp_path):
    result, at = _run("--train-iters", "4", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--load", str(saved), "--save", str(tmp_path / "b"), "--use-checkpoint-args")
    assert at.hidden == 32 and result.state.iteration == 4
    assert any("--use-checkpoint-args" in line and "--hidden-size 64 -> 32" in line for line in at.lines)
    with pytest.raises(ValueError, match="the checkpoint's model differs"):  # without it: refused, as before
        _run("--train-iters", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--load", str(saved),
             "--save", str(tmp_path / "c"))


def test_exit_on_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint there .--exit-on-missing-checkpoint"):
        _run("--train-iters", "1", "--load", str(tmp_path / "none"), "--exit-on-missing-checkpoint")
    result, _ = _run("--train-iters", "1", "--load", str(tmp_path / "none"))  # Megatron's default: from scratch
    assert result.state.iteration == 1


def test_checkpoint_flag_errors():
    with pytest.raises(ConfigError, match="^--ckpt-format torch_dist: not supported"):
        parse_config(TINY + ["--ckpt-format", "torch_dist"])
    assert parse_config(TINY + ["--ckpt-format", "torch"]).training.ckpt_format == "torch"
    for flag in ("--no-load-optim", "--finetune", "--use-checkpoint-args"):
        with pytest.raises(ConfigError, match=f"^{flag} needs --load"):
            parse_config(TINY + [flag])


def test_sigterm_without_exit_signal_handler_ends_the_process(tmp_path):
    """Megatron's default: SIGTERM is not caught (with --exit-signal-handler it saves: tests/test_training.py)."""
    cmd = [sys.executable, "pretrain_gpt.py", *TINY, "--train-iters", "100000", "--log-interval", "1",
           "--save", str(tmp_path / "ck")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not re.search(r"iteration\s+2/", proc.stdout.readline()):
            pass
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert not (tmp_path / "ck" / "latest_checkpointed_iteration.txt").exists()
