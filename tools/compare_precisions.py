#!/usr/bin/env python3
"""The accuracy study: one GPT config trained in several precision modes, learning rates and seeds, compared by
validation loss at equal tokens (README, "Accuracy study").

    python3 tools/compare_precisions.py --config examples/gpt_tiny_quickstart.yaml --output study \
        --modes bf16-sr bf16-mp bf16 fp32 --lr-multipliers 1 2 4 --seeds 1 2 3 --jobs 2 \
        -- --data-path data/wiki_text_document --tokenizer-model data/tok.model --train-iters 2000

Every combination is one `pretrain_gpt.py` process with the base config (YAML and the flags after `--`, as
pretrain_gpt.py takes them) plus --precision, --lr / --min-lr (the base values times the multiplier), --seed,
--save/--load (the run's own checkpoint directory), --save-interval, --tensorboard-dir and
--log-update-stall-interval. It is resumable: a run that ended (trained through, or diverged) leaves a marker
and is not run again; an interrupted one restarts from its last checkpoint. A diverged run (NaN/Inf, exit 2)
is a result, not a failure of the tool.

The curves are read back from each run's TensorBoard scalars (`lm loss`, `lm loss validation`,
`update-stall-fraction`, each over iterations and, as `<name> vs samples`, over consumed samples; tokens are
samples x --seq-length). The output folder gets results.json (every curve, the machine, the commit and the
command), results.md (final validation loss and perplexity per mode x lr, mean ± std over seeds, the gap to
bf16-mp) and, when matplotlib is installed (optional), three PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_sr.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
MODES = ("bf16-sr", "bf16-mp", "bf16", "fp32")
REFERENCE = "bf16-mp"  # the gap column is against Megatron's mixed precision
SET_BY_THE_TOOL = ("--precision", "--seed", "--save", "--load", "--tensorboard-dir", "--bf16", "--fp16")
DONE = "done.json"


@dataclass(frozen=True)
class Run:
    mode: str
    lr_multiplier: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}_lr{self.lr_multiplier:g}x_seed{self.seed}"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the base YAML config (as pretrain_gpt.py --config)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--lr-multipliers", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0],
                        help="each run's --lr and --min-lr are the base config's times one of these")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--output", required=True, help="the results folder: results.json, results.md, PNGs")
    parser.add_argument("--runs-dir", help="where the runs (checkpoints, TensorBoard, logs) go; default OUTPUT/runs "
                                           "(keep them out of a committed results folder)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    parser.add_argument("--save-interval", type=int, default=200, help="checkpoint interval of every run")
    parser.add_argument("--stall-interval", type=int, default=10,
                        help="--log-update-stall-interval of every run (0: not measured)")
    args = parser.parse_args(argv[:cut])
    base = list(argv[cut + 1:])
    for flag in SET_BY_THE_TOOL:
        if flag in base:
            raise ValueError(f"{flag} after --: the tool sets it for every run (use --modes / --seeds / --output)")
    if args.jobs < 1 or args.save_interval < 1 or args.stall_interval < 0:
        raise ValueError("--jobs and --save-interval must be positive, --stall-interval >= 0")
    if any(m <= 0 for m in args.lr_multipliers):
        raise ValueError(f"--lr-multipliers must be positive, got {args.lr_multipliers}")
    return args, (["--config", args.config] if args.config else []) + base


def base_settings(base: list[str]) -> dict:
    """The base config's lr, min-lr and sequence length (parsed as pretrain_gpt.py would)."""
    from megatron_sr.config import parse_config

    cfg = parse_config(base)
    return {"lr": cfg.optimizer.lr, "min_lr": cfg.optimizer.min_lr, "seq_length": cfg.model.seq_length,
            "train_iters": cfg.training.train_iters}


