#!/usr/bin/env python3
"""Data pipeline benchmarks (not tests): writes bench/results/data_preprocess.{json,md} and data_index.{json,md}.

    python3 tools/bench_data.py preprocess   # MB/s of preprocess_data with 1 and 2 workers on ../shared/data
    python3 tools/bench_data.py index        # GPT index build: 1,000,000 documents, 100,000,000 tokens
"""
import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"


def machine() -> dict:
    # the load average matters: this machine is shared, and other work slows the runs down
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def write_results(name: str, payload: dict, table: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def bench_preprocess(args) -> None:
    from megatron_sr.data.corpus import CorpusConfig, expand_inputs, iter_documents
    from megatron_sr.data.preprocess import PreprocessConfig, preprocess
    from megatron_sr.data.tokenizer_training import train_sentencepiece
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = CorpusConfig(fallback_encoding="cp1252")
    files = expand_inputs([str(SHARED)])
    t0 = time.perf_counter()
    model = train_sentencepiece((d[0] for d in iter_documents(files, corpus)), str(work / "tok"),
                                vocab_size=args.vocab_size, model_type="bpe")
    train_s = time.perf_counter() - t0
    runs = []
    for workers in args.workers:
        best = None
        for _ in range(args.repeats):
            cfg = PreprocessConfig(inputs=(str(SHARED),), output_prefix=str(work / f"w{workers}"),
                                   tokenizer_model=model, corpus=CorpusConfig(fallback_encoding="cp1252"),
                                   append_eod=True, workers=workers, progress=False)
            with contextlib.redirect_stderr(io.StringIO()):  # the per-file encoding notes, once per run
                stats = preprocess(cfg)
            if best is None or stats.seconds < best.seconds:
                best = stats
        runs.append({"workers": workers, "seconds": round(best.seconds, 3), "documents": best.documents,
                     "tokens": best.tokens, "text_mb": round(best.text_bytes / 1e6, 3),
                     "mb_per_s": round(best.text_bytes / 1e6 / best.seconds, 3),
                     "docs_per_s": round(best.documents / best.seconds, 1)})
    same = all((work / f"w{r['workers']}_text_document.bin").read_bytes()
               == (work / f"w{runs[0]['workers']}_text_document.bin").read_bytes() for r in runs)
    payload = {"benchmark": "preprocess_data on ../shared/data (one document per file, --append-eod)",
               "command": "python3 tools/bench_data.py preprocess " + " ".join(sys.argv[2:]),
               "tokenizer": {"type": "sentencepiece bpe", "vocab_size": args.vocab_size,
                             "train_seconds": round(train_s, 2)},
               "files": len(files), "repeats_best_of": args.repeats, "outputs_identical": same,
               "runs": runs, "machine": machine()}
    table = [f"# preprocess_data throughput ({len(files)} files of ../shared/data, vocab {args.vocab_size}, "
             f"best of {args.repeats}, {os.cpu_count()} CPUs)", "",
             "| workers | MB of text | documents | tokens | seconds | MB/s | docs/s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['workers']} | {r['text_mb']} | {r['documents']} | {r['tokens']} | {r['seconds']} | "
              f"{r['mb_per_s']} | {r['docs_per_s']} |" for r in runs]
    table += ["", f"Outputs byte-identical across worker counts: {same}. Tokenizer training: {train_s:.1f} s.",
              f"Load average at the end (1, 5, 15 min): {payload['machine']['loadavg_1_5_15']}.",
              f"Command: `{payload['command']}`"]
    write_results("data_preprocess", payload, table)


def make_synthetic(prefix: str, num_docs: int, num_tokens: int, seed: int = 0) -> None:
    """Random document lengths summing exactly to num_tokens, random uint16 tokens; no tokenizer."""
    import numpy as np

    from megatron_sr.data.indexed_dataset import write_index
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=0.0, sigma=1.0, size=num_docs)
    lengths = np.maximum(1, np.floor(lengths / lengths.sum() * num_tokens)).astype(np.int64)
    lengths[-1] += num_tokens - lengths.sum()  # exact total
    assert lengths.min() >= 1 and lengths.sum() == num_tokens
    chunk = 10_000_000
    with open(prefix + ".bin", "wb") as f:
        for start in range(0, num_tokens, chunk):
            rng.integers(0, 32000, size=min(chunk, num_tokens - start), dtype=np.uint16).tofile(f)
    pointers = np.zeros(num_docs, dtype=np.int64)
    np.cumsum(lengths[:-1] * 2, out=pointers[1:])
    write_index(prefix + ".idx", np.uint16, lengths.astype(np.int32), pointers, np.arange(num_docs + 1))


