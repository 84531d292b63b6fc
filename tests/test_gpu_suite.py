"""tools/gpu_suite.py --dry-run: every section in its CPU form or skipped with the reason, so the suite that
runs on a lent GPU cannot rot between GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_or_explains_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_suite.py", "--dry-run", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("gpu_suite_*_dry_run.json")
    data = json.loads(result.read_text())
    status = {s["name"]: s["result"] for s in data["sections"]}
    assert list(status)[:5] == ["build", "gpu-tests", "memcheck", "optimizer", "training"]
    assert status["gpu-tests"]["status"] == "ok" and status["training"]["status"] == "ok"
    assert status["study:precision"]["status"] == "ok" and status["study:quant-cost"]["status"] == "ok"
    corpus = json.loads((tmp_path / "precision_gpu_dry_run" / "corpus.json").read_text())
    assert corpus["files"] > 0 and corpus["tokens"] > corpus["tokens_per_run"] > 0
    assert (tmp_path / "precision_gpu_dry_run" / "results.md").is_file()
    assert (tmp_path / "quant_cost_dry_run.md").is_file()
    assert all(r["status"] == "ok" or (r["status"] == "skipped" and r["reason"]) for r in status.values())
    assert {e["mode"] for e in data["estimator_error"]} == {"bf16-sr", "bf16-sr-bf16-states", "bf16-mp", "bf16"}
    meta = data["meta"]
    assert meta["dry_run"] and meta["commit"] and meta["torch"]
    assert "| training |" in result.with_suffix(".md").read_text()


def test_a_spent_budget_is_refused_or_skips(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_suite.py", "--dry-run", "--budget-minutes", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget-minutes must be positive" in proc.stderr
