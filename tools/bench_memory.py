#!/usr/bin/env python3
"""Bytes per parameter that each data-parallel rank holds for params, grads and optimizer states.

Measured from the real buffers of DistributedDataParallel + DistributedOptimizer (gloo processes on
the CPU) for dp = 1, 2, 4, 8, in bf16-sr (BF16 params and grads, FP32 states sharded over dp) and in
Megatron's bf16-mp baseline (BF16 params, FP32 grads, FP32 master + states sharded over dp), against
the precision table's formulas (megatron_sr/precision.py): bf16-sr = 2 + 2 + 8/dp, bf16-mp = 2 + 4 + 12/dp.

    python tools/bench_memory.py [--hidden 512 --layers 6 --dp 1 2 4 8 --out bench/results]
Writes memory_per_param.json and memory_per_param.md under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_sr.config import OptimizerConfig
from megatron_sr.distributed import DDPConfig, DistributedDataParallel, DistributedOptimizer
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.precision import precision_mode


def expected_bytes(precision: str, dp: int) -> float:
    """The precision table's bytes per parameter on one rank: params + grads + (m, v, FP32 master) / dp."""
    mode = precision_mode(precision)
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    states = 2 * size(mode.state_dtype()) + (4 if mode.fp32_master else 0)
    return size(mode.param_dtype) + size(mode.grad_dtype()) + states / dp


# precision -> (grad dtype, bytes per parameter at dp): the two modes the README compares, default dtypes
MODES = {p: (precision_mode(p).grad_dtype(), functools.partial(expected_bytes, p)) for p in ("bf16-sr", "bf16-mp")}


def build_model(hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)]
    model = nn.Sequential(*blocks).bfloat16()
    assign_sr_streams([model])
    return model


def measure(precision: str, hidden: int, layers: int, bucket_size: int) -> dict:
    """Bytes per parameter on this rank after one real training step."""
    grad_dtype = precision_mode(precision).grad_dtype()
    model = build_model(hidden, layers)
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=grad_dtype, use_distributed_optimizer=True,
                                                   bucket_size=bucket_size))
    opt = DistributedOptimizer(ddp, OptimizerConfig(precision=precision), seed=1234)
    x = torch.randn(4, hidden).bfloat16()
    ddp(x).float().square().mean().backward()
    opt.step()
    mem = opt.memory_bytes()
    n = mem["num_params"]
    return {"num_params": n, "params": mem["params"] / n, "grads": mem["grads"] / n,
            "optimizer_states": mem["optimizer_states"] / n,
            "total": (mem["params"] + mem["grads"] + mem["optimizer_states"]) / n}


def _rank_main(rank: int, world: int, port: int, out_dir: str, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(1, 1)  # every rank data-parallel
    try:
        results = {p: measure(p, cfg["hidden"], cfg["layers"], cfg["bucket_size"]) for p in MODES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_dp(dp: int, cfg: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank_main, args=(dp, port, tmp, cfg), nprocs=dp, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(dp)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--bucket-size", type=int, default=2_000_000)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if any(d < 1 for d in args.dp):
        print("bench_memory: --dp values must be >= 1", file=sys.stderr)
        return 2
    cfg = {"hidden": args.hidden, "layers": args.layers, "bucket_size": args.bucket_size}
    rows = []
    for dp in args.dp:
        per_rank = run_dp(dp, cfg)
        for precision, (_, bytes_at) in MODES.items():
            formula = bytes_at(dp)
            worst = max(per_rank, key=lambda r: r[precision]["total"])[precision]
            rows.append({"precision": precision, "dp": dp, "num_params": worst["num_params"],
                         "params": worst["params"], "grads": worst["grads"],
                         "optimizer_states": worst["optimizer_states"], "total": worst["total"],
                         "formula": formula, "ranks": [r[precision]["total"] for r in per_rank]})
            print(f"{precision:8s} dp={dp}: {worst['total']:.4f} B/param (formula {formula:.4f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": cfg, "note": "max over ranks; padding of buckets to dp*8 elements is included",
              "rows": rows}
    tmp = out / "memory_per_param.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "memory_per_param.json")
    lines = ["# Bytes per parameter held on each data-parallel rank", "",
             f"Model: {rows[0]['num_params']:,} parameters ({args.layers} MLP blocks, hidden {args.hidden}), "
             "gloo on CPU, measured from the real DDP buffers and optimizer shards after one step "
             "(max over ranks). Command: `python tools/bench_memory.py`.", "",
             "| precision | dp | params | grads | optimizer states | total | formula (precision table) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['dp']} | {r['params']:.4f} | {r['grads']:.4f} | "
                     f"{r['optimizer_states']:.4f} | {r['total']:.4f} | {r['formula']:.4f} |")
    tmp = out / "memory_per_param.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "memory_per_param.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
