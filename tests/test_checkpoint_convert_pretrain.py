"""Through the real launch path: a checkpoint saved by pretrain at (tp 2, pp 2, dp 2) loads at (1, 1, 1)
(converted by tools/convert_checkpoint.py) and at (2, 1, 2) (resharded on the fly by the loader), and
training continues with the same losses (fp32, 1e-5 relative)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks

ARGS = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 128 "
        "--make-vocab-size-divisible-by 32 --micro-batch-size 1 --global-batch-size 8 --train-iters 6 "
        "--mock-data --hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --lr-warmup-iters 2 --log-interval 100 "
        "--eval-interval 0 --eval-iters 1 --device cpu --precision fp32 --use-distributed-optimizer").split()


def _pretrain(argv: list[str]) -> list[float]:
    from megatron_sr.config import parse_config
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Quiet(Observer):
        def log(self, message: str) -> None:
            pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(parse_config(argv), Quiet()).train_losses
    finally:
        torch.set_num_threads(threads)


def _layout(tp: int, pp: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def _convert(src: Path, dst: Path, tp: int, pp: int) -> None:
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--load", str(src), "--save", str(dst), "--target-tensor-parallel-size", str(tp),
                      "--target-pipeline-model-parallel-size", str(pp)]) == 0


@pytest.mark.slow
def test_saved_at_tp2_pp2_dp2_continues_at_111_and_212(tmp_path):
    saved = tmp_path / "saved"
    full = run_ranks(8, _pretrain, ARGS + _layout(2, 2) + ["--save", str(saved), "--save-interval", "3"])[0]
    assert len(full) == 6
    _convert(saved / "iter_0000003", tmp_path / "one", 1, 1)

    resumed_one = run_ranks(1, _pretrain, ARGS + _layout(1, 1) + ["--load", str(tmp_path / "one")])[0]
    (saved / "latest_checkpointed_iteration.txt").write_text("3\n")  # resume the saved run at iteration 3
    resumed_two = run_ranks(4, _pretrain, ARGS + _layout(2, 1) + ["--load", str(saved)])[0]
    for resumed in (resumed_one, resumed_two):
        assert len(resumed) == 3
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_one_process_checkpoint_continues_at_221(tmp_path):
    """The single-process trainer's own checkpoint file loads under torchrun at (2, 2, 1): the loader takes
    the partition dims from the model it loads into and re-creates the tied-embedding copy."""
    saved = tmp_path / "single"
    full = _pretrain(ARGS + _layout(1, 1) + ["--save", str(saved), "--save-interval", "3"])
    assert (saved / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    (saved / "latest_checkpointed_iteration.txt").write_text("3\n")
    resumed = run_ranks(4, _pretrain, ARGS + _layout(2, 2) + ["--load", str(saved)])[0]
    assert len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=0)
