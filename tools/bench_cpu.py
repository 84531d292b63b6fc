#!/usr/bin/env python3
"""CPU training and optimizer-step benchmark against a plain PyTorch GPT (issue 17), side by side in one run.

    python3 tools/bench_cpu.py                          # the table below, 3 rounds, JSON + markdown
    python3 tools/bench_cpu.py --rows plain-bf16,pretrain-bf16-sr --iters 10 --rounds 1
    python3 tools/bench_cpu.py --tree ../old-checkout --output bench/results/cpu_small_gpt_before  # other code

The shape is the issue's: GPT with 4 layers, hidden 128, 4 heads, sequence 128, micro-batch 16,
vocabulary 1024 (0.94M parameters), mock data, on `--threads` CPU threads (default 2).

Rows, each measured in its own process (a clean allocator and thread pool), the rounds interleaved so
that a burst of load on a shared machine spreads over all rows instead of hitting one:
- plain-fp32 / plain-bf16: the yardstick, a nanoGPT-style model written here in plain PyTorch
  (learned positions, pre-norm blocks, tied LM head, F.scaled_dot_product_attention, nanoGPT's exact
  GELU, no dropout), torch.optim.AdamW(foreach=True) with nanoGPT's decay groups, clip_grad_norm_(1.0);
  plain-bf16 holds its parameters (and so its Adam states) in BF16, rounded to nearest by torch, and
  computes its linear layers and attention in FP32 from the BF16 operands, rounding their outputs to
  BF16 (a BF16 tensor core's arithmetic, and the only fast way on a CPU without BF16 matrix units);
  plain-*-tanh is the same with the tanh approximation of GELU, the MLP activation of Megatron's GPT
  (its bias-GELU fusion) and so of pretrain_gpt.py: the same model definition, so the difference to it
  is the project's own cost; plain-bf16-native is plain-bf16 on torch's own BF16 CPU kernels (emulated
  on AVX2: for reference, at a fifth of the iterations);
- pretrain-<mode>: `megatron_sr.training.pretrain.pretrain(parse_config([...]))` with --mock-data and
  --precision <mode>, exactly what pretrain_gpt.py runs; an Observer takes the time between steps;
- step-<mode>: the optimizer's whole step() on that model's parameters (grad norm, clipping, AdamW)
  and, in the same process, the AdamW update alone (`adamw_step_` as the optimizer calls it);
- torch-adamw: torch.optim.AdamW(foreach=True) on FP32 parameters of the same shapes, and
  clip_grad_norm_(foreach=True) + that step.

Each row reports the median over its iterations (after the warm-up) per round, the median over rounds
and the best round (other processes on a shared machine only add time, so the quietest round is the
closest to the machine's own speed; with 2 threads a busy machine is far worse, as torch's OpenMP
regions wait for a descheduled thread). The targets are checked on both. The load average
(os.getloadavg) is recorded before and after each row, so read the numbers with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"layers": 4, "hidden": 128, "heads": 4, "seq": 128, "micro_batch": 16, "vocab": 1024}
MODES = ("fp32", "bf16-mp", "bf16-sr", "bf16")
ROWS = ("plain-fp32", "plain-bf16", "plain-fp32-tanh", "plain-bf16-tanh", "plain-bf16-native",
        *(f"pretrain-{m}" for m in MODES),
        *(f"step-{m}" for m in MODES), "torch-adamw")
# (row, over row, at most): the targets
PROFILE_ENV = "MEGATRON_SR_BENCH_PROFILE"
TARGETS = (("pretrain-bf16-sr", "plain-bf16", 1.10), ("pretrain-fp32", "plain-fp32", 1.05),
           ("update:step-bf16-sr", "torch-adamw", 2.0),
           # the same targets against the same model definition (tanh GELU), and the whole step
           ("pretrain-bf16-sr", "plain-bf16-tanh", 1.10), ("pretrain-fp32", "plain-fp32-tanh", 1.05),
           ("step-bf16-sr", "clip_and_step:torch-adamw", 2.0))


def shape_flags() -> list[str]:
    s = SHAPE
    return ["--num-layers", str(s["layers"]), "--hidden-size", str(s["hidden"]), "--num-attention-heads",
            str(s["heads"]), "--seq-length", str(s["seq"]), "--max-position-embeddings", str(s["seq"]),
            "--micro-batch-size", str(s["micro_batch"]), "--vocab-size", str(s["vocab"])]


def pretrain_argv(mode: str, iters: int) -> list[str]:
    return ["--mock-data", *shape_flags(), "--precision", mode, "--train-iters", str(iters), "--lr", "6e-4",
            "--min-lr", "6e-5", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--adam-beta2", "0.95",
            "--clip-grad", "1.0", "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "0",
            "--eval-iters", "1", "--log-interval", str(iters)]


# ---- --profile: torch.profiler over the timed iterations of a row ----

class ProfileWindow:
    """Profiles the iterations after the warm-up when MEGATRON_SR_BENCH_PROFILE names an output file: the self
    CPU time per operator, in ms per timed iteration, goes there as JSON. A no-op otherwise."""

    def __init__(self, warmup: int, iters: int):
        self.path, self.warmup, self.iters, self.done, self.prof = os.environ.get(PROFILE_ENV), warmup, iters, 0, None

    def after_iteration(self) -> None:
        if not self.path:
            return
        self.done += 1
        if self.done == self.warmup:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        elif self.done == self.warmup + self.iters and self.prof is not None:
            self.prof.__exit__(None, None, None)
            ops = {e.key: e.self_cpu_time_total / 1e3 / self.iters for e in self.prof.key_averages()}
            Path(self.path).write_text(json.dumps(ops))


def profile_table(rows: list[str], ops: dict[str, dict[str, float]], top: int = 25) -> str:
    """The operators with the largest self CPU time in any row, ms per iteration, and each row's difference
    to the first row."""
    first = ops[rows[0]]
    names = sorted({k for r in rows for k in ops[r]}, key=lambda k: -max(ops[r].get(k, 0.0) for r in rows))[:top]
    head = "| operator | " + " | ".join(rows) + " | " + " | ".join(f"{r} - {rows[0]}" for r in rows[1:]) + " |"
    lines = [head, "|---" * (2 * len(rows)) + "|"]
    for name in names + ["total"]:
        vals = [sum(ops[r].values()) if name == "total" else ops[r].get(name, 0.0) for r in rows]
        base = sum(first.values()) if name == "total" else first.get(name, 0.0)
        lines.append(f"| {name[:60]} | " + " | ".join(f"{v:.2f}" for v in vals) + " | "
                     + " | ".join(f"{v - base:+.2f}" for v in vals[1:]) + " |")
    return "\n".join(lines)


# ---- the plain PyTorch yardstick (nanoGPT's structure, written for this benchmark) ----

def plain_gpt(dtype, fp32_compute: bool = False, gelu: str = "none"):
    """nanoGPT's GPT in this benchmark's shape; fp32_compute: linear layers and attention in FP32 from the
    (BF16) operands, outputs rounded back to the parameter dtype; gelu: F.gelu's `approximate`."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    s = SHAPE
    h, heads = s["hidden"], s["heads"]

    def linear(layer, x):
        if not fp32_compute:
            return layer(x)
        b = layer.bias.float() if layer.bias is not None else None
        return F.linear(x.float(), layer.weight.float(), b).to(x.dtype)

    def attention(q, k, v):
        if not fp32_compute:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.c_attn, self.attn_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = linear(self.c_attn, self.ln_1(x)).split(h, dim=2)
            q, k, v = (z.view(b, t, heads, h // heads).transpose(1, 2) for z in (q, k, v))
            y = attention(q, k, v).transpose(1, 2).reshape(b, t, h)
            x = x + linear(self.attn_proj, y)
            return x + linear(self.mlp_proj, F.gelu(linear(self.c_fc, self.ln_2(x)), approximate=gelu))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(s["vocab"], h), nn.Embedding(s["seq"], h)
            self.blocks = nn.ModuleList(Block() for _ in range(s["layers"]))
            self.ln_f = nn.LayerNorm(h)
            self.lm_head = nn.Linear(h, s["vocab"], bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as nanoGPT and Megatron's default
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02 / (2 * s["layers"]) ** 0.5 if name.endswith("proj.weight") else 0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            logits = linear(self.lm_head, self.ln_f(x))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    torch.manual_seed(1234)
    return GPT().to(dtype)


def measure_plain(variant: str, warmup: int, iters: int) -> dict:
    import torch

    dtype = torch.float32 if variant.startswith("fp32") else torch.bfloat16
    model = plain_gpt(dtype, fp32_compute=variant in ("bf16", "bf16-tanh"),
                      gelu="tanh" if variant.endswith("tanh") else "none")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), foreach=True)
    s = SHAPE
    gen = torch.Generator().manual_seed(0)
    times, cpu_times, losses = [], [], []
    window = ProfileWindow(warmup, iters)
    for _ in range(warmup + iters):
        t0, c0 = time.perf_counter(), time.process_time()
        data = torch.randint(0, s["vocab"], (s["micro_batch"], s["seq"] + 1), generator=gen)
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        window.after_iteration()
    return {"ms": statistics.median(times[warmup:]) * 1e3, "cpu_ms": statistics.median(cpu_times[warmup:]) * 1e3,
            "params": sum(p.numel() for p in params), "loss_first_last": [losses[0], losses[-1]]}


# ---- this project: pretrain(cfg), and its optimizer step ----

def measure_pretrain(mode: str, warmup: int, iters: int) -> dict:
    return time_pretrain(pretrain_argv(mode, warmup + iters), warmup, iters)


def time_pretrain(argv: list[str], warmup: int, iters: int) -> dict:
    """`pretrain(parse_config(argv))` (argv sets --train-iters to warmup + iters), timed between optimizer steps."""
    from megatron_sr.config import parse_config
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Timing(Observer):
        def __init__(self):
            self.times, self.cpu_times, self.paths, self.losses, self.params = [], [], set(), [], 0
            self.last = self.last_cpu = None
            self.window = ProfileWindow(warmup, iters)

        def log(self, message: str) -> None:
            pass

        def on_train_start(self, trainer) -> None:
            self.params = sum(p.numel() for c in trainer.model_chunks for p in c.parameters())
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step(self, iteration, loss, result) -> None:
            now, now_cpu = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            self.cpu_times.append(now_cpu - self.last_cpu)
            self.last, self.last_cpu = now, now_cpu
            self.paths.add(result.path)
            self.losses.append(loss)
            self.window.after_iteration()

    timing = Timing()
    pretrain(parse_config(argv), timing)
    return {"ms": statistics.median(timing.times[warmup:]) * 1e3,
            "cpu_ms": statistics.median(timing.cpu_times[warmup:]) * 1e3, "params": timing.params,
            "optimizer_path": sorted(p for p in timing.paths if p),
            "loss_first_last": [float(timing.losses[0]), float(timing.losses[-1])]}


def measure_step(mode: str, warmup: int, iters: int) -> dict:
    import torch

    import megatron_sr.optimizer.sr_adamw as sr_adamw
    from megatron_sr.config import parse_config
    from megatron_sr.training.setup import build

    trainer = build(parse_config(pretrain_argv(mode, 2)))
    opt = trainer.optimizer
    gen = torch.Generator().manual_seed(0)
    for p in (p for c in trainer.model_chunks for p in c.parameters()):
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)
    for g in opt.main_grads or []:
        g.copy_(torch.randn(g.shape, generator=gen) * 1e-2)
    inner, update = sr_adamw.adamw_step_, []

    def timed_update(*args, **kwargs):
        t0 = time.perf_counter()
        path = inner(*args, **kwargs)
        update[-1] += time.perf_counter() - t0
        return path

    sr_adamw.adamw_step_ = timed_update
    times, paths = [], set()
    for _ in range(warmup + iters):
        update.append(0.0)
        t0 = time.perf_counter()
        paths.add(opt.step().path)
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times[warmup:]) * 1e3, "update_ms": statistics.median(update[warmup:]) * 1e3,
            "params": opt.memory_bytes()["num_params"], "optimizer_path": sorted(p for p in paths if p)}


