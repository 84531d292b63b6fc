"""tools/bench_training.py --suite cpu: the GPU suite's structure in tiny shapes, through pretrain(cfg)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_suite_measures_every_mode_and_writes_results(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "tools/bench_training.py", "--suite", "cpu", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = {r["mode"]: r["result"] for r in data["runs"] if r["section"] == "tiny"}
    assert set(runs) == {"bf16-sr", "bf16-sr-bf16-states", "bf16-mp", "bf16"}
    assert all(r["tokens_per_s"] > 0 and r["optimizer_path"] == ["cpu"] for r in runs.values())
    bpp = {m: r["bytes_per_param"] for m, r in runs.items()}
    assert (bpp["bf16-sr"]["optimizer_states"], bpp["bf16-sr-bf16-states"]["optimizer_states"],
            bpp["bf16-mp"]["optimizer_states"]) == (8.0, 4.0, 12.0)
    assert data["meta"]["commit"] and "--suite cpu" in data["meta"]["command"]
    assert "| tiny | bf16-mp |" in out.with_suffix(".md").read_text()


def test_a_spent_budget_skips_runs_and_still_writes(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "tools/bench_training.py", "--suite", "cpu", "--budget-minutes", "0.01",
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [r["result"] for r in json.loads(out.with_suffix(".json").read_text())["runs"]]
    assert results and all("not started" in r["skipped"] for r in results)


def test_gpu_suite_plan_comes_from_the_estimator():
    """The GPU suite's sections 2-3, planned on the CPU: a memory-bound size where bf16-mp recomputes and
    bf16-sr does not, and each mode's largest model (bf16-sr with BF16 states the larger)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training_plan", REPO / "tools" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    runs = bench.suite("gpu", 139.0)
    bound = {r.mode: r.flags for r in runs if r.section == "memory-bound"}
    assert "--recompute-granularity" in bound["bf16-mp"] and "--recompute-granularity" not in bound["bf16-sr"]
    largest = {r.mode: r.flags for r in runs if r.section == "largest"}
    size = {m: int(f[f.index("--num-layers") + 1]) * int(f[f.index("--hidden-size") + 1]) ** 2
            for m, f in largest.items()}
    assert size["bf16-sr-bf16-states"] > 1.6 * size["bf16-mp"]
    assert [r.section for r in runs[:4]] == ["1.3B"] * 4
