#!/usr/bin/env python3
"""The low-bit study: batch size x quantization scheme, at a fixed number of steps and at a fixed token budget,
with the gradient variance of each scheme (README, "Low-bit study"; issue 16).

    python3 tools/batch_size_study.py --output study --runs-dir /tmp/runs --batch-sizes 8 32 128 \
        --schemes base fp8-rn fp8-sr w4-sr a4-sr g4-sr --seeds 1 2 3 --steps 100 --jobs 2 \
        -- --data-path data/wiki_text_document --tokenizer-model data/tok.model --num-layers 2 ...

A scheme is NAME (one of the presets, `--list-schemes`) or NAME=FLAGS, FLAGS being --quant-* flags of
pretrain_gpt.py (`fp8x="--quant-fwd-weight fp:e4m3:sr"`). The first scheme is the baseline and must be `base`
(no quantization point). Every (scheme, batch B, seed) is trained twice: for --steps iterations (fixed steps)
and for steps * B_max / B iterations (fixed tokens: the largest batch's samples); at B_max the two are one
run. B is --global-batch-size with a fixed --micro-batch-size (gradient accumulation), so every batch size
trains the same model the same way; the lr schedule is the base config's over each run's own iterations (give
--lr-warmup-fraction rather than --lr-warmup-iters for a warmup that scales with them). Every run's
validation uses the same eval_iters x B_max samples (--eval-iters is scaled by B_max / B), so the final
validation losses of different batch sizes are measured on the same data.

Runs are pretrain_gpt.py processes (tools/compare_precisions.py's runner: resumable, a finished run is not
run again, an interrupted one restarts from its checkpoint). The final validation loss is read from each
run's TensorBoard scalars (`lm loss validation`).

The gradient variance is measured in this process after the runs (or alone, --variance-only): the model state
is the baseline's final checkpoint of the fixed-steps run at B_max with the first seed, the same for every
scheme, loaded with --finetune in --precision fp32 (so the gradients are not rounded again after the
quantization points: the only difference between schemes is the points). For each batch size B, K disjoint
batches of B training samples (the first K * B samples of the training split; the same samples for every
scheme) give K mean gradients g_k (one forward_backward over B / micro-batch micro-batches at step
iteration + 1 + k, so stochastic points draw fresh bits for every k). With g_mean the mean of the K base
(unquantized) gradients at that B, the table holds per (scheme, B): variance = mean_k ||g_k - g_mean||^2
(summed over all parameters), the same for the base gradients (the reference), and bias = ||mean_k g_k -
g_mean||^2. The variance results are cached in RUNS_DIR/variance.json.

The output folder gets results.json (every run's final validation loss and curves, the tables, the variance,
the machine, the commit and the command), results.md and, when matplotlib is installed, three PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from compare_precisions import (
    DONE,
    commit,
    curve,
    execute,
    machine,
    mean_std,
    publish,
    read_scalars,
    write_atomically,
)

from megatron_sr.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
BASELINE = "base"
SET_BY_THE_TOOL = ("--global-batch-size", "--train-iters", "--train-samples", "--seed", "--save", "--load",
                   "--tensorboard-dir", "--lr-decay-iters", "--lr-decay-samples", "--rampup-batch-size",
                   "--finetune")
QUANT_FLAGS = ("--quant-fwd-input", "--quant-fwd-weight", "--quant-bwd-input", "--quant-bwd-weight",
               "--quant-bwd-grad-dgrad", "--quant-bwd-grad-wgrad")
INPUTS, WEIGHTS, GRADS = QUANT_FLAGS[0:4:2], QUANT_FLAGS[1:4:2], QUANT_FLAGS[4:]  # x, W, dL/dy at their points


def _points(flags: tuple[str, ...], fmt: str) -> str:
    return " ".join(f"{flag} {fmt}" for flag in flags)


def _fp8(rounding: str) -> str:
    return (_points(QUANT_FLAGS[:4], f"fp:e4m3:{rounding}") + " "
            + _points(GRADS, f"fp:e5m2:{rounding}"))


PRESETS = {
    "base": "",
    "fp8-rn": _fp8("rn"), "fp8-sr": _fp8("sr"),  # E4M3 weights and activations, E5M2 gradients (unscaled)
    **{f"{what}4-{r}": _points(flags, f"int:b4:row:{r}")
       for r in ("sr", "rn") for what, flags in (("w", WEIGHTS), ("a", INPUTS), ("g", GRADS))},
    **{f"int4-{r}": _points(QUANT_FLAGS, f"int:b4:row:{r}") for r in ("sr", "rn")},
    **{f"int8-{r}": _points(QUANT_FLAGS, f"int:b8:row:{r}") for r in ("sr", "rn")},
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Run:
    scheme: str
    batch_size: int
    iterations: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.scheme}_b{self.batch_size}_it{self.iterations}_seed{self.seed}"


def parse_scheme(text: str) -> tuple[str, list[str]]:
    """NAME (a preset) or NAME=FLAGS: (name, its --quant-* flags)."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not NAME.match(name):
        raise ValueError(f"--schemes {text!r}: a name is letters, digits and . _ + - (then optionally =FLAGS)")
    if not sep:
        if name not in PRESETS:
            raise ValueError(f"--schemes {name!r}: not a preset (one of {', '.join(PRESETS)}); give NAME=FLAGS "
                             "for another scheme")
        flags = PRESETS[name]
    words = shlex.split(flags)
    for flag in words[0::2]:
        if flag not in QUANT_FLAGS:
            raise ValueError(f"--schemes {name}: {flag!r} is not a quantization flag (expected FLAG FORMAT pairs "
                             f"of {', '.join(QUANT_FLAGS)})")
    if len(words) % 2:
        raise ValueError(f"--schemes {name}: {words[-1]} has no format")
    return name, words


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="the results folder: results.json, results.md, PNGs (required)")
    parser.add_argument("--runs-dir", help="where the runs (checkpoints, TensorBoard, logs) go; default OUTPUT/runs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--micro-batch-size", type=int,
                        help="every run's --micro-batch-size (default: the smallest batch size)")
    parser.add_argument("--schemes", nargs="+", default=["base", "fp8-rn", "fp8-sr", "w4-sr", "a4-sr", "g4-sr"],
                        help="NAME (a preset) or NAME=FLAGS; the first is the baseline and must be `base`")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=100, help="iterations of the fixed-steps budget")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    parser.add_argument("--save-interval", type=int, default=500, help="checkpoint interval of every run")
    parser.add_argument("--variance-batches", type=int, default=16,
                        help="K, the batches per (scheme, batch size) of the gradient variance (0: not measured)")
    parser.add_argument("--variance-only", action="store_true",
                        help="train nothing: the gradient variance (and the tables of the runs already done)")
    parser.add_argument("--list-schemes", action="store_true", help="print the presets and exit")
    args = parser.parse_args(argv[:cut])
    base = list(argv[cut + 1:])
    if args.output is None and not args.list_schemes:
        raise ValueError("--output is required (the results folder)")
    for flag in SET_BY_THE_TOOL + QUANT_FLAGS:
        if any(word == flag or word.startswith(flag + "=") for word in base):
            raise ValueError(f"{flag} after --: the tool sets it for every run (use --batch-sizes / --steps / "
                             "--seeds / --schemes)")
    check_args(args)
    return args, base


