#!/usr/bin/env python3
"""Tokenize JSONL / text corpora into Megatron's indexed dataset: PREFIX_{key}_document.bin/.idx.

    python3 tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-model tok.model --append-eod --workers 4
"""
import argparse
import sys

from megatron_sr.cli import run_tool
from megatron_sr.data.corpus import add_corpus_arguments, corpus_config_from_args
from megatron_sr.data.preprocess import PreprocessConfig, preprocess

TOOL = "preprocess_data.py"



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{json key}_document.bin/.idx")
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model (tools/train_tokenizer.py)")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=["SentencePieceTokenizer"],
                   help="accepted for Megatron compatibility; sentencepiece is the only tokenizer")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto",
                   help="token dtype in .bin; auto: uint16 below 65,500 vocabulary, else int32")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    def run() -> int:
        cfg = PreprocessConfig(inputs=tuple(args.input), output_prefix=args.output_prefix,
                               tokenizer_model=args.tokenizer_model, corpus=corpus_config_from_args(args),
                               append_eod=args.append_eod, workers=args.workers, dtype=args.dtype,
                               progress=not args.no_progress)
        stats = preprocess(cfg)
        mb = stats.text_bytes / 1e6
        for prefix in stats.outputs:
            print(f"wrote {prefix}.bin/.idx")
        print(f"{stats.documents} documents, {stats.tokens} tokens, {mb:.1f} MB of text in {stats.seconds:.1f} s "
              f"({mb / max(stats.seconds, 1e-9):.2f} MB/s, {args.workers} workers)")
        return 0

    return run_tool(TOOL, run, interrupted="error: interrupted; no output written")


if __name__ == "__main__":
    sys.exit(main())
