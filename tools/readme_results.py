#!/usr/bin/env python3
"""Regenerate the README's "## Results" section from the committed result files in bench/results/.

    python3 tools/readme_results.py            # rewrite the section (between its heading and the next one)
    python3 tools/readme_results.py --check    # exit 1 when the README is not what the results give (a test runs it)

Every number in the section comes from a JSON (or, where a tool writes only markdown, a markdown table) in
bench/results/, with the machine, commit and date that file records; the captions here hold no numbers. After
a GPU suite run (tools/gpu_suite.py) writes new files, rerun this and commit the README with them. Where a
GPU result is missing or older than the code it describes, the caption says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HEADING = "## Results"


def _load(name: str) -> dict | list | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _link(name: str) -> str:
    return f"[bench/results/{name}](bench/results/{name})"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                         for r in rows]


def optimizer_step() -> list[str]:
    d = _load("optimizer_step.json")
    if d is None:
        return []
    labels = {"ours_fp32_states": "ours, list of tensors (what the optimizers pass)",
              "ours_fp32_states_flat_shard": "ours, one flat shard", "ours_bf16_states": "ours, BF16 states",
              "torch_fused_mixed_fp32_master": "torch fused AdamW, FP32 master + copy to BF16",
              "torch_fused_bf16_params": "torch fused AdamW on BF16 params (round to nearest)"}
    rows = []
    for name, s in d["sets"].items():
        for method, label in labels.items():
            m = s["methods"].get(method)
            if m:
                rows.append([name, label, m["bytes_per_param"], m["ms"], f"{m['pct_of_copy_bw']}%",
                             f"{m['kernel_pct_of_copy_bw']}%" if m.get("kernel_pct_of_copy_bw") else "",
                             f"{m['speedup_vs_mixed']}x"])
    return [f"**Fused SR AdamW step** (`tools/bench_optimizer.py`; {d['device']}, torch {d['torch']}, commit "
            f"{d['git_commit']}; copy bandwidth {d['copy_bandwidth_GBps']['used']} GB/s measured in the same run; "
            "target: at least 85% of it):", "",
            *_table(["shapes", "method", "bytes/param", "ms", "% copy BW", "kernel alone, % copy BW",
                     "vs mixed precision"], rows), "", f"From {_link('optimizer_step.json')}; the GPU tests: "
            f"{_link('optimizer_gpu_tests.txt')}, [docs/kernel.md](docs/kernel.md).", ""]


def memory() -> list[str]:
    d = _load("memory_per_param.json")
    if d is None:
        return []
    rows = [[r["precision"], r["dp"], r["params"], r["grads"], r["optimizer_states"], r["total"]] for r in d["rows"]]
    return ["**Bytes per parameter on each data-parallel rank** (`tools/bench_memory.py`, from the real DDP buffers "
            "and optimizer shards, gloo on the CPU):", "",
            *_table(["precision", "dp", "params", "grads", "optimizer states", "total"], rows), "",
            f"From {_link('memory_per_param.json')}.", ""]


def _training_rows(runs: list[dict], with_section: bool = True) -> list[list]:
    rows = []
    for r in runs:
        res = r.get("result", r)
        if "tokens_per_s" not in res:
            continue
        mode = r.get("mode", res.get("mode"))
        compiled = res.get("compiled", res.get("compile"))
        mfu = f"{100 * res['mfu']:.1f}%" if res.get("mfu") else "n/a"
        mem = f"{res['peak_memory_gib']:.2f}" if res.get("peak_memory_gib") else "n/a"
        rows.append(([r.get("section", "")] if with_section else []) + [mode, compiled, f"{res['tokens_per_s']:.0f}",
                                                                        mfu, mem])
    return rows


def training() -> list[str]:
    new = _load("training_gpu.json")
    if new is not None:
        meta = new["meta"]
        return [f"**End to end** (`tools/bench_training.py --suite gpu`: `pretrain(cfg)` as pretrain_gpt.py runs it; "
                f"{meta['device']}, commit {meta['commit']}, {meta['date']}; targets: bf16-sr at least 1.15x bf16-mp "
                "tokens/s and at most 0.75x its peak memory):", "",
                *_table(["run", "mode", "compiled", "tokens/s", "MFU", "peak GiB"], _training_rows(new["runs"])), "",
                f"From {_link('training_gpu.json')}.", ""]
    old = _load("training_350m.json")
    if old is None:
        return []
    return ["**End to end** (`tools/bench_training.py`, GPT-2 350M shape, sequence 1024, micro-batch 16; "
            f"{old[0]['device']}). These rows come from the old benchmark (its own copy of the loop, the host "
            "synchronised every iteration, full logits); the current path (`tools/bench_training.py --suite gpu`, "
            "in tools/gpu_suite.py) has not run on a GPU yet:", "",
            *_table(["mode", "compiled", "tokens/s", "MFU", "peak GiB"], _training_rows(old, with_section=False)), "",
            f"From {_link('training_350m.json')}.", ""]


def cpu() -> list[str]:
    d = _load("cpu_small_gpt.json")
    if d is None:
        return []
    meta, res = d["meta"], d["results"]
    rows = [[name, f"{r['ms']:.1f}", f"{r['best_ms']:.1f}" if "best_ms" in r else "", ",".join(r.get("optimizer_path",
                                                                                                   []))]
            for name, r in res.items() if name.startswith(("plain", "pretrain")) and "ms" in r]
    targets = [[f"{t['row']} / {t['over']}", t["ratio"], t.get("best_ratio", ""), t["target"],
                "yes" if t["met"] else "no"] for t in d["targets"]]
    return [f"**On the CPU** (`{meta['command']}`; {meta['machine']['cpu']}, {meta['threads']} threads, torch "
            f"{meta['machine']['torch']}, commit {meta['commit']}, {meta['date']}; the issue's 0.94M-parameter GPT "
            "against a plain PyTorch GPT written in the benchmark; rounds vary on this shared machine, see the "
            "per-round values in the file):", "",
            *_table(["run", "ms/iter (median of rounds)", "best round", "optimizer path"], rows), "",
            *_table(["target", "ratio (medians)", "ratio (best rounds)", "at most", "met (medians)"], targets), "",
            f"From {_link('cpu_small_gpt.json')}; the quick start's wall time before and after the CPU path: "
            f"{_link('quickstart_wall_time.md')}; the per-operator profile: [docs/kernel.md](docs/kernel.md).", ""]


def data() -> list[str]:
    pre, idx = _load("data_preprocess.json"), _load("data_index.json")
    lines = []
    if pre is not None:
        rows = [[r["workers"], r["text_mb"], r["seconds"], r["mb_per_s"]] for r in pre["runs"]]
        lines += [f"**Data preprocessing** (`{pre['command']}`, {pre['machine']['cpus']} CPUs; outputs "
                  f"byte-identical across worker counts: {pre['outputs_identical']}):", "",
                  *_table(["workers", "MB of text", "seconds", "MB/s"], rows), ""]
    if idx is not None:
        rows = [[c["seq_length"], c["train_epochs"], c["phase"], f"{c['build_s']:.2f}", f"{c['peak_rss_mb']:.0f}"]
                for c in idx["cases"]]
        lines += [f"**GPT index build** (`{idx['command']}`: {idx['documents']:,} documents, {idx['tokens']:,} "
                  "tokens):", "", *_table(["seq", "epochs", "phase", "build s", "peak RSS MB"], rows), ""]
    return lines + ([f"From {_link('data_preprocess.json')} and {_link('data_index.json')}.", ""] if lines else [])


def gpu_suite() -> list[str]:
    runs = sorted(p for p in RESULTS.glob("gpu_suite_*.json") if not p.stem.endswith("_dry_run"))
    if not runs:
        return ["**GPU suite** (`tools/gpu_suite.py`): not run on a GPU yet; its CPU dry run runs in CI.", ""]
    d = json.loads(runs[-1].read_text())
    meta = d["meta"]
    rows = [[s["name"], s["why"], s["result"].get("status", ""), s["result"].get("wall_s", "")] for s in d["sections"]]
    return [f"**GPU suite** (`{meta['command']}`; {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, commit "
            f"{meta['commit']}, {meta['date']}):", "", *_table(["section", "what", "status", "wall s"], rows), "",
            f"From {_link(runs[-1].name)}.", ""]


def correctness() -> list[str]:
    return ["**Correctness** (tests, not benchmarks): the CUDA kernel and the CPU library are bitwise equal to the "
            "PyTorch reference (`tests/test_fused_adamw.py` on a GPU, `tests/test_cpu_fast_path.py`); every parallel "
            "layout up to tp 2 x pp 2 x dp 2 reproduces the single-process run (`tests/test_layouts.py`, with "
            "quantization points on: `tests/test_quant_layouts.py`); resumes are bitwise.", ""]


def section() -> str:
    body = ["Generated by `tools/readme_results.py` from the files in `bench/results/` (each states its machine, "
            "commit and command); the accuracy and low-bit studies have their own sections above.", ""]
    for part in (gpu_suite, optimizer_step, training, memory, cpu, data, correctness):
        body += part()
    return HEADING + "\n\n" + "\n".join(body).rstrip() + "\n"


def replace_section(readme: str, new: str) -> str:
    start = readme.index(HEADING + "\n")
    after = readme.find("\n## ", start + len(HEADING))
    return readme[:start] + new + (readme[after:] if after != -1 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the README differs")
    args = p.parse_args(argv)
    path = REPO / "README.md"
    readme = path.read_text()
    if HEADING + "\n" not in readme:
        print(f"README.md has no '{HEADING}' section", file=sys.stderr)
        return 2
    updated = replace_section(readme, section())
    if args.check:
        if updated != readme:
            print("README.md's Results section is stale: run python3 tools/readme_results.py", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(updated)
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
