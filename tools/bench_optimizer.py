#!/usr/bin/env python3
"""Benchmark of one optimizer step on GPT-shaped parameter sets (needs a CUDA device).

Times (median of CUDA-event timings after warm-up) the fused SR AdamW kernel with FP32 and BF16
states, torch's fused AdamW as the mixed-precision step (FP32 master + FP32 grads, then the copy to
BF16), torch's fused AdamW directly on BF16 params, and the eager PyTorch reference; measures the
device-to-device copy bandwidth in the same run. Writes <out>/optimizer_step.json and .md.
For our kernel it also splits host from device: "kernel ms" times CUDA-graph replays of the captured
call (device only) and "host us" the host time of one asynchronous call. The list of views and the
replan-every-step rows are diagnostics (chunk structure vs memory placement; cost of a first call).

    python3 tools/bench_optimizer.py [--sets gpt2-350m,gpt3-xl-1.3b] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_sr.optimizer import AdamWConstants, SRKey, adamw_reference_, fused, step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_

VOCAB = 50304  # GPT-2 vocabulary padded to a multiple of 128, as Megatron and nanoGPT do


def gpt_shapes(hidden: int, layers: int, seq: int, vocab: int = VOCAB) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model, in model.parameters() order."""
    h = hidden
    layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    return [(vocab, h), (seq, h)] + layer * layers + [(h,), (h,)]


SETS = {"gpt2-350m": gpt_shapes(1024, 24, 1024), "gpt3-xl-1.3b": gpt_shapes(2048, 24, 2048)}
B1, B2, LR, WD = 0.9, 0.95, 3e-4, 0.1


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    src = dst = None  # free the 8 GiB before the next measurement
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6  # read + write


def _randn(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda") * scale).to(dtype)


def make_chunks(shapes, state_dtype, layout: str):
    """BF16 params and grads, states of state_dtype. layout "list": one chunk per parameter, each tensor its
    own allocation; "flat": one chunk; "views": one chunk per parameter, views into four flat buffers (the
    list's chunk structure over the flat shard's memory, to tell the two effects apart)."""
    numels = [torch.Size(s).numel() for s in shapes]
    n = sum(numels)
    if layout == "flat":
        return [AdamWChunk(_randn(n, torch.bfloat16), _randn(n, torch.bfloat16, 1e-2), _randn(n, state_dtype, 1e-3),
                           _randn(n, state_dtype, 1e-5).abs(), 0, WD)]
    if layout == "views":
        flat = make_chunks(shapes, state_dtype, "flat")[0]
    chunks, base = [], 0
    for s, k in zip(shapes, numels):
        wd = WD if len(s) > 1 else 0.0
        if layout == "views":
            chunks.append(AdamWChunk(flat.param[base:base + k], flat.grad[base:base + k],
                                     flat.exp_avg[base:base + k], flat.exp_avg_sq[base:base + k], base, wd))
        else:
            chunks.append(AdamWChunk(_randn(k, torch.bfloat16), _randn(k, torch.bfloat16, 1e-2),
                                     _randn(k, state_dtype, 1e-3), _randn(k, state_dtype, 1e-5).abs(), base, wd))
        base += k
    return chunks


def host_us(fn, reps: int = 30) -> float:
    """Median host time of one call (the launch is asynchronous; the GPU is drained between calls)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def graph_ms(fn, reps: int = 30) -> float:
    """Median device time of the captured call (CUDA-graph replays: no host work in the number)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, 3, reps)


def bench_ours(shapes, state_dtype, layout, fn_name, replan=False):
    """Fused: (ms around the Python call, ms of graph replays, host us per call); reference: (ms,)."""
    chunks = make_chunks(shapes, state_dtype, layout)
    scalars = step_scalars(LR, 10, B1, B2, "cuda")
    consts, key = AdamWConstants.make(B1, B2, 1e-8), SRKey.from_seed(1)
    if fn_name == "fused":
        def fn():
            if replan:  # every call checks and plans the list again: the cost of a first call
                fused.clear_plan_cache()
            return adamw_step_(chunks, scalars=scalars, step=10, consts=consts, rounding="stochastic", key=key)
        assert fn() == "fused", "the fused kernel did not run"
        ms = time_ms(fn, 5, 30)
        host = host_us(fn)
        kernel = None if replan else graph_ms(fn)
        return ms, kernel, host
    def ref():
        for c in chunks:
            adamw_reference_(c.param, c.grad, c.exp_avg, c.exp_avg_sq, scalars=scalars, step=10, consts=consts,
                             weight_decay=c.weight_decay, rounding="stochastic", key=key, base_index=c.base_index)
    return (time_ms(ref, 1, 3),)


def bench_torch_mixed(shapes):
    master = [torch.nn.Parameter(_randn(s, torch.float32)) for s in shapes]
    for p in master:
        p.grad = _randn(p.shape, torch.float32, 1e-2)
    model_bf16 = [p.detach().to(torch.bfloat16) for p in master]
    opt = torch.optim.AdamW(master, lr=LR, betas=(B1, B2), weight_decay=WD, fused=True)

    master_data = [p.detach() for p in master]

    def fn():
        opt.step()
        torch._foreach_copy_(model_bf16, master_data)  # one multi-tensor launch, FP32 -> BF16
    return time_ms(fn, 5, 30)