def measure_torch_adamw(warmup: int, iters: int) -> dict:
    import torch

    from megatron_sr.config import parse_config
    from megatron_sr.training.setup import build

    shapes = [p.shape for c in build(parse_config(pretrain_argv("fp32", 2))).model_chunks for p in c.parameters()]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    out = {"params": sum(p.numel() for p in params)}
    for name, fn in (("ms", opt.step),
                     ("clip_and_step_ms", lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
                                                   opt.step()))):
        times = []
        for _ in range(warmup + iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times[warmup:]) * 1e3
    return out


def child(row: str, warmup: int, iters: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    kind, _, arg = row.partition("-")
    if kind == "plain":
        return measure_plain(arg, warmup, max(1, iters // 5) if arg == "bf16-native" else iters)
    if kind == "pretrain":
        return measure_pretrain(arg, warmup, iters)
    if kind == "step":
        return measure_step(arg, warmup, 4 * iters)  # a step is short: more samples for the median
    if row == "torch-adamw":
        return measure_torch_adamw(warmup, 4 * iters)
    raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")


# ---- the parent: rounds of child processes, then the tables ----

def run_row(row: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.tree:  # the project's package from another checkout (e.g. before a change) ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.tree).resolve()), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", row, str(args.warmup), str(args.iters), str(args.threads)]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    result = run_child(cmd, env, args.timeout)
    if "error" not in result:
        result.update(load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2),
                      wall_s=round(time.monotonic() - t0, 1))
    return result


def run_child(cmd: list[str], env: dict, timeout: float) -> dict:
    """A benchmark's child process: the JSON of its last `RESULT ` line, or {"error": its last lines}."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
        return {"error": " | ".join(tail)[:500]}
    return json.loads(found[-1][7:])


def write_results(output: str, data: dict, md: str) -> None:
    """OUTPUT.json and OUTPUT.md, each written under a temporary name and renamed in; the table printed."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=1) + "\n"), (".md", md)):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))
    print(md)


def summarise(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[0]["error"]}
    out = {k: v for k, v in ok[0].items() if not isinstance(v, float) or k.startswith("load")}
    for key in ("ms", "cpu_ms", "update_ms", "clip_and_step_ms"):
        if key in ok[0]:
            values = [r[key] for r in ok]
            out[key] = statistics.median(values)
            out[f"best_{key}"] = min(values)  # the quietest round: load on a shared machine only adds time
            out[f"{key}_rounds"] = [round(v, 2) for v in values]
    out["load"] = [[r["load_before"], r["load_after"]] for r in ok]
    return out


def value_of(results: dict, name: str, best: bool = False) -> float | None:
    key, _, row = name.rpartition(":")
    res = results.get(row or name, {})
    return res.get(("best_" if best else "") + (f"{key}_ms" if key else "ms"))


def target_lines(results: dict) -> list[dict]:
    """Each target on the medians over rounds and on the best rounds."""
    lines = []
    for row, base, limit in TARGETS:
        a, b = value_of(results, row), value_of(results, base)
        if a is None or b is None:
            continue
        best = value_of(results, row, best=True) / value_of(results, base, best=True)
        lines.append({"row": row, "over": base, "ratio": round(a / b, 3), "best_ratio": round(best, 3),
                      "target": limit, "met": a / b <= limit, "met_best": best <= limit})
    return lines


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def commit(tree: Path = REPO) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+uncommitted" if dirty else "")


def markdown(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    m = meta["machine"]
    lines = [f"CPU benchmark: {m['cpu']}, {meta['threads']} threads ({m['logical_cpus']} logical CPUs), torch "
             f"{m['torch']} ({m['cpu_capability']}), commit {meta['commit']}, {meta['date']}", "",
             f"`{meta['command']}`", "",
             f"Shape: {SHAPE}; {meta['warmup']} warm-up + {meta['iters']} timed iterations per round, "
             f"{meta['rounds']} rounds (median of the rounds' medians). Load average (1 min) during the run: "
             f"{meta['load_range'][0]:.1f} to {meta['load_range'][1]:.1f}.", "",
             "| run | ms/iter (median) | best round | per round | CPU ms/iter | vs plain (median, best) | "
             "vs plain-tanh (median, best) | optimizer path |", "|---|---|---|---|---|---|---|---|"]
    for row in (r for r in ROWS if r.startswith(("plain", "pretrain")) and r in results):
        res = results[row]
        if "error" in res:
            lines.append(f"| {row} | error: {res['error'][:120]} | | | | | | |")
            continue
        ratios = []
        for suffix in ("", "-tanh"):
            base = results.get(("plain-fp32" if row.endswith("fp32") else "plain-bf16") + suffix, {})
            ok = base.get("ms") and row.startswith("pretrain")
            ratios.append(f"{res['ms'] / base['ms']:.2f}x, {res['best_ms'] / base['best_ms']:.2f}x" if ok else "")
        lines.append(f"| {row} | {res['ms']:.1f} | {res['best_ms']:.1f} | {res['ms_rounds']} | {res['cpu_ms']:.1f} | "
                     f"{ratios[0]} | {ratios[1]} | {','.join(res.get('optimizer_path', []))} |")
    lines += ["", "| optimizer step | step() ms | AdamW update ms | update ns/param | path |", "|---|---|---|---|---|"]
    for row in (r for r in ROWS if r.startswith(("step", "torch")) and r in results):
        res = results[row]
        if "error" in res:
            lines.append(f"| {row} | error: {res['error'][:120]} | | | |")
            continue
        if row == "torch-adamw":
            lines.append(f"| torch.optim.AdamW(foreach=True), FP32 | {res['clip_and_step_ms']:.2f} (with "
                         f"clip_grad_norm_) | {res['ms']:.2f} | {1e6 * res['ms'] / res['params']:.2f} | |")
            continue
        lines.append(f"| {row} | {res['ms']:.2f} | {res['update_ms']:.2f} | "
                     f"{1e6 * res['update_ms'] / res['params']:.2f} | {','.join(res['optimizer_path'])} |")
    if data["targets"]:
        lines += ["", "| target | ratio (medians) | ratio (best rounds) | at most | met (medians, best) |",
                  "|---|---|---|---|---|"]
        for t in data["targets"]:
            lines.append(f"| {t['row']} / {t['over']} | {t['ratio']:.2f} | {t['best_ratio']:.2f} | {t['target']} | "
                         f"{'yes' if t['met'] else 'no'}, {'yes' if t['met_best'] else 'no'} |")
    return "\n".join(lines) + "\n"


def profile_rows(rows: list[str], args) -> int:
    ops = {}
    for row in rows:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ops.json"
            os.environ[PROFILE_ENV] = str(out)
            res = run_row(row, args)
            del os.environ[PROFILE_ENV]
            if "error" in res or not out.exists():
                print(f"{row}: {res.get('error', 'no profile written (only plain-* and pretrain-* rows profile)')}")
                return 1
            ops[row] = json.loads(out.read_text())
            print(f"{row}: {res['ms']:.1f} ms/iter under the profiler", flush=True)
    print(profile_table(rows, ops))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        row, warmup, iters, threads = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print("RESULT " + json.dumps(child(row, warmup, iters, threads)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(r for r in ROWS if r != "plain-bf16-native"),
                   help=f"comma-separated rows of {', '.join(ROWS)} (default: all but plain-bf16-native)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per round (optimizer rows: 4x)")
    p.add_argument("--warmup", type=int, default=5, help="iterations before the timed ones")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in every row")
    p.add_argument("--timeout", type=float, default=900, help="seconds one row may take")
    p.add_argument("--tree", help="run the project's rows on the package of this checkout (PYTHONPATH)")
    p.add_argument("--profile", action="store_true",
                   help="one round of --rows under torch.profiler: self CPU ms per iteration by operator, each row "
                        "against the first (plain-* and pretrain-* rows; nothing is written)")
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "cpu_small_gpt"),
                   help="results path without suffix (.json and .md are written)")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; expected some of {', '.join(ROWS)}")
    if args.profile:
        return profile_rows(rows, args)
    loads = [os.getloadavg()[0]]
    measured: dict[str, list[dict]] = {r: [] for r in rows}
    for k in range(args.rounds):
        for row in rows:
            measured[row].append(run_row(row, args))
            loads.append(os.getloadavg()[0])
            res = measured[row][-1]
            print(f"round {k + 1} {row}: " + (f"{res['ms']:.2f} ms" if "ms" in res else res.get("error", "")),
                  flush=True)
    results = {row: summarise(rs) for row, rs in measured.items()}
    tree = Path(args.tree).resolve() if args.tree else REPO
    data = {"meta": {"machine": machine(), "commit": commit(tree), "tree": str(tree),
                     "date": time.strftime("%Y-%m-%d %H:%M"),
                     "command": "python3 tools/bench_cpu.py " + " ".join(argv), "threads": args.threads,
                     "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
                     "load_range": [min(loads), max(loads)], "shape": SHAPE},
            "results": results, "targets": target_lines(results)}
    write_results(args.output, data, markdown(data))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
