"""Check an indexed dataset and print what it holds:

    python3 -m megatron_sr.data PREFIX [--tokenizer-model M --show 2]
    python3 -m megatron_sr.data PREFIX --tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M --show 2

Exit status 1 with a one-line error naming the file when the .bin/.idx pair is not valid.
"""
import argparse
import sys

from .indexed_dataset import IndexedDataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m megatron_sr.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--tokenizer-model", help="sentencepiece model (or tokenizer.json), to print documents as text")
    p.add_argument("--tokenizer-type", help="Megatron's tokenizer type (default: sentencepiece with --tokenizer-model)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer's vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer's merges.txt")
    p.add_argument("--vocab-size", type=int, help="NullTokenizer's size")
    p.add_argument("--show", type=int, default=0, help="print the first N documents")
    args = p.parse_args(argv)
    try:
        ds = IndexedDataset(args.prefix)
        from .tokenizers import build_tokenizer
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                              args.vocab_size)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lengths = ds.sequence_lengths
    print(f"{args.prefix}: {len(ds)} sequences, {len(ds.document_indices) - 1} documents, "
          f"{ds.num_tokens} tokens, dtype {ds.dtype.name}, "
          f"length min/mean/max {lengths.min() if len(ds) else 0}/{lengths.mean() if len(ds) else 0:.1f}/"
          f"{lengths.max() if len(ds) else 0}")
    for i in range(min(args.show, len(ds))):
        ids = ds[i]
        print(f"--- document {i} ({len(ids)} tokens)")
        print(tok.detokenize(ids) if tok else ids.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
