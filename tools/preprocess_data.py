#!/usr/bin/env python3
"""Tokenize JSONL / text corpora into Megatron's indexed dataset: PREFIX_{key}_document.bin/.idx.

    python3 tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-model tok.model --append-eod --workers 4
    python3 tools/preprocess_data.py --input corpus.jsonl --output-prefix data/gpt2 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt --append-eod

Megatron's tokenizer types: GPT2BPETokenizer (--vocab-file, --merge-file), HuggingFaceTokenizer
(--tokenizer-model tokenizer.json or its directory), SentencePieceTokenizer / GPTSentencePieceTokenizer
(--tokenizer-model m.model), NullTokenizer (--vocab-size N; the text is whitespace-separated ids).
"""
import argparse
import sys

from megatron_sr.cli import run_tool
from megatron_sr.data.corpus import DataInputError, add_corpus_arguments, corpus_config_from_args
from megatron_sr.data.preprocess import PreprocessConfig, preprocess

TOOL = "preprocess_data.py"


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer (Megatron's flags)")
    g.add_argument("--tokenizer-type", default=None,
                   help="GPT2BPETokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer "
                        "(both: this project's round-trip sentencepiece, eod = the model's eos) or NullTokenizer; "
                        "default: SentencePieceTokenizer when --tokenizer-model is given (this project's meaning; "
                        "Megatron has no default)")
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model (tools/train_tokenizer.py), or with HuggingFaceTokenizer a "
                        "tokenizer.json or a directory holding one")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: ids 0..N-1 in the text, eod N (Megatron's size before EOD); other types: "
                        "checked to be at least the tokenizer's vocabulary (the dtype follows the tokenizer)")


def add_megatron_process_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron's processing flags")
    g.add_argument("--split-sentences", action="store_true",
                   help="refused: sentence splitting needs NLTK's punkt, which is not installed")
    g.add_argument("--keep-newlines", action="store_true",
                   help="accepted: documents are never split into sentences here, so their newlines are always "
                        "kept (in Megatron it keeps them between split sentences)")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted: Megatron processes N partitions of the input and merges them; the output here "
                        "is the same as with 1 (the input is read once, in order)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted: the documents always keep the input order")
    g.add_argument("--log-interval", type=int, default=None,
                   help="a progress line every N documents (instead of the progress bar)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p)
    add_tokenizer_arguments(p)
    add_megatron_process_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{json key}_document.bin/.idx")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto",
                   help="token dtype in .bin; auto: uint16 below 65,500 vocabulary, else int32")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_megatron_process_arguments(args: argparse.Namespace) -> None:
    if args.split_sentences:
        raise DataInputError("--split-sentences: not supported (needs NLTK's punkt sentence splitter, which is not "
                             "installed); documents are tokenized whole")
    if args.partitions < 1:
        raise DataInputError(f"--partitions: expected a positive number, got {args.partitions}")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(inputs=tuple(args.input), output_prefix=args.output_prefix,
                            tokenizer_model=args.tokenizer_model, corpus=corpus_config_from_args(args),
                            append_eod=args.append_eod, workers=args.workers, dtype=args.dtype,
                            progress=not args.no_progress, tokenizer_type=args.tokenizer_type,
                            vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
                            log_interval=args.log_interval)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        check_megatron_process_arguments(args)
        stats = preprocess(config_from_args(args))
        mb = stats.text_bytes / 1e6
        for prefix in stats.outputs:
            print(f"wrote {prefix}.bin/.idx")
        print(f"{stats.documents} documents, {stats.tokens} tokens, {mb:.1f} MB of text in {stats.seconds:.1f} s "
              f"({mb / max(stats.seconds, 1e-9):.2f} MB/s, {args.workers} workers)")
        return 0

    return run_tool(TOOL, run, interrupted="error: interrupted; no output written")


if __name__ == "__main__":
    sys.exit(main())
