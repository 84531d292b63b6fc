#!/usr/bin/env python3
"""Step-time cost of the linear layers' quantization points (issue 16), per scheme, against no quantization.

    python3 tools/bench_quant.py                                   # CPU: bench_cpu.py's 0.94M GPT, bf16-sr
    python3 tools/bench_quant.py --config examples/gpt_125m.yaml --device cuda --iters 20 \\
        --output bench/results/quant_cost_gpu                      # the examples' 125M config on a GPU

Each scheme trains in its own process through `pretrain(parse_config(...))` (what pretrain_gpt.py runs), mock
data, and reports the median time between optimizer steps after the warm-up; the rounds interleave the
schemes so load on a shared machine spreads over all of them. JSON + markdown in --output (machine, commit,
command). The schemes: none; FP8 (e4m3 weights and activations, e5m2 gradients) on all six points with
round-to-nearest and with SR; int4 row-scaled SR on the weight points, the input points, the gradient points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_cpu import SHAPE, commit, machine, run_child, shape_flags, time_pretrain, write_results

REPO = Path(__file__).resolve().parents[1]


def _points(weights: str = "off", inputs: str = "off", grads: str = "off") -> list[str]:
    return ["--quant-fwd-input", inputs, "--quant-bwd-input", inputs, "--quant-fwd-weight", weights,
            "--quant-bwd-weight", weights, "--quant-bwd-grad-dgrad", grads, "--quant-bwd-grad-wgrad", grads]


SCHEMES = {
    "none": [],
    "fp8-rn": _points("fp:e4m3:rn", "fp:e4m3:rn", "fp:e5m2:rn"),
    "fp8-sr": _points("fp:e4m3:sr", "fp:e4m3:sr", "fp:e5m2:sr"),
    "w4-sr": _points(weights="int:b4:row:sr"),
    "a4-sr": _points(inputs="int:b4:row:sr"),
    "g4-sr": _points(grads="int:b4:row:sr"),
}


# --tiny: the suite's dry run (seconds per scheme), not a measurement
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--vocab-size", "256"]


def child(argv: list[str], warmup: int, iters: int) -> dict:
    return {"ms": time_pretrain(argv + ["--train-iters", str(warmup + iters)], warmup, iters)["ms"]}


def base_argv(args) -> list[str]:
    common = ["--mock-data", "--eval-iters", "0", "--log-interval", "1000000", "--precision", args.precision,
              "--device", args.device, "--hidden-dropout", "0", "--attention-dropout", "0"]
    if args.tiny:
        return TINY + common
    return (["--config", args.config] if args.config else shape_flags()) + common


def run_scheme(name: str, args) -> dict:
    env = {**os.environ}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", json.dumps(base_argv(args) + SCHEMES[name]), str(args.warmup),
           str(args.iters)]
    result = run_child(cmd, env, args.timeout)
    return result if "error" in result else {**result, "load": round(os.getloadavg()[0], 2)}


def markdown(data: dict) -> str:
    meta, res = data["meta"], data["results"]
    lines = [f"Quantization cost: {meta['machine']}, commit {meta['commit']}, {meta['date']}", "",
             f"`{meta['command']}`", "",
             f"Model: {meta['model']}, precision {meta['precision']}, device {meta['device']}; {meta['warmup']} "
             f"warm-up + {meta['iters']} timed iterations per round, {meta['rounds']} rounds, median of the rounds' "
             "medians. The 1-minute load average after each run is in the last column: other processes on the "
             "machine add time, so compare schemes within a round.", "",
             "| scheme | ms/iter | per round | vs none | load |", "|---|---|---|---|---|"]
    base = res.get("none", {}).get("ms")
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:100]} | | | |")
            continue
        ratio = f"{r['ms'] / base:.2f}x" if base else ""
        lines.append(f"| {name} | {r['ms']:.1f} | {r['rounds']} | {ratio} | {r['load']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print("RESULT " + json.dumps(child(json.loads(argv[1]), int(argv[2]), int(argv[3]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a YAML model config (default: bench_cpu.py's shape)")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 GPT: a smoke run, not a measurement")
    p.add_argument("--precision", default="bf16-sr")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "quant_cost_cpu"))
    args = p.parse_args(argv)
    names = [n for n in args.schemes.split(",") if n]
    if unknown := [n for n in names if n not in SCHEMES]:
        p.error(f"--schemes: unknown {unknown}; expected some of {', '.join(SCHEMES)}")
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.rounds):
        for name in names:
            rounds[name].append(run_scheme(name, args))
            print(f"round {k + 1} {name}: {rounds[name][-1]}", flush=True)
    results = {}
    for name, rs in rounds.items():
        ok = [r["ms"] for r in rs if "error" not in r]
        results[name] = ({"ms": statistics.median(ok), "rounds": [round(v, 1) for v in ok],
                          "load": [r["load"] for r in rs if "load" in r]} if ok else {"error": rs[-1]["error"]})
    model = "tiny (smoke run)" if args.tiny else args.config or str(SHAPE)
    m = machine()
    if args.device == "cuda":
        import torch

        m["cpu"] = f"{torch.cuda.get_device_name()} (host {m['cpu']})"
    data = {"meta": {"machine": f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}",
                     "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "command": "python3 tools/bench_quant.py " + " ".join(argv), "model": model,
                     "precision": args.precision, "device": args.device, "warmup": args.warmup, "iters": args.iters,
                     "rounds": args.rounds, "schemes": {n: SCHEMES[n] for n in names}},
            "results": results}
    write_results(args.output, data, markdown(data))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
