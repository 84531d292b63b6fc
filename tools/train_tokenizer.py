#!/usr/bin/env python3
"""Train a sentencepiece tokenizer that round-trips any text exactly (byte fallback, no normalisation).

    python3 tools/train_tokenizer.py --input corpus/ --vocab-size 32000 --output-prefix tok
writes tok.model and tok.vocab. Ids: 0 <unk>, 1 <s>, 2 <eod> (end of document), 3 <pad>.
Accepts the same inputs and input flags as tools/preprocess_data.py.
"""
import argparse
import contextlib
import os
import sys
from pathlib import Path

from megatron_sr.cli import run_tool
from megatron_sr.data.corpus import add_corpus_arguments, corpus_config_from_args, expand_inputs, iter_documents
from megatron_sr.data.tokenizer_training import train_sentencepiece

TOOL = "train_tokenizer.py"



def remove_temporaries(prefix: str) -> None:
    """A write that failed (a full disk) leaves its temporary name behind (tokenizer_training._atomic_write)."""
    for suffix in (".model", ".vocab"):
        with contextlib.suppress(OSError):
            Path(f"{prefix}{suffix}.tmp{os.getpid()}").unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of characters kept as pieces; the rest use byte fallback")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled for training (0: all)")
    p.add_argument("--workers", type=int, default=None, help="training threads (default: all cores)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    def run() -> int:
        cfg = corpus_config_from_args(args)
        files = expand_inputs(args.input)
        docs = (d for doc in iter_documents(files, cfg) for d in doc)
        model = train_sentencepiece(docs, args.output_prefix, args.vocab_size, model_type=args.model_type,
                                    character_coverage=args.character_coverage,
                                    input_sentence_size=args.input_sentence_size, num_threads=args.workers)
        print(f"wrote {model} and {args.output_prefix}.vocab ({args.vocab_size} pieces)")
        return 0

    return run_tool(TOOL, run, interrupted="error: interrupted; no output written",
                    on_failure=lambda: remove_temporaries(args.output_prefix))


if __name__ == "__main__":
    sys.exit(main())
