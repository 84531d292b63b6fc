#!/usr/bin/env python3
"""The precision study's GPU run (issue 15) as one prepared command, on a corpus built on the machine itself.

    python3 tools/precision_study_gpu.py --output bench/results/precision_gpu        # on the lent GPU
    python3 tools/precision_study_gpu.py --dry-run --output /tmp/dry                  # its CPU form (CI)

1. Corpus: the text and source files of the Python installation (the standard library and site-packages:
   .py .md .rst .txt files of 1 KB to 512 KB, in sorted path order, one document each) until --corpus-mb;
   written as JSONL. The lent GPU machine has no internet; this is what it has, and it holds far more distinct
   text than one run reads, so no sample repeats within a run (checked: the tool stops if the training split
   holds fewer tokens than a run consumes).
2. A sentencepiece tokenizer trained on it (tools/train_tokenizer.py) and the Megatron .bin/.idx
   (tools/preprocess_data.py).
3. tools/compare_precisions.py: GPT-2 124M (examples/gpt_125m.yaml) at sequence 1024, bf16-sr, bf16-mp and bf16,
   lr 1x and 4x (6e-4 and 2.4e-3, cosine to a tenth), one seed, 200 iterations of 32 x 1024 tokens each
   (6.6M tokens per run; six runs sized for the device's 10-minute command limit, not yet timed there).
The corpus' size in files, bytes and tokens goes to OUTPUT/corpus.json, beside compare_precisions' results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from megatron_sr.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".rst", ".txt")


def corpus_files(roots: list[Path], limit_bytes: int) -> list[Path]:
    """Files of the installation in sorted path order, until their sizes add up to limit_bytes."""
    chosen, total, seen = [], 0, set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file() or path.resolve() in seen:
                continue
            size = path.stat().st_size
            if not 1024 <= size <= 512 * 1024:
                continue
            seen.add(path.resolve())
            chosen.append(path)
            total += size
            if total >= limit_bytes:
                return chosen
    return chosen


def write_corpus(files: list[Path], out: Path) -> dict:
    """One JSONL document per file (undecodable bytes replaced); returns the corpus' size."""
    docs = chars = 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            docs, chars = docs + 1, chars + len(text)
    tmp.replace(out)
    return {"documents": docs, "characters": chars}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise ValueError(f"{Path(cmd[1]).name} failed (exit {proc.returncode})")


def settings(dry_run: bool) -> dict:
    if dry_run:  # tiny everything, on the CPU: the same steps, so the command cannot rot between GPU runs
        return {"corpus_mb": 0.5, "vocab": 512, "split": "80,20,0", "modes": ["bf16-sr", "bf16"], "lrs": ["1"],
                "iters": 6,
                "model": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length",
                          "64", "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size",
                          "4", "--device", "cpu", "--lr", "1e-3", "--min-lr", "1e-4", "--eval-iters", "2",
                          "--eval-interval", "3", "--log-interval", "3"]}
    return {"corpus_mb": 200, "vocab": 32000, "split": "98,2,0", "modes": ["bf16-sr", "bf16-mp", "bf16"],
            "lrs": ["1", "4"], "iters": 200,
            "model": ["--config", "examples/gpt_125m.yaml", "--seq-length", "1024", "--max-position-embeddings", "1024",
                      "--micro-batch-size", "16", "--global-batch-size", "32", "--lr-warmup-iters", "30",
                      "--eval-interval", "50", "--eval-iters", "10", "--log-interval", "20", "--device", "cuda"]}


def study(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="results folder (compare_precisions' files and corpus.json)")
    p.add_argument("--work-dir", default="/tmp/precision_study_gpu", help="corpus, tokenizer, dataset and runs")
    p.add_argument("--dry-run", action="store_true", help="the CPU form: tiny corpus, model and runs")
    p.add_argument("--train-iters", type=int, help="iterations per run (default 200; dry run 6)")
    args = p.parse_args(argv)
    s = settings(args.dry_run)
    iters = args.train_iters or s["iters"]
    work, out = Path(args.work_dir), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
    files = corpus_files(roots, int(s["corpus_mb"] * 2**20))
    if not files:
        raise ValueError(f"no text or source files under {', '.join(map(str, roots))}")
    size = write_corpus(files, work / "corpus.jsonl")
    run([sys.executable, "tools/train_tokenizer.py", "--input", str(work / "corpus.jsonl"), "--vocab-size",
         str(s["vocab"]), "--output-prefix", str(work / "tok"), "--input-sentence-size", "300000"])
    run([sys.executable, "tools/preprocess_data.py", "--input", str(work / "corpus.jsonl"), "--output-prefix",
         str(work / "corpus"), "--tokenizer-model", str(work / "tok.model"), "--append-eod", "--workers",
         str(os.cpu_count() or 1)])
    from megatron_sr.config import parse_config
    from megatron_sr.data.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(str(work / "corpus_text_document")).num_tokens
    base = [*s["model"], "--data-path", str(work / "corpus_text_document"), "--tokenizer-model",
            str(work / "tok.model"), "--split", s["split"], "--train-iters", str(iters)]
    cfg = parse_config(base)
    per_run = iters * cfg.training.global_batch_size * (cfg.model.seq_length + 1)
    train_share = int(s["split"].split(",")[0]) / sum(int(x) for x in s["split"].split(","))
    if per_run > train_share * tokens:
        raise ValueError(f"a run reads {per_run} tokens but the corpus' training split holds about "
                         f"{int(train_share * tokens)}: raise the corpus size or lower --train-iters")
    corpus = {"roots": [str(r) for r in roots], "files": len(files), **size, "tokens": tokens,
              "tokens_per_run": per_run, "build_s": round(time.monotonic() - t0, 1)}
    (out / "corpus.json").write_text(json.dumps(corpus, indent=1) + "\n")
    print(f"corpus: {len(files)} files, {size['characters']} characters, {tokens} tokens; a run reads {per_run}",
          flush=True)
    run([sys.executable, "tools/compare_precisions.py", "--output", str(out), "--runs-dir", str(work / "runs"),
         "--modes", *s["modes"], "--lr-multipliers", *s["lrs"], "--seeds", "1", "--save-interval", str(iters),
         "--stall-interval", str(max(1, iters // 10)), "--", *base])
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("precision_study_gpu.py", study))