def bench_torch_bf16(shapes):
    params = [torch.nn.Parameter(_randn(s, torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = _randn(p.shape, torch.bfloat16, 1e-2)
    opt = torch.optim.AdamW(params, lr=LR, betas=(B1, B2), weight_decay=WD, fused=True)
    return time_ms(opt.step, 5, 30)


# name -> (bytes moved per parameter, runner); bytes count each input read once and each output written once
METHODS = {
    "ours_fp32_states": (22, lambda s: bench_ours(s, torch.float32, "list", "fused")),
    "ours_bf16_states": (14, lambda s: bench_ours(s, torch.bfloat16, "list", "fused")),
    "ours_fp32_states_flat_shard": (22, lambda s: bench_ours(s, torch.float32, "flat", "fused")),
    "ours_fp32_states_list_of_views": (22, lambda s: bench_ours(s, torch.float32, "views", "fused")),
    "ours_fp32_states_replan_every_step": (22, lambda s: bench_ours(s, torch.float32, "list", "fused", True)),
    "torch_fused_mixed_fp32_master": (34, bench_torch_mixed),  # AdamW 28 B + FP32->BF16 copy 6 B
    "torch_fused_bf16_params": (14, bench_torch_bf16),
    "reference_eager_fp32_states": (22, lambda s: bench_ours(s, torch.float32, "list", "reference")),
}


def run(set_names, methods, skip_reference_over):
    copy_before = copy_bandwidth_gbs()
    results = {}
    for name in set_names:
        shapes = SETS[name]
        n = sum(torch.Size(s).numel() for s in shapes)
        rows = {}
        for m in methods:
            if m.startswith("reference") and n > skip_reference_over:
                continue
            nbytes, runner = METHODS[m]
            out = runner(shapes)  # ms, or (ms, kernel ms or None, host us)
            ms, kernel, host = ((out if isinstance(out, tuple) else (out,)) + (None, None))[:3]
            torch.cuda.empty_cache()
            rows[m] = {"ms": round(ms, 3), "bytes_per_param": nbytes, "GBps": round(nbytes * n / ms / 1e6, 1),
                       "floor_ms_at_copy_bw": round(nbytes * n / copy_before / 1e6, 3)}
            if kernel is not None:
                rows[m]["kernel_ms"] = round(kernel, 3)
                rows[m]["kernel_GBps"] = round(nbytes * n / kernel / 1e6, 1)
            if host is not None:
                rows[m]["host_us"] = round(host, 1)
            print(f"{name:14s} {m:36s} {ms:9.3f} ms  kernel {kernel or float('nan'):9.3f} ms  "
                  f"host {host or float('nan'):8.1f} us", flush=True)
        results[name] = {"params": n, "tensors": len(shapes), "methods": rows}
    copy_after = copy_bandwidth_gbs()
    copy_bw = max(copy_before, copy_after)
    for r in results.values():
        mixed = r["methods"].get("torch_fused_mixed_fp32_master", {}).get("ms")
        for row in r["methods"].values():
            row["pct_of_copy_bw"] = round(100 * row["GBps"] / copy_bw, 1)
            if "kernel_GBps" in row:
                row["kernel_pct_of_copy_bw"] = round(100 * row["kernel_GBps"] / copy_bw, 1)
            if mixed:
                row["speedup_vs_mixed"] = round(mixed / row["ms"], 2)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
            "copy_bandwidth_GBps": {"before": round(copy_before, 1), "after": round(copy_after, 1),
                                    "used": round(copy_bw, 1)},
            "timing": ("median of CUDA-event times around the Python call (host work included); fused/torch: "
                       "5 warm-up + 30 timed steps; reference: 1 + 3. kernel ms: median of 30 CUDA-graph replays "
                       "of the captured call (device time only). host us: median host time of one call"),
            "sets": results}


def markdown(res) -> str:
    lines = [f"# Optimizer step benchmark ({res['device']}, torch {res['torch']}, CUDA {res['cuda']}, "
             f"commit {res['git_commit']})", "",
             f"Copy bandwidth (read + write) measured in the same run: {res['copy_bandwidth_GBps']['used']} GB/s "
             f"(before {res['copy_bandwidth_GBps']['before']}, after {res['copy_bandwidth_GBps']['after']}). "
             f"{res['timing']}.", "",
             "| set | params | method | bytes/param | ms | % copy BW | kernel ms | kernel % copy BW | host us | "
             "floor ms | speedup vs mixed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["sets"].items():
        for m, row in r["methods"].items():
            lines.append(f"| {name} | {r['params'] / 1e9:.3f}B | {m} | {row['bytes_per_param']} | {row['ms']} | "
                         f"{row['pct_of_copy_bw']} | {row.get('kernel_ms', '')} | "
                         f"{row.get('kernel_pct_of_copy_bw', '')} | {row.get('host_us', '')} | "
                         f"{row['floor_ms_at_copy_bw']} | {row.get('speedup_vs_mixed', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {sorted(SETS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    ap.add_argument("--skip-reference-over", type=float, default=2e9, help="skip the eager reference above this size")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "bench" / "results"))
    args = ap.parse_args(argv)
    sets, methods = args.sets.split(","), args.methods.split(",")
    bad = [s for s in sets if s not in SETS] + [m for m in methods if m not in METHODS]
    if bad:
        print(f"bench_optimizer: unknown --sets/--methods entries {bad}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_optimizer: needs a CUDA device", file=sys.stderr)
        return 2
    res = run(sets, methods, args.skip_reference_over)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1) + "\n"), (".md", markdown(res))):
        tmp = out / f"optimizer_step{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"optimizer_step{suffix}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
