"""tools/batch_size_study.py end to end on a tiny mock-data GPT (results that hold the runs' own scalars, the
variance table, resumability, one-line errors) and its variance arithmetic against a direct computation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tb_events import scalars_of

REPO = Path(__file__).resolve().parents[1]
TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        "--log-interval 1 --eval-interval 1000 --eval-iters 2 --lr 3e-3 --device cpu --torch-compile off").split()
SCHEMES = ["base", "g4-sr"]
SIZES = [2, 4]


def tool(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "tools/batch_size_study.py", "--output", str(out / "results"), "--runs-dir",
            str(out / "runs"), "--batch-sizes", *map(str, SIZES), "--schemes", *SCHEMES, "--seeds", "1",
            "--steps", "2", "--variance-batches", "3", *extra, "--", *TINY]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def load_tool():
    """The tool as a module (it imports compare_precisions from tools/, as when run as a script)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("batch_size_study")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    first = tool(out)
    assert first.returncode == 0, first.stderr
    return out, first


def test_results_hold_the_runs_own_values(study):
    out, first = study
    # per scheme: fixed steps at B=2 (2 iterations) and B=4 (2), fixed tokens at B=2 (4); B=4's is the same run
    assert "6 runs, 0 done earlier, 6 to run" in first.stdout and "[6/6]" in first.stdout
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["commit"] and results["machine"] and "batch_size_study.py" in results["command"]
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {f"{s}_b{b}_it{i}_seed1" for s in SCHEMES for b, i in ((2, 2), (2, 4), (4, 2))}
    for run in runs.values():
        tb = scalars_of(out / "runs" / run["name"] / "tb")
        assert run["status"] == "ok"
        assert run["final_valid_loss"] == pytest.approx(tb["lm loss validation"][run["iterations"]])
        assert tb["batch-size"][1] == run["batch_size"]
        assert [p["value"] for p in run["train"]] == pytest.approx([tb["lm loss"][i] for i in
                                                                    range(1, run["iterations"] + 1)])
        log = (out / "runs" / run["name"] / "log.txt").read_text()
        assert f"--eval-iters {2 * 4 // run['batch_size']} " in log  # the same 8 validation samples for every run
        assert ("quantization points of the linear layers: bwd_grad_dgrad int:b4:row:sr" in log) == \
            (run["scheme"] == "g4-sr")
    steps, tokens = results["tables"]["steps"], results["tables"]["tokens"]
    for b, iters in ((2, 4), (4, 2)):
        assert tokens[f"g4-sr|{b}"]["iterations"] == iters
        gap = runs[f"g4-sr_b{b}_it{iters}_seed1"]["final_valid_loss"] - runs[f"base_b{b}_it{iters}_seed1"][
            "final_valid_loss"]
        assert tokens[f"g4-sr|{b}"]["gap_mean"] == pytest.approx(gap)
    assert steps["base|4"]["mean"] == tokens["base|4"]["mean"] == runs["base_b4_it2_seed1"]["final_valid_loss"]
    table = (out / "results" / "results.md").read_text()
    for name in SCHEMES:
        row = f"| {name} | {runs[f'{name}_b2_it2_seed1']['final_valid_loss']:.4f} | " \
              f"{runs[f'{name}_b4_it2_seed1']['final_valid_loss']:.4f} |"
        assert row in table
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in first.stdout
    else:
        for name in ("gap_vs_batch_steps.png", "gap_vs_batch_tokens.png", "grad_variance_vs_batch.png"):
            assert (out / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_variance_table(study):
    out, _ = study
    var = json.loads((out / "results" / "results.json").read_text())["gradient_variance"]
    assert var["model_state"].startswith("base_b4_it2_seed1") and var["batches"] == 3
    table = var["table"]
    assert set(table) == set(SCHEMES) and all(set(table[s]) == {"2", "4"} for s in SCHEMES)
    for b in ("2", "4"):
        base, quant = table["base"][b], table["g4-sr"][b]
        assert base["variance"] == pytest.approx(base["reference_variance"]) and base["bias"] == 0.0
        assert base["variance"] > 0
        assert quant["reference_variance"] == pytest.approx(base["variance"])
        assert quant["variance"] != pytest.approx(base["variance"], rel=1e-6)  # 4-bit gradients change it
        assert quant["bias"] > 0
    assert table["base"]["4"]["variance"] < table["base"]["2"]["variance"]  # a larger batch averages more samples


def test_a_second_run_does_no_work(study):
    out, _ = study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")}
    again = tool(out)
    assert again.returncode == 0, again.stderr
    assert "6 runs, 6 done earlier, 0 to run" in again.stdout and "[1/" not in again.stdout
    assert "gradient variance measured earlier" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")} == before


@pytest.mark.parametrize("extra, message", [
    (["--schemes", "fp8-sr", "base"], "the first scheme is the baseline"),
    (["--schemes", "base", "nope"], "'nope': not a preset"),
    (["--schemes", "base", "x=--quant-fwd-input fp:e9m1:sr"], "--schemes x:"),
    (["--schemes", "base", "x=--lr 1"], "is not a quantization flag"),
    (["--batch-sizes", "4", "8", "--micro-batch-size", "3"], "4 is not a multiple of the micro-batch size 3"),
    (["--batch-sizes", "4", "6"], "4 does not divide the largest, 6"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    module = load_tool()
    argv = ["--output", str(tmp_path), *extra, "--", *TINY]
    assert module.run_tool("batch_size_study.py", lambda: module.study(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_variance_arithmetic_against_a_direct_computation():
    tool_module = load_tool()
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 7, generator=gen)
    quantized = reference + 0.3 * torch.randn(5, 7, generator=gen) + 0.1
    got = tool_module.variance_stats(quantized, reference)
    g_mean = [sum(float(reference[k, j]) for k in range(5)) / 5 for j in range(7)]
    variance = sum(sum((float(quantized[k, j]) - g_mean[j]) ** 2 for j in range(7)) for k in range(5)) / 5
    ref_variance = sum(sum((float(reference[k, j]) - g_mean[j]) ** 2 for j in range(7)) for k in range(5)) / 5
    q_mean = [sum(float(quantized[k, j]) for k in range(5)) / 5 for j in range(7)]
    bias = sum((q_mean[j] - g_mean[j]) ** 2 for j in range(7))
    assert got["variance"] == pytest.approx(variance, rel=1e-6)
    assert got["reference_variance"] == pytest.approx(ref_variance, rel=1e-6)
    assert got["extra_variance"] == pytest.approx(variance - ref_variance, rel=1e-6)
    assert got["bias"] == pytest.approx(bias, rel=1e-6)
    # the decomposition: variance around g_mean = spread around the scheme's own mean + bias
    spread = sum(sum((float(quantized[k, j]) - q_mean[j]) ** 2 for j in range(7)) for k in range(5)) / 5
    assert got["variance"] == pytest.approx(spread + bias, rel=1e-6)
