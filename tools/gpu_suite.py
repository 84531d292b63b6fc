#!/usr/bin/env python3
"""Every GPU figure and GPU test of the project from one command, in priority order, under a time budget.

    python3 tools/gpu_suite.py                      # on a GPU machine: --budget-minutes 9 by default
    python3 tools/gpu_suite.py --dry-run            # CI: every section in its CPU form, or skipped with the reason

Sections, most important first (issue 12); each gets what is left of the budget and no more:
  1. gpu-tests      `pytest -m gpu tests` (kernel bitwise vs the reference in every variant, the skip flag,
                    no host synchronisation between log lines)
  2. memcheck       `compute-sanitizer --tool memcheck` on `tools/gpu_kernel_check.py sanitize` (plan cache on)
  3. optimizer      copy bandwidth and the optimizer-step table, 350M and 1.3B (`tools/bench_optimizer.py`)
  4. training       `tools/bench_training.py --suite gpu`, then the memory estimator's error on every run
  5. studies        the precision study's GPU run (`tools/precision_study_gpu.py`) and the quantization points'
                    step-time cost (`tools/bench_quant.py` on the examples' 125M config)

Each section records its command, exit code, wall time and output tail; the run records the commit, the
GPU, torch and CUDA. Afterwards `python3 tools/readme_results.py` rewrites the README's Results section from
the new files (commit both). Results are written after every section (bench/results/gpu_suite_<date>.json and
.md), so a run cut off by the lease keeps what it finished. The first call on a fresh machine also
JIT-builds the CUDA extension once (`gpu_kernel_check.py build`) so no section pays for it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Section:
    name: str
    why: str  # what it measures, for the summary
    command: list[str] | None  # None: skipped, see `skipped`
    env: dict = field(default_factory=dict)
    skipped: str | None = None
    result: dict = field(default_factory=dict)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sections(dry_run: bool, out_dir: Path) -> list[Section]:
    """The suite; in a dry run the CPU form of each section, or the reason it cannot have one."""
    cuda = _cuda() and not dry_run
    no_gpu = "dry run: needs a CUDA device" if dry_run else "no CUDA device"
    sanitizer = shutil.which("compute-sanitizer")
    out = [
        Section("build", "JIT build of the fused kernel, once for the whole suite",
                [PY, "tools/gpu_kernel_check.py", "build"] if cuda else None, skipped=None if cuda else no_gpu),
        Section("gpu-tests", "kernel bitwise vs reference, skip flag, no host sync",
                [PY, "-m", "pytest", "-q", "-m", "gpu", "tests"] + ([] if cuda else ["--co"])),
        Section("memcheck", "compute-sanitizer memcheck of the kernel with its plan cache",
                [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", PY, "tools/gpu_kernel_check.py",
                 "sanitize"] if cuda and sanitizer else None, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                skipped=None if cuda and sanitizer else (no_gpu if not cuda else "compute-sanitizer not on PATH")),
        Section("optimizer", "copy bandwidth; optimizer step at 350M and 1.3B vs torch's fused AdamW",
                [PY, "tools/bench_optimizer.py", "--out-dir", str(out_dir)] if cuda else None,
                skipped=None if cuda else no_gpu),
        Section("training", "end to end through pretrain(cfg): 1.3B, memory-bound, largest model",
                [PY, "tools/bench_training.py", "--suite", "gpu" if cuda else "cpu", "--output",
                 str(out_dir / ("training_gpu" if cuda else "training_cpu"))]),
    ]
    device = ["--device", "cuda"] if cuda else ["--tiny", "--iters", "2", "--warmup", "1", "--schemes", "none,fp8-sr"]
    out += [
        Section("study:precision", "the precision study on GPT-2 124M, seq 1024, a corpus built on the machine",
                [PY, "tools/precision_study_gpu.py", "--output", str(out_dir / ("precision_gpu" if cuda else
                                                                                 "precision_gpu_dry_run"))]
                + ([] if cuda else ["--dry-run", "--work-dir", str(out_dir / "precision_gpu_dry_run_work")])),
        Section("study:quant-cost", "step-time cost of the low-bit quantization points per scheme",
                [PY, "tools/bench_quant.py", "--rounds", "1", "--output",
                 str(out_dir / ("quant_cost_gpu" if cuda else "quant_cost_dry_run"))]
                + (["--config", "examples/gpt_125m.yaml", "--iters", "20"] if cuda else []) + device),
    ]
    return out


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"suite_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def estimator_error(training_json: Path) -> list[dict]:
    """Per run of the training section: the estimator's peak (bytes) against torch's max_memory_allocated."""
    if not training_json.is_file():
        return []
    bench, est = _load_tool("bench_training"), _load_tool("estimate_memory")
    rows = []
    for run in json.loads(training_json.read_text())["runs"]:
        res = run["result"]
        if "tokens_per_s" not in res:
            continue
        argv = bench.argv_for(bench.Run(run["section"], run["mode"], run["flags"], run["warmup"], run["iters"]))
        cfg, world, _ = est.config_from_argv(argv)
        predicted = est.estimate(est.dims_from_config(cfg, world))["total"] / 2 ** 30
        measured = res.get("peak_memory_gib")
        rows.append({"section": run["section"], "mode": run["mode"], "estimated_gib": round(predicted, 3),
                     "measured_gib": measured,
                     "error": None if not measured else round(predicted / measured - 1.0, 4)})
    return rows


def _meta(dry_run: bool) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"),
            "commit": (commit.stdout.strip() or "unknown") + ("+dirty" if dirty else ""),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "dry_run": dry_run, "command": "python3 tools/gpu_suite.py " + " ".join(sys.argv[1:])}


def run_section(sec: Section, deadline: float) -> None:
    if sec.command is None:
        sec.result = {"status": "skipped", "reason": sec.skipped}
        return
    left = deadline - time.monotonic()
    if left < 15:
        sec.result = {"status": "skipped", "reason": f"not started: {left:.0f} s of the budget left"}
        return
    t0 = time.monotonic()
    try:
        # PYTHONPATH: the lent GPU machine has no package index to `pip install -e .` from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **sec.env}
        proc = subprocess.run(sec.command, cwd=REPO, capture_output=True, text=True, timeout=left, env=env)
        status = "ok" if proc.returncode == 0 else "failed"
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        sec.result = {"status": status, "returncode": proc.returncode, "tail": tail}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sec.result = {"status": "cut off", "reason": "the time budget ran out", "tail": out.splitlines()[-15:]}
    sec.result["wall_s"] = round(time.monotonic() - t0, 1)


def write(secs: list[Section], meta: dict, out: Path, errors: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "sections": [asdict(s) for s in secs], "estimator_error": errors},
                              indent=1) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    lines = [f"GPU suite, {meta['date']}: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, commit "
             f"{meta['commit']}{' (dry run on the CPU)' if meta['dry_run'] else ''}; `{meta['command']}`", "",
             "| section | what | status | wall s | last line |", "|---|---|---|---|---|"]
    for s in secs:
        r = s.result
        last = r.get("reason") or ((r.get("tail") or [""])[-1][:100])
        lines.append(f"| {s.name} | {s.why} | {r.get('status', 'pending')} | {r.get('wall_s', '')} | {last} |")
    if errors:
        lines += ["", "| estimator vs measured peak | mode | estimated GiB | measured GiB | error |",
                  "|---|---|---|---|---|"]
        for e in errors:
            error = "n/a" if e["error"] is None else f"{100 * e['error']:+.1f}%"
            lines.append(f"| {e['section']} | {e['mode']} | {e['estimated_gib']} | {e['measured_gib'] or 'n/a'} | "
                         f"{error} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-minutes", type=float, default=9.0)
    ap.add_argument("--dry-run", action="store_true", help="the CPU form of every section (CI)")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.budget_minutes <= 0:
        ap.error("--budget-minutes must be positive")
    out_dir = Path(args.out_dir)
    meta = _meta(args.dry_run)
    out = out_dir / f"gpu_suite_{meta['date']}{'_dry_run' if args.dry_run else ''}"
    deadline = time.monotonic() + 60 * args.budget_minutes
    secs, errors = sections(args.dry_run, out_dir), []
    for sec in secs:
        run_section(sec, deadline)
        if sec.name == "training" and sec.result.get("status") == "ok":
            errors = estimator_error(out_dir / ("training_cpu.json" if args.dry_run or not _cuda() else
                                                "training_gpu.json"))
        write(secs, meta, out, errors)
        print(f"{sec.name:24s} {sec.result.get('status'):8s} {sec.result.get('wall_s', '')!s:>6} "
              f"{sec.result.get('reason', '')}", flush=True)
    print(f"results: {out.with_suffix('.md')}" + ("" if args.dry_run else
          "; then regenerate the README's Results section: python3 tools/readme_results.py"))
    return 0 if all(s.result.get("status") in ("ok", "skipped") for s in secs) else 1


if __name__ == "__main__":
    sys.exit(main())
