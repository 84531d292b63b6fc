#!/usr/bin/env python3
"""End-to-end training throughput and peak memory per precision mode, through pretrain_gpt.py's own path.

    python3 tools/bench_training.py --suite gpu                 # one H200/H100: the prepared suite (< 8 min)
    python3 tools/bench_training.py --suite cpu                 # the same suite in tiny shapes (CI smoke)
    python3 tools/bench_training.py --modes bf16-sr,bf16-mp -- --num-layers 24 --hidden-size 1024 ...

Every run is `megatron_sr.training.pretrain.pretrain(cfg)` on `--mock-data` in its own process (a clean
peak-memory counter), with the flags a user would give pretrain_gpt.py (compiled on CUDA by default);
an Observer times the iterations after the warm-up (synchronising the device only at their two ends)
and reads the peak memory. Results are written after every run (JSON + a markdown table), so a run cut
off by its time budget keeps what it measured; a run that would not finish within the budget is skipped
and says so.

The GPU suite, in priority order (issue 10; the CPU smoke runs section 1 in tiny shapes):
  1. 1.3B (hidden 2048, 24 layers, 16 heads), sequence 1024, micro-batch 8: bf16-sr (FP32 and BF16
     states), bf16-mp, bf16;
  2. memory-bound: a size where tools/estimate_memory.py says bf16-mp must recompute to fit and bf16-sr
     need not; each mode at the fitting config the estimator picks;
  3. the largest model each mode trains (a few steps, loss falling): bf16-mp vs bf16-sr with BF16 states.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {  # label -> pretrain_gpt.py precision flags
    "bf16-sr": ["--precision", "bf16-sr"],
    "bf16-sr-bf16-states": ["--precision", "bf16-sr", "--optimizer-state-dtype", "bf16"],
    "bf16-mp": ["--precision", "bf16-mp"],
    "bf16": ["--precision", "bf16"],
}
GPT_1_3B = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "1024",
            "--vocab-size", "50257"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "64",
        "--vocab-size", "512"]


@dataclass
class Run:
    section: str  # which part of the suite
    mode: str  # a MODES label
    flags: list[str]  # model shape, batch, recompute (pretrain_gpt.py flags)
    warmup: int = 3
    iters: int = 10
    result: dict = field(default_factory=dict)


def argv_for(run: Run) -> list[str]:
    return ["--mock-data", *run.flags, *MODES[run.mode], "--train-iters", str(run.warmup + run.iters),
            "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "1", "--weight-decay", "0.1",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "0", "--eval-iters", "1",
            "--log-interval", str(run.warmup + run.iters)]


def measure(argv: list[str], warmup: int) -> dict:
    """Child process: pretrain(cfg) once, timing the iterations after `warmup`."""
    import torch

    from megatron_sr.config import parse_config
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain
    from megatron_sr.training.setup import compiles
    from megatron_sr.training.throughput import flops_per_iteration, model_shape, peak_bf16_tflops

    cfg = parse_config(argv)

    class Timing(Observer):
        def __init__(self):
            self.losses, self.paths, self.t0, self.t1, self.trainer = [], set(), None, None, None

        def log(self, message: str) -> None:
            pass

        def _sync(self):
            if self.trainer.device.type == "cuda":
                torch.cuda.synchronize(self.trainer.device)

        def on_train_start(self, trainer) -> None:
            self.trainer = trainer
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)
            if warmup == 0:
                self._sync()
                self.t0 = time.perf_counter()

        def on_step(self, iteration, loss, result) -> None:
            self.losses.append(loss)
            self.paths.add(result.path)
            if iteration in (warmup, cfg.training.train_iters):
                self._sync()
                setattr(self, "t0" if iteration == warmup else "t1", time.perf_counter())

    timing = Timing()
    pretrain(cfg, timing)
    trainer, m, t = timing.trainer, cfg.model, cfg.training
    device = trainer.device
    step_s = (timing.t1 - timing.t0) / (t.train_iters - warmup)
    tokens = t.global_batch_size * m.seq_length
    model_flops = flops_per_iteration(t.global_batch_size, m.seq_length, m.num_layers, m.hidden_size,
                                      trainer.model_chunks[0].vocab_size, **model_shape(m))
    peak = peak_bf16_tflops(device)
    mem = trainer.optimizer.memory_bytes()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "params": mem["num_params"], "compiled": compiles(cfg, device),
        "micro_batch_size": t.micro_batch_size, "seq_length": m.seq_length,
        "recompute": m.recompute_granularity or "none", "iteration_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
        "model_tflops_per_s": model_flops / step_s / 1e12, "mfu": model_flops / step_s / 1e12 / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "bytes_per_param": {k: v / mem["num_params"] for k, v in mem.items() if k != "num_params"},
        "optimizer_path": sorted(p for p in timing.paths if p),
        "loss_first_last": [float(timing.losses[0]), float(timing.losses[-1])],
    }


def _estimator():
    """tools/estimate_memory.py as a module, or None when it is not there."""
    path = REPO / "tools" / "estimate_memory.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("estimate_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ESTIMATOR_MODES = {"bf16-sr (FP32 states)": "bf16-sr", "bf16-sr (BF16 states)": "bf16-sr-bf16-states",
                   "bf16-mp": "bf16-mp", "bf16": "bf16"}


def recompute_flags(label: str) -> list[str]:
    """The estimator's recompute label ("none", "selective", "full block 3") as pretrain_gpt.py flags."""
    if label in ("none", None):
        return []
    if label == "selective":
        return ["--recompute-granularity", "selective"]
    _, method, n = label.split()
    return ["--recompute-granularity", "full", "--recompute-method", method, "--recompute-num-layers", n]


