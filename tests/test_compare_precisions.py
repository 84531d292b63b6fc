"""tools/compare_precisions.py end to end (results that hold the runs' own scalars, resumability) and
--log-update-stall-interval (the fraction of weight updates that round to no change) against a count made here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tb_events import scalars_of

from megatron_sr.config import parse_config
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        "--micro-batch-size 2 --log-interval 2 --eval-interval 2 --eval-iters 2 --lr 3e-3 --train-iters 4 "
        "--device cpu --torch-compile off").split()
MODES = ["bf16-sr", "fp32"]


def tool(out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "tools/compare_precisions.py", "--output", str(out), "--modes", *MODES,
            "--lr-multipliers", "1", "--seeds", "1", "--save-interval", "2", "--stall-interval", "2", "--", *TINY]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    first = tool(out)
    assert first.returncode == 0, first.stderr
    return out, first


def test_results_hold_the_runs_own_scalars(study):
    out, first = study
    assert "2 runs, 0 done earlier, 2 to run" in first.stdout
    assert "[2/2]" in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert {r["mode"] for r in results["runs"]} == set(MODES) and results["commit"] and results["machine"]
    for run in results["runs"]:
        tb = scalars_of(out / "runs" / run["name"] / "tb")
        assert run["status"] == "ok"
        assert [p["iteration"] for p in run["train"]] == [1, 2, 3, 4]
        assert [p["value"] for p in run["train"]] == pytest.approx([tb["lm loss"][i] for i in (1, 2, 3, 4)])
        assert [p["tokens"] for p in run["train"]] == [s * 16 for s in sorted(tb["lm loss vs samples"])]
        assert [(p["iteration"], p["value"]) for p in run["valid"]] == pytest.approx(
            sorted(tb["lm loss validation"].items()))
        assert run["final_valid_loss"] == pytest.approx(tb["lm loss validation"][4])
        assert [p["iteration"] for p in run["update_stall"]] == [2, 4]
        assert [p["value"] for p in run["update_stall"]] == pytest.approx(
            [tb["update-stall-fraction"][i] for i in (2, 4)])
    table = (out / "results.md").read_text()
    for run in results["runs"]:
        assert f"| {run['mode']} | {run['final_valid_loss']:.4f} |" in table
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in first.stdout
    else:
        for name in ("valid_loss_vs_tokens.png", "final_loss_vs_lr.png", "late_training_zoom.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_does_no_work_and_an_interrupted_one_resumes(study):
    out, _ = study
    runs = sorted((out / "runs").iterdir())
    before = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*")}
    again = tool(out)
    assert again.returncode == 0, again.stderr
    assert "2 runs, 2 done earlier, 0 to run" in again.stdout and "[1/" not in again.stdout
    assert {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*")} == before
    (runs[0] / "done.json").unlink()  # as if killed after its last checkpoint
    resumed = tool(out)
    assert resumed.returncode == 0 and "1 to run" in resumed.stdout, resumed.stderr
    assert "loaded checkpoint" in (runs[0] / "log.txt").read_text().split("$ ")[-1]


class StallCounter(Observer):
    """Counts, independently of the loop, the elements with a nonzero gradient whose stored weight (the FP32
    master where the optimizer keeps one) is the same after the step (one process, SRAdamW)."""

    def __init__(self):
        self.fraction = None

    def log(self, message: str) -> None:
        pass

    def on_train_start(self, trainer) -> None:
        self.optimizer = trainer.optimizer

    def _weights(self):
        opt = self.optimizer
        return opt.master if opt.master is not None else [p.detach() for p in opt.params]

    def on_gradients(self, iteration, trainer) -> None:
        self.before = [(w.clone(), g != 0) for w, g in zip(self._weights(), self.optimizer.grads())]

    def on_step(self, iteration, loss, result) -> None:
        if hasattr(self, "before"):
            pairs = list(zip(self.before, self._weights()))
            stalled = sum(int(((before == after) & nonzero).sum()) for (before, nonzero), after in pairs)
            self.fraction = stalled / sum(int(nonzero.sum()) for (_, nonzero), _ in pairs)


def stall_run(precision: str, tmp_path: Path) -> tuple[float, float]:
    """(the logged update-stall-fraction of iteration 1, the count made here) at lr 1e-5."""
    tb = tmp_path / precision
    argv = TINY + ["--precision", precision, "--lr", "1e-5", "--lr-decay-style", "constant", "--train-iters", "1",
                   "--log-update-stall-interval", "1", "--tensorboard-dir", str(tb), "--eval-iters", "0"]
    counter = StallCounter()
    pretrain(parse_config(argv), counter)
    return scalars_of(tb)["update-stall-fraction"][1], counter.fraction


def test_round_to_nearest_stalls_where_sr_and_fp32_masters_do_not(tmp_path):
    got = {mode: stall_run(mode, tmp_path) for mode in ("bf16", "bf16-sr", "bf16-mp", "fp32")}
    for mode, (logged, counted) in got.items():
        assert logged == pytest.approx(counted, rel=1e-6), mode
    assert got["bf16"][0] > 0.5  # lr 1e-5 is below half a BF16 ulp of most weights (~0.02: ulp 1.2e-4)
    assert got["bf16-sr"][0] < got["bf16"][0] - 0.03  # SR moves a weight with probability |update| / ulp
    assert got["fp32"][0] < 0.01 and got["bf16-mp"][0] < 0.01  # FP32 weights hold the update


def _stall_on_ranks(argv: list[str], tb: str) -> float:
    from megatron_sr.parallel import parallel_state as ps

    pretrain(parse_config(argv + ["--tensorboard-dir", tb]), Observer())
    torch.distributed.barrier()
    return scalars_of(Path(tb))["update-stall-fraction"][1] if ps.get_data_parallel_rank() == 1 else None


def test_the_distributed_optimizer_counts_each_element_once(tmp_path):
    from multiproc import run_ranks

    argv = TINY + ["--precision", "bf16", "--lr", "1e-5", "--lr-decay-style", "constant", "--train-iters", "1",
                   "--log-update-stall-interval", "1", "--eval-iters", "0", "--global-batch-size", "4",
                   "--accumulate-allreduce-grads-in-fp32"]
    one = tmp_path / "one"
    pretrain(parse_config(argv + ["--tensorboard-dir", str(one)]), Observer())
    single = scalars_of(one)["update-stall-fraction"][1]
    values = run_ranks(2, _stall_on_ranks, argv + ["--use-distributed-optimizer"], str(tmp_path / "two"))
    assert values[1] == pytest.approx(single, abs=2e-3)  # the same updates up to the grads' summation order


def test_paired_gaps_are_the_per_seed_differences():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import compare_precisions as cp

    def run(mode, seed, loss, status="ok"):
        return {"mode": mode, "lr_multiplier": 1.0, "seed": seed, "final_valid_loss": loss, "status": status}

    results = [run("bf16-mp", 1, 4.0), run("bf16-mp", 2, 4.5), run("bf16-mp", 3, 3.5),
               run("bf16", 1, 4.1), run("bf16", 2, 4.7), run("bf16", 3, 0.0, "diverged"),
               run("bf16-sr", 1, 3.9), run("bf16-sr", 2, 4.6)]
    gaps = cp.paired_gaps(results, ["bf16-sr", "bf16-mp", "bf16"], [1.0])
    assert gaps[("bf16", 1.0)]["diffs"] == pytest.approx([0.1, 0.2])  # seed 3 diverged: not paired
    assert gaps[("bf16", 1.0)]["same_sign"] and gaps[("bf16", 1.0)]["mean"] == pytest.approx(0.15)
    assert gaps[("bf16-sr", 1.0)]["diffs"] == pytest.approx([-0.1, 0.1]) and not gaps[("bf16-sr", 1.0)]["same_sign"]
    assert ("bf16-mp", 1.0) not in gaps
