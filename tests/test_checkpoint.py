"""Checkpoints: Megatron's layout, complete contents, atomic writes, and a bitwise resume on the CPU."""

from pathlib import Path

import pytest
import torch

from megatron_sr.config import parse_config
from megatron_sr.training.pretrain import pretrain

TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 4 --log-interval 1000 --eval-interval 0 --eval-iters 1 "
        "--lr 3e-3 --lr-warmup-iters 2 --hidden-dropout 0.1 --attention-dropout 0.1").split()


def run(*extra: str):
    return pretrain(parse_config(TINY + list(extra)))


def load(root: Path, iteration: int) -> dict:
    path = root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-mp"])
def test_resume_is_bitwise(tmp_path, precision):
    """2N iterations in one run == N iterations, a stop, and N resumed iterations (dropout on)."""
    n = 4
    straight = run("--train-iters", str(2 * n), "--precision", precision, "--save", str(tmp_path / "a"))
    first = run("--train-iters", str(2 * n), "--precision", precision, "--exit-interval", str(n),
                "--save", str(tmp_path / "b"))
    assert first.reason == "exit-interval" and (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text() == "4"
    second = run("--train-iters", str(2 * n), "--precision", precision, "--load", str(tmp_path / "b"),
                 "--save", str(tmp_path / "b"))
    assert straight.train_losses == first.train_losses + second.train_losses
    a, b = load(tmp_path / "a", 2 * n), load(tmp_path / "b", 2 * n)
    for name, t in a["model"].items():
        assert torch.equal(bits(t), bits(b["model"][name])), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(x, y) for x, y in zip(a["optimizer"][key], b["optimizer"][key]))
    assert a["optimizer"]["step"] == b["optimizer"]["step"] == 2 * n
    assert straight.valid_losses == second.valid_losses


def test_layout_and_contents(tmp_path):
    run("--train-iters", "3", "--save", str(tmp_path), "--save-interval", "2")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003",
                                                          "latest_checkpointed_iteration.txt"]
    ck = load(tmp_path, 3)
    assert ck["iteration"] == 3 and ck["consumed_train_samples"] == 12 and ck["skipped_iters"] == 0
    assert ck["sr"] == {"seed": 1234, "step": 3}
    assert ck["config"]["model"]["hidden_size"] == 32 and ck["config"]["optimizer"]["precision"] == "bf16-sr"
    assert {"python", "numpy", "torch", "cuda", "tracker"} <= set(ck["rng_state"])
    assert ck["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run("--train-iters", "2", "--save", str(tmp_path))

    def broken_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)  # every checkpoint file goes through torch.save
    with pytest.raises(OSError):
        run("--train-iters", "3", "--load", str(tmp_path), "--save", str(tmp_path))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (tmp_path / "iter_0000003").exists()
    assert load(tmp_path, 2)["iteration"] == 2


def test_load_without_checkpoint_starts_fresh_and_missing_iteration_is_an_error(tmp_path, capsys):
    result = run("--train-iters", "2", "--load", str(tmp_path / "none"))
    assert result.state.iteration == 2 and "training from scratch" in capsys.readouterr().out
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
        run("--train-iters", "9", "--load", str(tmp_path))