def check_args(args: argparse.Namespace) -> None:
    sizes = args.batch_sizes
    if args.micro_batch_size is None:
        args.micro_batch_size = min(sizes)
    if min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch-sizes must be distinct and positive, got {sizes}")
    for b in sizes:
        if b % args.micro_batch_size:
            raise ValueError(f"--batch-sizes {b} is not a multiple of the micro-batch size {args.micro_batch_size}")
        if max(sizes) % b:
            raise ValueError(f"--batch-sizes {b} does not divide the largest, {max(sizes)} (the fixed-token "
                             "budget needs a whole number of iterations)")
    if args.steps < 1 or args.jobs < 1 or args.save_interval < 1 or args.variance_batches < 0:
        raise ValueError("--steps, --jobs and --save-interval must be positive, --variance-batches >= 0")
    args.batch_sizes = sorted(sizes)
    args.scheme_flags = dict(parse_scheme(s) for s in args.schemes)
    if len(args.scheme_flags) != len(args.schemes):
        raise ValueError(f"--schemes {' '.join(args.schemes)}: a name is given twice")
    names = list(args.scheme_flags)
    if names[0] != BASELINE or args.scheme_flags[BASELINE]:
        raise ValueError(f"--schemes: the first scheme is the baseline and must be `{BASELINE}` (no quantization), "
                         f"got {names[0]!r}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")