def run_command(run: Run, base: list[str], settings: dict, args: argparse.Namespace, run_dir: Path) -> list[str]:
    ckpt = str(run_dir / "ckpt")
    return [sys.executable, str(REPO / "pretrain_gpt.py"), *base, "--precision", run.mode,
            "--lr", f"{settings['lr'] * run.lr_multiplier:.6g}",
            "--min-lr", f"{settings['min_lr'] * run.lr_multiplier:.6g}", "--seed", str(run.seed),
            "--save", ckpt, "--load", ckpt, "--save-interval", str(args.save_interval),
            "--tensorboard-dir", str(run_dir / "tb"), "--log-update-stall-interval", str(args.stall_interval)]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def diverged(returncode: int, stderr_tail: str) -> bool:
    """pretrain_gpt.py stops with exit 2 and a line naming NaN/Inf when training diverges."""
    return returncode == 2 and "NaN/Inf" in stderr_tail


def execute(run: Run, command: list[str], run_dir: Path, threads: int) -> dict:
    """One pretrain_gpt.py process (resuming from its checkpoint), its output in run_dir/log.txt; the marker
    is written only once it ended as a result (trained through, or diverged)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"  # log.txt follows the run as it goes
    start = time.time()
    with open(run_dir / "log.txt", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(proc.stderr)
    tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
    outcome = {"returncode": proc.returncode, "seconds": round(time.time() - start, 1), "stderr_tail": tail,
               "command": command[2:]}
    if proc.returncode == 0 or diverged(proc.returncode, tail):
        outcome["status"] = "ok" if proc.returncode == 0 else "diverged"
        write_atomically(run_dir / DONE, json.dumps(outcome, indent=1))
    else:
        outcome["status"] = "failed"
    return outcome


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run's event files; a step written twice (a resumed run repeats the iterations after its
    last checkpoint) keeps the later file's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def curve(scalars: dict[str, dict[int, float]], name: str, seq_length: int) -> list[dict]:
    """[{iteration, tokens, value}] of one scalar, pairing `name` (over iterations) with `name vs samples`."""
    by_iteration, by_samples = scalars.get(name, {}), scalars.get(f"{name} vs samples", {})
    samples = sorted(by_samples)
    return [{"iteration": it, "tokens": s * seq_length, "value": by_iteration[it]}
            for it, s in zip(sorted(by_iteration), samples)]


def collect(run: Run, run_dir: Path, seq_length: int) -> dict:
    marker = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).exists() else {"status": "missing"}
    scalars = read_scalars(run_dir / "tb") if (run_dir / "tb").is_dir() else {}
    valid = curve(scalars, "lm loss validation", seq_length)
    final = valid[-1]["value"] if valid and marker["status"] == "ok" else float("nan")
    status = "diverged" if marker["status"] == "ok" and not math.isfinite(final) else marker["status"]
    return {"name": run.name, "mode": run.mode, "lr_multiplier": run.lr_multiplier, "seed": run.seed,
            "status": status, "seconds": marker.get("seconds"), "final_valid_loss": final,
            "train": curve(scalars, "lm loss", seq_length), "valid": valid,
            "update_stall": curve(scalars, "update-stall-fraction", seq_length)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(results: list[dict], modes: list[str], multipliers: list[float]) -> dict:
    """Per (mode, lr multiplier): the seeds' final validation losses, mean ± std, divergences; per mode its best
    lr multiplier (the lowest mean among those where no seed diverged)."""
    cells, best = {}, {}
    for mode in modes:
        for mult in multipliers:
            runs = [r for r in results if r["mode"] == mode and r["lr_multiplier"] == mult]
            finals = [r["final_valid_loss"] for r in runs if r["status"] == "ok"]
            cell = {"seeds": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs),
                    "missing": sum(r["status"] not in ("ok", "diverged") for r in runs), "finals": finals}
            if finals:
                cell["mean"], cell["std"] = mean_std(finals)
            cells[(mode, mult)] = cell
        usable = [m for m in multipliers if "mean" in cells[(mode, m)] and not cells[(mode, m)]["diverged"]]
        if usable:
            best[mode] = min(usable, key=lambda m: cells[(mode, m)]["mean"])
    return {"cells": cells, "best": best}


def paired_gaps(results: list[dict], modes: list[str], multipliers: list[float]) -> dict:
    """Per (mode, lr multiplier): the seed-by-seed differences of the final validation loss to REFERENCE at the
    same lr. A seed fixes the init, the data order and the validation samples, so the spread over seeds of a
    loss is mostly shared by the modes; the paired differences take that shared part out."""
    final = {(r["mode"], r["lr_multiplier"], r["seed"]): r["final_valid_loss"] for r in results if r["status"] == "ok"}
    out = {}
    for mode in (m for m in modes if m != REFERENCE):
        for mult in multipliers:
            diffs = [final[(mode, mult, s)] - final[(REFERENCE, mult, s)] for (m, k, s) in final
                     if m == mode and k == mult and (REFERENCE, mult, s) in final]
            if diffs:
                mean, std = mean_std(diffs)
                out[(mode, mult)] = {"diffs": diffs, "mean": mean, "std": std,
                                     "same_sign": all(d < 0 for d in diffs) or all(d > 0 for d in diffs)}
    return out


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" + (f" ± {std:.4f}" if math.isfinite(std) else "")


def late_stall(results: list[dict], mode: str, mult: float) -> float | None:
    """The mean update stall fraction over the last quarter of the run's samples, over the seeds."""
    values = []
    for r in results:
        if r["mode"] == mode and r["lr_multiplier"] == mult and r["update_stall"]:
            points = r["update_stall"]
            values += [p["value"] for p in points[len(points) * 3 // 4:] if math.isfinite(p["value"])]
    return statistics.fmean(values) if values else None


def markdown(summary: dict, results: list[dict], modes: list[str], multipliers: list[float], meta: dict) -> str:
    cells, best = summary["cells"], summary["best"]
    lines = [f"# Precision comparison{' (pilot)' if meta.get('label') else ''}", "",
             f"- machine: {meta['machine']}", f"- commit: {meta['commit']}", f"- command: `{meta['command']}`",
             f"- seeds: {meta['seeds']}; final validation loss (nats/token) is the mean ± sample std over the seeds "
             "that trained through; `diverged k/n` counts NaN/Inf runs", "",
             "| mode | " + " | ".join(f"lr {m:g}x" for m in multipliers) + " | best lr | ppl at best | "
             f"gap to {REFERENCE} at best | late update stall at best |",
             "|---|" + "---|" * (len(multipliers) + 4)]
    ref = cells.get((REFERENCE, best.get(REFERENCE)), {})
    for mode in modes:
        row = []
        for mult in multipliers:
            c = cells[(mode, mult)]
            text = fmt(c["mean"], c["std"]) if "mean" in c else "—"
            if c["diverged"]:
                text += f" (diverged {c['diverged']}/{c['seeds']})"
            if c["missing"]:
                text += f" ({c['missing']} not done)"
            row.append(text)
        if mode in best:
            c = cells[(mode, best[mode])]
            gap = f"{c['mean'] - ref['mean']:+.4f}" if "mean" in ref else "—"
            stall = late_stall(results, mode, best[mode])
            row += [f"{best[mode]:g}x", f"{math.exp(min(c['mean'], 20)):.2f}", gap,
                    f"{stall:.3f}" if stall is not None else "—"]
        else:
            row += ["—"] * 4
        lines.append(f"| {mode} | " + " | ".join(row) + " |")
    lines += ["", f"The gap is each mode's best mean minus {REFERENCE}'s best mean (negative: lower loss). The "
              "update stall is the fraction of weight updates (elements with a nonzero gradient) that left the "
              "stored weight unchanged, averaged over the last quarter of training.", ""]
    paired = paired_gaps(results, modes, multipliers)
    if paired:
        lines += [f"Gap to {REFERENCE} at the same lr, paired by seed (mean ± std of the per-seed differences; "
                  "n = seeds where both trained through; * = the same sign on every seed):", "",
                  "| mode | " + " | ".join(f"lr {m:g}x" for m in multipliers) + " |",
                  "|---|" + "---|" * len(multipliers)]
        for mode in (m for m in modes if m != REFERENCE):
            row = []
            for mult in multipliers:
                g = paired.get((mode, mult))
                row.append("—" if g is None else f"{g['mean']:+.4f}" + (f" ± {g['std']:.4f}" if math.isfinite(g["std"])
                                                                         else "")
                           + f" (n={len(g['diffs'])}){' *' if g['same_sign'] and len(g['diffs']) > 1 else ''}")
            lines.append(f"| {mode} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def plots(results: list[dict], summary: dict, modes: list[str], multipliers: list[float], out: Path) -> list[str]:
    """The three PNGs, or none (with one line) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare_precisions.py: matplotlib is not installed (pip install matplotlib): no plots")
        return []
    best, cells = summary["best"], summary["cells"]

    def mean_curve(mode: str, mult: float, key: str) -> tuple[list[float], list[float], list[float]]:
        runs = [r[key] for r in results if r["mode"] == mode and r["lr_multiplier"] == mult and r["status"] == "ok"]
        if not runs:
            return [], [], []
        n = min(len(c) for c in runs)
        tokens = [runs[0][i]["tokens"] for i in range(n)]
        stats = [mean_std([c[i]["value"] for c in runs]) for i in range(n)]
        return tokens, [m for m, _ in stats], [0.0 if not math.isfinite(s) else s for _, s in stats]

    def valid_panel(ax, key: str, late: bool) -> None:
        for mode in modes:
            if mode not in best:
                continue
            tokens, mean, std = mean_curve(mode, best[mode], key)
            if late:
                keep = [i for i, t in enumerate(tokens) if t >= 0.6 * tokens[-1]]
                tokens, mean, std = ([v[i] for i in keep] for v in (tokens, mean, std))
            ax.plot(tokens, mean, marker="." if len(tokens) < 30 else None, label=f"{mode} (lr {best[mode]:g}x)")
            ax.fill_between(tokens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_xlabel("tokens")
        ax.legend()

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    valid_panel(ax, "valid", late=False)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss vs tokens, each mode at its best lr (mean ± std over seeds)")
    written.append(_save(fig, out / "valid_loss_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        xs = [m for m in multipliers if "mean" in cells[(mode, m)]]
        ax.errorbar(xs, [cells[(mode, m)]["mean"] for m in xs],
                    yerr=[0.0 if not math.isfinite(cells[(mode, m)]["std"]) else cells[(mode, m)]["std"] for m in xs],
                    marker="o", capsize=3, label=mode)
        bad = [m for m in multipliers if cells[(mode, m)]["diverged"]]
        if bad:
            ax.scatter(bad, [ax.get_ylim()[1]] * len(bad), marker="x", s=80, color="red",
                       label=f"{mode} diverged")
    ax.set_xscale("log", base=2)
    ax.set_xticks(multipliers, [f"{m:g}x" for m in multipliers])
    ax.set_xlabel("learning-rate multiplier")
    ax.set_ylabel("final validation loss")
    ax.set_title("Final validation loss vs learning rate (x: diverged)")
    ax.legend()
    written.append(_save(fig, out / "final_loss_vs_lr.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    valid_panel(top, "valid", late=True)
    top.set_ylabel("validation loss")
    top.set_title("Late training: validation loss and the update stall fraction")
    for mode in modes:
        if mode in best:
            tokens, mean, _ = mean_curve(mode, best[mode], "update_stall")
            keep = [i for i, t in enumerate(tokens) if tokens and t >= 0.6 * tokens[-1]]
            bottom.plot([tokens[i] for i in keep], [mean[i] for i in keep], label=mode)
    bottom.set_xlabel("tokens")
    bottom.set_ylabel("updates rounded to no change")
    bottom.legend()
    written.append(_save(fig, out / "late_training_zoom.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path.name


def finite_or_none(value):
    """results.json stays strict JSON: NaN and Inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def publish(tool: str, out: Path, payload: dict, md: str, make_plots: Callable[[], list[str]],
            failed: list[str]) -> int:
    """A study's results folder: results.json (non-finite numbers as null), results.md, then the plots; a run
    that failed (not diverged) is an error after everything else is written."""
    write_atomically(out / "results.json", json.dumps(finite_or_none(payload), indent=1, allow_nan=False))
    write_atomically(out / "results.md", md)
    images = make_plots()
    print(f"{tool}: wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {out / name}" for name in images),
          flush=True)
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed (not diverged): {', '.join(failed)}; see their log.txt; "
                         "rerun the same command to retry them")
    return 0


def study(argv: list[str] | None = None) -> int:
    args, base = parse_args(argv)
    settings = base_settings(base)
    out = Path(args.output)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    out.mkdir(parents=True, exist_ok=True)  # --runs-dir elsewhere leaves OUTPUT uncreated until results.json
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = [Run(mode, mult, seed) for mult in args.lr_multipliers for mode in args.modes for seed in args.seeds]
    commands = {run: run_command(run, base, settings, args, runs_dir / run.name) for run in runs}
    todo = [run for run in runs if not (runs_dir / run.name / DONE).exists()]
    for run in runs:
        if run not in todo:
            done = json.loads((runs_dir / run.name / DONE).read_text())
            if done["command"] != commands[run][2:]:
                raise ValueError(f"--output {out}: run {run.name} was made with another command; use another "
                                 "--output (or delete that run)")
    print(f"compare_precisions.py: {len(runs)} runs, {len(runs) - len(todo)} done earlier, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    lock, failed, counter = threading.Lock(), [], iter(range(1, len(todo) + 1))

    def one(run: Run) -> None:
        outcome = execute(run, commands[run], runs_dir / run.name, threads)
        with lock:
            what = {"ok": "done", "diverged": "diverged (NaN/Inf)", "failed": "FAILED"}[outcome["status"]]
            print(f"[{next(counter)}/{len(todo)}] {run.name}: {what} in {outcome['seconds']:.0f} s"
                  + (f": {outcome['stderr_tail'].splitlines()[-1]}" if outcome["status"] == "failed"
                     and outcome["stderr_tail"] else ""), flush=True)
            if outcome["status"] == "failed":
                failed.append(run.name)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    results = [collect(run, runs_dir / run.name, settings["seq_length"]) for run in runs]
    summary = summarize(results, args.modes, args.lr_multipliers)
    meta = {"machine": machine(), "commit": commit(), "seeds": args.seeds,
            "command": shlex.join(["python3", "tools/compare_precisions.py", *(sys.argv[1:] if argv is None
                                                                                  else argv)]),
            "label": "pilot" if "pilot" in out.name else None, "base": settings}
    best = {mode: mult for mode, mult in summary["best"].items()}
    cells = [{"mode": mode, "lr_multiplier": mult, **cell} for (mode, mult), cell in summary["cells"].items()]
    paired = [{"mode": mode, "lr_multiplier": mult, **gap}
              for (mode, mult), gap in paired_gaps(results, args.modes, args.lr_multipliers).items()]
    payload = {**meta, "best_lr_multiplier": best, "cells": cells, "paired_gaps_to_reference": paired, "runs": results}
    return publish("compare_precisions.py", out, payload,
                   markdown(summary, results, args.modes, args.lr_multipliers, meta),
                   lambda: plots(results, summary, args.modes, args.lr_multipliers, out), failed)


if __name__ == "__main__":
    sys.exit(run_tool("compare_precisions.py", study))