def index_child(prefix: str, seq_length: int, train_samples: int, cache_dir: str) -> None:
    """Runs in a fresh process so that its peak RSS is the index build's own."""
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    from megatron_sr.data import build_gpt_datasets
    t_import = time.perf_counter()
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train, valid, test = build_gpt_datasets([prefix], "969,30,1", seq_length, 1234,
                                            (train_samples, train_samples // 100, train_samples // 1000),
                                            cache_dir=cache_dir or None)
    t_build = time.perf_counter()
    first = train[0]["tokens"]
    t_first = time.perf_counter()
    print(json.dumps({"import_s": t_import - t0, "build_s": t_build - t_import, "first_sample_s": t_first - t_build,
                      "lengths": [len(d) if d is not None else 0 for d in (train, valid, test)],
                      "train_epochs": len(train.document_index) // len(train.documents),
                      "sample_shape": list(first.shape),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_import_mb": rss_import / 1024, "rss_at_start_mb": rss_start / 1024}))


def bench_index(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    prefix = str(work / "synthetic")
    t0 = time.perf_counter()
    make_synthetic(prefix, args.documents, args.tokens)
    gen_s = time.perf_counter() - t0
    cases = []
    for seq_length, train_samples in ((1024, 9 * args.tokens // 10240), (1024, 5 * args.tokens // 1024),
                                      (4096, 9 * args.tokens // 40960)):
        cache = str(work / f"cache_{seq_length}_{train_samples}")
        for phase, cache_dir in (("no cache", ""), ("cold cache (build + save)", cache),
                                 ("warm cache (load)", cache)):
            out = subprocess.run([sys.executable, __file__, "_index_child", prefix, str(seq_length),
                                  str(train_samples), cache_dir], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(seq_length=seq_length, train_samples_requested=train_samples, phase=phase)
            cases.append(r)
    payload = {"benchmark": "build_gpt_datasets on a synthetic indexed dataset, split 969,30,1",
               "command": "python3 tools/bench_data.py index " + " ".join(sys.argv[2:]),
               "documents": args.documents, "tokens": args.tokens, "generate_seconds": round(gen_s, 2),
               "cases": cases, "machine": machine()}
    table = [f"# GPT index build: {args.documents:,} documents, {args.tokens:,} tokens (split 969,30,1, "
             f"{os.cpu_count()} CPUs)", "",
             "build s: reading the .idx and building document, sample and shuffle indices for train, valid and "
             "test. Peak RSS is the whole fresh process (python + torch + numpy are about "
             f"{cases[0]['rss_after_import_mb']:.0f} MB of it).", "",
             "| seq | train samples asked | train samples | epochs | phase | build s | first sample s | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {c['seq_length']} | {c['train_samples_requested']:,} | {c['lengths'][0]:,} | {c['train_epochs']} | "
              f"{c['phase']} | {c['build_s']:.2f} | {c['first_sample_s']:.4f} | {c['peak_rss_mb']:.0f} |"
              for c in cases]
    table += ["", f"Load average at the end (1, 5, 15 min): {payload['machine']['loadavg_1_5_15']}.",
              f"Command: `{payload['command']}`"]
    write_results("data_index", payload, table)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_index_child":
        index_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("preprocess")
    pp.add_argument("--vocab-size", type=int, default=16000)
    pp.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    pp.add_argument("--repeats", type=int, default=2)
    ix = sub.add_parser("index")
    ix.add_argument("--documents", type=int, default=1_000_000)
    ix.add_argument("--tokens", type=int, default=100_000_000)
    args = p.parse_args()
    bench_preprocess(args) if args.what == "preprocess" else bench_index(args)


if __name__ == "__main__":
    main()