def shape_flags(layers: int, hidden: int, heads: int, seq: int, vocab: int) -> list[str]:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(seq), "--vocab-size", str(vocab)]


def memory_bound_runs(est, seq: int, vocab: int, mbs: int, gib: float, hidden: int) -> list[tuple[str, list[str]]]:
    """Section 2: the shallowest depth at `hidden` where bf16-mp cannot run without recomputation but
    bf16-sr (FP32 states) can; each mode then at the least recompute the estimator says fits."""
    cfg, world, _ = est.config_from_argv(shape_flags(1, hidden, hidden // 128 or 1, seq, vocab)
                                         + ["--micro-batch-size", str(mbs)])
    base = est.dims_from_config(cfg, world)
    sr = est.Search(int(gib * est.GIB))
    mp = est.Search(int(gib * est.GIB))
    for layers in range(1, 257):
        d = est.family_shape(base, layers, hidden)
        d = d and est.dataclasses.replace(d, micro_batch=mbs)
        if d is None:
            continue
        if not mp.fits(est.in_mode(d, "bf16-mp"), "none", 0) and sr.fits(est.in_mode(d, "bf16-sr (FP32 states)"),
                                                                        "none", 0):
            runs = []
            for label in ("bf16-sr (FP32 states)", "bf16-sr (BF16 states)", "bf16-mp"):
                option = est.least_recompute(est.in_mode(d, label), est.Search(int(gib * est.GIB)))
                if option:
                    flags = shape_flags(layers, hidden, d.heads, seq, vocab) + ["--micro-batch-size", str(mbs)]
                    runs.append((ESTIMATOR_MODES[label], flags + recompute_flags(est.recompute_label(*option))))
            return runs
    return []


def largest_runs(est, seq: int, vocab: int, gib: float) -> list[tuple[str, list[str]]]:
    """Section 3: the largest model of the estimator's family each mode trains (micro-batch 1)."""
    cfg, world, _ = est.config_from_argv(["--seq-length", str(seq), "--vocab-size", str(vocab)], family=True)
    rows = {r["mode"]: r["largest"] for r in est.largest(est.dims_from_config(cfg, world), gib)}
    runs = []
    for label in ("bf16-mp", "bf16-sr (BF16 states)"):
        big = rows.get(label)
        if big:
            flags = shape_flags(big["layers"], big["hidden"], big["heads"], seq, vocab) + ["--micro-batch-size", "1"]
            runs.append((ESTIMATOR_MODES[label], flags + recompute_flags(big["recompute"])))
    return runs


def suite(name: str, gib: float) -> list[Run]:
    gpu = name == "gpu"
    shape, mbs = (GPT_1_3B, "8") if gpu else (TINY, "2")
    runs = [Run("1.3B" if gpu else "tiny", mode, [*shape, "--micro-batch-size", mbs],
                warmup=3 if gpu else 1, iters=10 if gpu else 2)
            for mode in ("bf16-sr", "bf16-sr-bf16-states", "bf16-mp", "bf16")]
    est = _estimator()
    if est is None or not gpu:  # sections 2-3 are sized for a GPU's memory (the estimator's family starts at 125M)
        return runs
    seq, vocab, hidden, mb = 1024, 50257, 4096, 8
    for mode, flags in memory_bound_runs(est, seq, vocab, mb, gib, hidden):
        runs.append(Run("memory-bound", mode, flags, warmup=2 if gpu else 1, iters=5 if gpu else 2))
    for mode, flags in largest_runs(est, seq, vocab, gib):
        runs.append(Run("largest", mode, flags, warmup=1, iters=3 if gpu else 1))
    return runs


def write_outputs(runs: list[Run], out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    lines = [f"{meta['device']}, commit {meta['commit']}, `{meta['command']}`, {meta['date']}", "",
             "| section | mode | shape | recompute | tokens/s | ms/iter | MFU | peak mem (GiB) | vs bf16-mp | "
             "bytes/param (p+g+states) | optimizer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        res = r.result
        if not res:
            continue
        if "error" in res or "skipped" in res:
            lines.append(f"| {r.section} | {r.mode} | | | {res.get('error') or res.get('skipped')} |||||||")
            continue
        base = next((b.result for b in runs if b.section == r.section and b.mode == "bf16-mp"
                     and b.result.get("tokens_per_s")), None)
        ratio = f"{res['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        if base and res["peak_memory_gib"] and base.get("peak_memory_gib"):
            ratio += f", {res['peak_memory_gib'] / base['peak_memory_gib']:.2f}x mem"
        mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] else "n/a"
        mem = f"{res['peak_memory_gib']:.2f}" if res["peak_memory_gib"] is not None else "n/a"
        bpp = res["bytes_per_param"]
        lines.append(f"| {r.section} | {r.mode} | {res['params'] / 1e6:.0f}M, mbs {res['micro_batch_size']} | "
                     f"{res['recompute']} | {res['tokens_per_s']:.0f} | {res['iteration_ms']:.1f} | {mfu} | {mem} | "
                     f"{ratio} | {bpp['params']:.0f}+{bpp['grads']:.0f}+{bpp['optimizer_states']:.0f} | "
                     f"{','.join(res['optimizer_path'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+uncommitted" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one run, in its own process
        print("RESULT " + json.dumps(measure(argv[3:], int(argv[2]))), flush=True)
        return 0
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("gpu", "cpu"), help="the prepared suite (see the docstring)")
    p.add_argument("--modes", default="bf16-sr,bf16-mp,bf16", help=f"without --suite: labels of {list(MODES)}")
    p.add_argument("--gpu-memory-gib", type=float, default=139.0, help="memory --suite gpu sizes sections 2-3 for")
    p.add_argument("--budget-minutes", type=float, default=8.0)
    p.add_argument("--output", help="results path without suffix (default bench/results/training_<suite>)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.suite:
        runs = suite(args.suite, args.gpu_memory_gib)
    else:
        unknown = [m for m in args.modes.split(",") if m not in MODES]
        if unknown:
            p.error(f"--modes: unknown {unknown}; expected labels of {list(MODES)}")
        runs = [Run("custom", m, extra) for m in args.modes.split(",")]
    out = Path(args.output or REPO / "bench" / "results" / f"training_{args.suite or 'custom'}")
    meta = {"device": "", "commit": _commit(), "command": "python3 tools/bench_training.py " + " ".join(argv),
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}
    deadline = time.monotonic() + 60 * args.budget_minutes
    for run in runs:
        left = deadline - time.monotonic()
        if left < 20:
            run.result = {"skipped": f"not started: {left:.0f} s of the budget left"}
            continue
        cmd = [sys.executable, __file__, "--child", "--warmup", str(run.warmup), *argv_for(run)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and found:
                run.result = json.loads(found[-1][7:])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                run.result = {"error": tail[0][:200]}
        except subprocess.TimeoutExpired:
            run.result = {"skipped": "cut off by the time budget"}
        run.result["wall_s"] = round(time.monotonic() - t0, 1)
        meta["device"] = meta["device"] or run.result.get("device", "")
        res = run.result
        print(f"{run.section} {run.mode}: " + (f"{res['tokens_per_s']:.0f} tokens/s, MFU {res['mfu']}, peak "
                                                f"{res['peak_memory_gib']} GiB" if "tokens_per_s" in res
                                                else str(res)), flush=True)
        write_outputs(runs, out, meta)
    write_outputs(runs, out, meta)  # also when the budget skipped every run
    return 0 if all("error" not in r.result for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
