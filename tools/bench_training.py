#!/usr/bin/env python3
"""End-to-end training throughput and peak memory per precision mode.

    python3 tools/bench_training.py                       # GPT-2 350M shape, seq 1024, bf16-sr/bf16-mp/bf16
    python3 tools/bench_training.py --modes bf16-sr --num-layers 2 --hidden-size 128 --iters 3   (smoke test)

Each mode runs in its own process (clean peak memory): the trainer pretrain_gpt.py builds
(megatron_sr.training.setup: model, SRAdamW with the fused SR kernel on CUDA when it builds,
forward_backward), on one fixed random batch on the device, so the data loader is not measured.
Writes JSON + a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args) -> dict:
    import torch

    from megatron_sr.config import parse_config
    from megatron_sr.training.forward_backward import make_forward_backward
    from megatron_sr.training.setup import build
    from megatron_sr.training.throughput import flops_per_iteration, peak_bf16_tflops

    argv = ["--mock-data", "--vocab-size", str(args.vocab_size), "--num-layers", str(args.num_layers),
            "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
            "--train-iters", str(args.warmup + args.iters), "--precision", args.mode,
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-4", "--weight-decay", "0.1"]
    if args.recompute_activations:
        argv.append("--recompute-activations")
    cfg = parse_config(argv)
    trainer = build(cfg)
    device, chunks, optimizer = trainer.device, trainer.model_chunks, trainer.optimizer
    forward_backward = (make_forward_backward(cfg, torch.compile(chunks[0]), device) if args.compile
                        else trainer.forward_backward)
    n_params = sum(p.numel() for p in optimizer.params)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"tokens": torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                                     device=device, generator=gen)}

    class Repeat:
        def __next__(self):
            return batch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad()
        out = forward_backward(chunks, Repeat(), 1, False)
        path = optimizer.step().path
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(out[0]["lm loss"]))
    step_s = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median
    tokens = args.micro_batch_size * args.seq_length
    vocab = chunks[0].vocab_size
    model_flops = flops_per_iteration(args.micro_batch_size, args.seq_length, args.num_layers, args.hidden_size,
                                      vocab, False)
    peak = peak_bf16_tflops(device)
    mem = optimizer.memory_bytes()
    return {
        "mode": args.mode, "compile": args.compile, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "params": n_params, "micro_batch_size": args.micro_batch_size,
        "seq_length": args.seq_length, "iteration_ms_median": step_s * 1e3, "tokens_per_s": tokens / step_s,
        "model_tflops_per_s": model_flops / step_s / 1e12,
        "mfu": model_flops / step_s / 1e12 / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "bytes_per_param": {k: v / mem["num_params"] for k, v in mem.items() if k != "num_params"},
        "optimizer_path": path, "loss_first_last": [losses[0], losses[-1]],
    }


def write_outputs(results: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    bases = {r["compile"]: r for r in results if r["mode"] == "bf16-mp" and "error" not in r}
    lines = ["| mode | compile | tokens/s | ms/iter | model TFLOP/s | MFU | peak mem (GiB) | vs bf16-mp mem | "
             "bytes/param (p+g+states) | optimizer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r.get('compile')} | error: {r['error'][:80]} |||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        base = bases.get(r["compile"])  # against bf16-mp run the same way (eager or compiled)
        ratio = (f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x"
                 if base and r["peak_memory_gib"] and base.get("peak_memory_gib") else "")
        bpp = r["bytes_per_param"]
        lines.append(f"| {r['mode']} | {r['compile']} | {r['tokens_per_s']:.0f} | {r['iteration_ms_median']:.1f} | "
                     f"{r['model_tflops_per_s']:.1f} | {mfu} | {mem} | {ratio} | "
                     f"{bpp['params']:.0f}+{bpp['grads']:.0f}+{bpp['optimizer_states']:.0f} | {r['optimizer_path']} |")
    r0 = next((r for r in results if "error" not in r), {})
    head = (f"GPT {r0.get('params', 0) / 1e6:.0f}M params, seq {r0.get('seq_length')}, micro-batch "
            f"{r0.get('micro_batch_size')}, device {r0.get('device')}; median of the timed iterations.\n\n")
    out.with_suffix(".md").write_text(head + "\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="bf16-sr,bf16-mp,bf16")
    p.add_argument("--compile-modes", default="", help="modes to also run with torch.compile(model)")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--recompute-activations", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "training_350m"))
    p.add_argument("--mode", help=argparse.SUPPRESS)  # child process: one mode
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    runs = [(m, False) for m in args.modes.split(",") if m] + [(m, True) for m in args.compile_modes.split(",") if m]
    results = []
    passthrough = [a for a in sys.argv[1:]]
    for mode, compiled in runs:
        cmd = [sys.executable, __file__, *passthrough, "--mode", mode] + (["--compile"] if compiled else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and found:
            results.append(json.loads(found[-1][7:]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"mode": mode, "compile": compiled, "error": tail[0]})
        r = results[-1]
        print(f"{mode} compile={compiled}: " + (f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}, "
                                                 f"peak {r['peak_memory_gib']} GiB" if "error" not in r
                                                 else f"error {r['error']}"), flush=True)
        write_outputs(results, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