def base_settings(base: list[str], args: argparse.Namespace) -> dict:
    """The base config (parsed as pretrain_gpt.py would, at the largest batch) and every scheme's flags checked
    by the config's own parser, so a bad format is a one-line error before any run starts."""
    from megatron_sr.config import parse_config

    def config(extra: list[str]):
        return parse_config(base + ["--global-batch-size", str(max(args.batch_sizes)), "--micro-batch-size",
                                    str(args.micro_batch_size), "--train-iters", str(args.steps)] + extra)

    cfg = config([])
    for name, flags in args.scheme_flags.items():
        try:
            config(flags)
        except ValueError as exc:
            raise ValueError(f"--schemes {name}: {exc}") from None
    return {"seq_length": cfg.model.seq_length, "eval_iters": cfg.training.eval_iters,
            "precision": cfg.optimizer.precision}


def plan(args: argparse.Namespace) -> tuple[list[Run], dict[tuple[str, int, int, str], Run]]:
    """The runs (each once) and which run is each (scheme, batch, seed, budget)."""
    b_max, runs, cell = max(args.batch_sizes), {}, {}
    for seed in args.seeds:  # seed by seed: a study cut short has every scheme of its first seeds
        for scheme in args.scheme_flags:
            for b in args.batch_sizes:
                for budget, iters in (("steps", args.steps), ("tokens", args.steps * b_max // b)):
                    run = runs.setdefault(Run(scheme, b, iters, seed), Run(scheme, b, iters, seed))
                    cell[(scheme, b, seed, budget)] = run
    return list(runs), cell


def run_command(run: Run, base: list[str], args: argparse.Namespace, settings: dict, run_dir: Path) -> list[str]:
    ckpt = str(run_dir / "ckpt")
    eval_iters = settings["eval_iters"] * max(args.batch_sizes) // run.batch_size  # the same validation samples
    return [sys.executable, str(REPO / "pretrain_gpt.py"), *base, *args.scheme_flags[run.scheme],
            "--global-batch-size", str(run.batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--train-iters", str(run.iterations), "--eval-iters", str(eval_iters), "--seed", str(run.seed),
            "--save", ckpt, "--load", ckpt, "--save-interval", str(args.save_interval),
            "--tensorboard-dir", str(run_dir / "tb")]


def thin(points: list[dict], at_most: int = 100) -> list[dict]:
    """At most `at_most` evenly spaced points of a curve, the last one kept (results.json stays small)."""
    if len(points) <= at_most:
        return points
    step = len(points) / at_most
    keep = sorted({int(i * step) for i in range(at_most)} | {len(points) - 1})
    return [points[i] for i in keep]


def collect(run: Run, run_dir: Path, seq_length: int) -> dict:
    marker = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).exists() else {"status": "missing"}
    scalars = read_scalars(run_dir / "tb") if (run_dir / "tb").is_dir() else {}
    valid = curve(scalars, "lm loss validation", seq_length)
    final = valid[-1]["value"] if valid and marker["status"] == "ok" else float("nan")
    status = "diverged" if marker["status"] == "ok" and not math.isfinite(final) else marker["status"]
    return {"name": run.name, "scheme": run.scheme, "batch_size": run.batch_size, "iterations": run.iterations,
            "seed": run.seed, "status": status, "seconds": marker.get("seconds"), "final_valid_loss": final,
            "train": thin(curve(scalars, "lm loss", seq_length)), "valid": valid}


def train_all(runs: list[Run], commands: dict, runs_dir: Path, args: argparse.Namespace) -> list[str]:
    """Runs what is not done yet, `--jobs` at once, a line per run; the names of the runs that failed."""
    todo = [run for run in runs if not (runs_dir / run.name / DONE).exists()]
    for run in runs:
        if run not in todo:
            done = json.loads((runs_dir / run.name / DONE).read_text())
            if done["command"] != commands[run][2:]:
                raise ValueError(f"--runs-dir {runs_dir}: run {run.name} was made with another command; use "
                                 "another --runs-dir (or delete that run)")
    verb = "not run (--variance-only)" if args.variance_only else f"to run ({args.jobs} at a time)"
    print(f"batch_size_study.py: {len(runs)} runs, {len(runs) - len(todo)} done earlier, {len(todo)} {verb}",
          flush=True)
    if args.variance_only:
        return []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    lock, failed, counter = threading.Lock(), [], iter(range(1, len(todo) + 1))

    def one(run: Run) -> None:
        outcome = execute(run, commands[run], runs_dir / run.name, threads)
        with lock:
            what = {"ok": "done", "diverged": "diverged (NaN/Inf)", "failed": "FAILED"}[outcome["status"]]
            last = outcome["stderr_tail"].splitlines()[-1:] if outcome["status"] == "failed" else []
            print(f"[{next(counter)}/{len(todo)}] {run.name}: {what} in {outcome['seconds']:.0f} s"
                  + "".join(f": {line}" for line in last), flush=True)
            if outcome["status"] == "failed":
                failed.append(run.name)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    return failed


def loss_tables(results: dict[str, dict], cell: dict, args: argparse.Namespace) -> dict:
    """Per budget, scheme and batch: the seeds' final validation losses (mean ± std) and the gap to the baseline
    (mean ± std over seeds of the paired difference scheme - base with the same seed and batch)."""
    tables = {}
    for budget in ("steps", "tokens"):
        rows = {}
        for scheme in args.scheme_flags:
            for b in args.batch_sizes:
                finals, gaps = [], []
                for seed in args.seeds:
                    mine = results[cell[(scheme, b, seed, budget)].name]
                    ref = results[cell[(BASELINE, b, seed, budget)].name]
                    if mine["status"] == "ok":
                        finals.append(mine["final_valid_loss"])
                        if ref["status"] == "ok":
                            gaps.append(mine["final_valid_loss"] - ref["final_valid_loss"])
                entry = {"finals": finals, "gaps": gaps,
                         "not_ok": sum(results[cell[(scheme, b, s, budget)].name]["status"] != "ok"
                                       for s in args.seeds),
                         "iterations": cell[(scheme, b, args.seeds[0], budget)].iterations}
                if finals:
                    entry["mean"], entry["std"] = mean_std(finals)
                if gaps:
                    entry["gap_mean"], entry["gap_std"] = mean_std(gaps)
                rows[f"{scheme}|{b}"] = entry
        tables[budget] = rows
    return tables


# --- gradient variance ------------------------------------------------------------------------------------


def variance_stats(quantized: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """quantized, reference: [K, P] flattened mean gradients of K batches (the scheme's and the unquantized ones
    on the same batches). With g_mean = the mean of the reference rows: variance = mean_k ||q_k - g_mean||^2,
    reference_variance = mean_k ||r_k - g_mean||^2, bias = ||mean_k q_k - g_mean||^2 (in FP64)."""
    q, r = quantized.double(), reference.double()
    g_mean = r.mean(0)
    variance = float(((q - g_mean) ** 2).sum(1).mean())
    ref_variance = float(((r - g_mean) ** 2).sum(1).mean())
    bias = float(((q.mean(0) - g_mean) ** 2).sum())
    return {"variance": variance, "reference_variance": ref_variance, "extra_variance": variance - ref_variance,
            "bias": bias}


def micro_batches(dataset, first: int, count: int, micro: int):
    """Micro-batches {"tokens": [micro, s+1]} of samples first .. first + count - 1, in order."""
    for start in range(first, first + count, micro):
        yield {"tokens": torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(start, start + micro)])}


def batch_gradients(trainer, dataset, batch_size: int, k_batches: int, micro: int, step0: int) -> torch.Tensor:
    """[K, P]: the mean gradient of each of K disjoint batches (samples k*B .. (k+1)*B - 1), flattened (FP32)."""
    rows = []
    for k in range(k_batches):
        trainer.optimizer.zero_grad()
        iterator = micro_batches(dataset, k * batch_size, batch_size, micro)
        trainer.forward_backward(trainer.model_chunks, iterator, batch_size // micro, False, step=step0 + k)
        rows.append(torch.cat([g.detach().reshape(-1).float().cpu() for g in trainer.optimizer.grads()]))
    trainer.optimizer.zero_grad()
    return torch.stack(rows)


def variance_config(base: list[str], flags: list[str], ckpt: Path, args: argparse.Namespace):
    from megatron_sr.config import parse_config

    b_max = max(args.batch_sizes)
    return parse_config(base + flags + ["--precision", "fp32", "--seed", str(args.seeds[0]), "--load", str(ckpt),
                                        "--finetune", "--no-load-optim", "--global-batch-size", str(b_max),
                                        "--micro-batch-size", str(args.micro_batch_size),
                                        "--train-iters", str(args.variance_batches), "--eval-iters", "0"])


def measure_variance(base: list[str], ckpt: Path, args: argparse.Namespace) -> dict:
    """{scheme: {B: stats}} at the checkpoint's weights (see the module docstring)."""
    from megatron_sr.checkpoint import read_latest_iteration
    from megatron_sr.training.iterators import build_datasets
    from megatron_sr.training.setup import build

    iteration = read_latest_iteration(ckpt)
    if iteration is None:
        raise ValueError(f"{ckpt}: no checkpoint of the baseline run (train it first: drop --variance-only)")
    k, micro = args.variance_batches, args.micro_batch_size
    dataset = None
    gradients: dict[str, dict[int, torch.Tensor]] = {}
    for scheme, flags in args.scheme_flags.items():
        cfg = variance_config(base, flags, ckpt, args)
        trainer = build(cfg)
        if trainer.load() is None:
            raise ValueError(f"{ckpt}: the checkpoint could not be loaded")
        if dataset is None:
            dataset = build_datasets(cfg)[0]
        gradients[scheme] = {b: batch_gradients(trainer, dataset, b, k, micro, iteration + 1)
                             for b in args.batch_sizes}
        print(f"batch_size_study.py: gradient variance of {scheme}: {k} batches at each of "
              f"{' '.join(map(str, args.batch_sizes))}", flush=True)
    return {scheme: {str(b): variance_stats(gradients[scheme][b], gradients[BASELINE][b]) for b in args.batch_sizes}
            for scheme in args.scheme_flags}


def variance(base: list[str], runs_dir: Path, cell: dict, args: argparse.Namespace) -> dict | None:
    """The variance table, from the cache in runs_dir when it was measured with the same settings."""
    if args.variance_batches == 0:
        return None
    run = cell[(BASELINE, max(args.batch_sizes), args.seeds[0], "steps")]
    ckpt = runs_dir / run.name / "ckpt"
    key = {"checkpoint": str(ckpt), "batches": args.variance_batches, "micro_batch_size": args.micro_batch_size,
           "base": base, "schemes": args.scheme_flags}
    cache = runs_dir / "variance.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key and (runs_dir / run.name / DONE).exists():
            print("batch_size_study.py: gradient variance measured earlier", flush=True)
            return saved["table"]
    table = {"model_state": f"{run.name} (its final checkpoint), --precision fp32", **key,
             "table": measure_variance(base, ckpt, args)}
    write_atomically(cache, json.dumps({"key": key, "table": table}, indent=1))
    return table


# --- outputs ----------------------------------------------------------------------------------------------


def fmt(mean: float, std: float, digits: int = 4, sign: bool = False) -> str:
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def markdown(tables: dict, var: dict | None, args: argparse.Namespace, meta: dict) -> str:
    sizes, b_max = args.batch_sizes, max(args.batch_sizes)
    lines = ["# Batch size x quantization scheme", "", f"- machine: {meta['machine']}", f"- commit: {meta['commit']}",
             f"- command: `{meta['command']}`",
             f"- seeds {' '.join(map(str, args.seeds))}; micro-batch {args.micro_batch_size}; final validation loss "
             f"(nats/token) on the same {meta['eval_samples']} validation samples for every run; mean ± sample std "
             "over seeds; the gap is scheme - base with the same seed and batch (mean ± std of those differences)",
             "", "Schemes:", ""]
    lines += [f"- `{name}`: " + (f"`{' '.join(flags)}`" if flags else "no quantization (the baseline)")
              for name, flags in args.scheme_flags.items()]
    for budget, title in (("steps", f"fixed steps ({args.steps} iterations at every batch size)"),
                          ("tokens", f"fixed tokens ({args.steps * b_max} samples: {args.steps} x {b_max}; batch B "
                                     f"runs {args.steps} x {b_max} / B iterations)")):
        rows = tables[budget]
        head = "| scheme | " + " | ".join(f"B={b}" for b in sizes) + " |"
        rule = "|---|" + "---|" * len(sizes)
        lines += ["", f"## Final validation loss, {title}", "", head, rule]
        for scheme in args.scheme_flags:
            lines.append(f"| {scheme} | " + " | ".join(_loss_cell(rows[f"{scheme}|{b}"]) for b in sizes) + " |")
        lines += ["", f"## Gap to {BASELINE}, {title}", "", head, rule]
        for scheme in list(args.scheme_flags)[1:]:
            lines.append(f"| {scheme} | " + " | ".join(
                fmt(c["gap_mean"], c["gap_std"], sign=True) if "gap_mean" in c else "—"
                for c in (rows[f"{scheme}|{b}"] for b in sizes)) + " |")
    if var is not None:
        table = var["table"]
        head = "| scheme | " + " | ".join(f"B={b}" for b in sizes) + " |"
        rule = "|---|" + "---|" * len(sizes)
        lines += ["", "## Gradient variance", "",
                  f"At one model state ({var['model_state']}), {var['batches']} disjoint batches per batch size "
                  "(the same samples for every scheme). Variance: mean over the batches of ||g_k - g_mean||^2 "
                  "summed over all parameters, g_mean the mean of the unquantized batch gradients; the base row is "
                  "the unquantized reference. Ratio: the scheme's variance / the reference's. Bias: ||mean_k g_k - "
                  "g_mean||^2.", "", "Variance:", "", head, rule]
        for scheme in args.scheme_flags:
            lines.append(f"| {scheme} | " + " | ".join(f"{table[scheme][str(b)]['variance']:.4g}" for b in sizes)
                         + " |")
        lines += ["", "Ratio to the unquantized variance / bias:", "", head, rule]
        for scheme in list(args.scheme_flags)[1:]:
            lines.append(f"| {scheme} | " + " | ".join(
                f"{s['variance'] / s['reference_variance']:.3f} / {s['bias']:.3g}"
                for s in (table[scheme][str(b)] for b in sizes)) + " |")
    lines.append("")
    return "\n".join(lines)


def _loss_cell(c: dict) -> str:
    text = fmt(c["mean"], c["std"]) if "mean" in c else "—"
    return text + (f" ({c['not_ok']} not ok)" if c["not_ok"] else "")


def plots(tables: dict, var: dict | None, args: argparse.Namespace, out: Path) -> list[str]:
    """gap_vs_batch_<budget>.png and grad_variance_vs_batch.png, or none (one line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("batch_size_study.py: matplotlib is not installed (pip install matplotlib): no plots")
        return []
    sizes, written = args.batch_sizes, []
    schemes = list(args.scheme_flags)[1:]
    families = list(dict.fromkeys(_family(s) for s in schemes))  # w4-sr and w4-rn: one colour, two line styles
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def style(scheme: str) -> dict:
        return {"marker": "o", "color": cycle[families.index(_family(scheme)) % len(cycle)],
                "linestyle": "--" if scheme.endswith("-rn") else "-"}

    for budget, title in (("steps", f"fixed steps ({args.steps} iterations)"),
                          ("tokens", f"fixed tokens ({args.steps} x {max(sizes)} samples)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, scheme in enumerate(schemes):
            cells = [tables[budget][f"{scheme}|{b}"] for b in sizes]
            xs = [b * (1.0 + 0.03 * (i - len(schemes) / 2)) for b, c in zip(sizes, cells) if "gap_mean" in c]
            got = [c for c in cells if "gap_mean" in c]
            ax.errorbar(xs, [c["gap_mean"] for c in got],
                        yerr=[c["gap_std"] if math.isfinite(c["gap_std"]) else 0.0 for c in got],
                        capsize=3, label=scheme, **style(scheme))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("global batch size")
        ax.set_ylabel(f"final validation loss - {BASELINE}")
        ax.set_title(f"Gap to the baseline, {title} (mean ± std over seeds)")
        ax.legend(fontsize=8, ncol=2)
        written.append(_save(fig, out / f"gap_vs_batch_{budget}.png"))
    if var is not None:
        table = var["table"]
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 7.5), sharex=True, height_ratios=(3, 2))
        ax.plot(sizes, [table[BASELINE][str(b)]["reference_variance"] for b in sizes], color="black", linewidth=2.5,
                marker="s", label="unquantized (base)")
        for scheme in schemes:
            ax.plot(sizes, [table[scheme][str(b)]["variance"] for b in sizes], label=scheme, **style(scheme))
            low.plot(sizes, [table[scheme][str(b)]["variance"] / table[scheme][str(b)]["reference_variance"]
                             for b in sizes], label=scheme, **style(scheme))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("mean ||g_k - g_mean||^2")
        ax.set_title("Gradient variance around the unquantized large-batch mean")
        ax.legend(fontsize=8, ncol=2)
        low.axhline(1.0, color="black", linewidth=0.8)
        low.set_xticks(sizes, [str(b) for b in sizes])
        low.set_xlabel("batch size")
        low.set_ylabel("ratio to unquantized")
        written.append(_save(fig, out / "grad_variance_vs_batch.png"))
    return written


def _family(scheme: str) -> str:
    """A scheme's name without its rounding suffix (-sr / -rn)."""
    return scheme[:-3] if scheme.endswith(("-sr", "-rn")) else scheme


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path.name


def study(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, base = parse_args(argv)
    if args.list_schemes:
        for name, flags in PRESETS.items():
            print(f"{name}: {flags or '(no quantization)'}")
        return 0
    settings = base_settings(base, args)
    out = Path(args.output)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs, cell = plan(args)
    commands = {run: run_command(run, base, args, settings, runs_dir / run.name) for run in runs}
    failed = train_all(runs, commands, runs_dir, args)
    results = {run.name: collect(run, runs_dir / run.name, settings["seq_length"]) for run in runs}
    tables = loss_tables(results, cell, args)
    var = variance(base, runs_dir, cell, args)
    meta = {"machine": machine(), "commit": commit(),
            "command": shlex.join(["python3", "tools/batch_size_study.py", *argv]),
            "eval_samples": settings["eval_iters"] * max(args.batch_sizes)}
    payload = {**meta, "batch_sizes": args.batch_sizes, "micro_batch_size": args.micro_batch_size,
               "steps": args.steps, "seeds": args.seeds, "schemes": args.scheme_flags, "base": base, "tables": tables,
               "gradient_variance": var, "runs": list(results.values())}
    return publish("batch_size_study.py", out, payload, markdown(tables, var, args, meta),
                   lambda: plots(tables, var, args, out), failed)


if __name__ == "__main__":
    sys.exit(run_tool("batch_size_study.py", study))
