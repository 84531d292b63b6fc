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
    assert all(r["tokens_per_s"] > 0 and r["optimizer_path"] == ["reference"] for r in runs.values())
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
