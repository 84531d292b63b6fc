#!/usr/bin/env python3
"""Change a megatron-sr checkpoint's tensor/pipeline/data-parallel layout, or export a single-file model.

    # (tp 2, pp 2, dp 2) -> (tp 1, pp 1): a new checkpoint that loads at any dp size
    python tools/convert_checkpoint.py --load ckpt --save ckpt_tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-model-parallel-size 1
    # one file for tools/generate.py (safetensors when the package is installed, else a torch file)
    python tools/convert_checkpoint.py --load ckpt --export model.safetensors

--load takes a checkpoint root (latest iteration) or an iter_XXXXXXX directory. The formats are in
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from megatron_sr.checkpoint.convert import (
    FullModel,
    padded_vocab_for,
    read_full_checkpoint,
    repad_vocab,
    write_checkpoint,
)
from megatron_sr.checkpoint.export import write_export
from megatron_sr.checkpoint.layout import LATEST
from megatron_sr.cli import run_tool

TOOL = "convert_checkpoint.py"



def write_or_nothing(full: FullModel, save: str, tp: int, pp: int, dp: int) -> Path:
    """write_checkpoint, but a refusal or failure half-way leaves nothing of this conversion in `save`: its
    staging directory (named as in checkpoint/layout.staging_dir) goes, and so does an iteration directory
    renamed in before `latest` could be written. An iteration that was there before is never touched."""
    root = Path(save)
    root_existed = root.exists()
    final = root / f"iter_{full.iteration:07d}"
    final_existed = final.exists()
    try:
        return write_checkpoint(full, root, tp=tp, pp=pp, dp=dp)
    except BaseException:
        shutil.rmtree(root / f".{final.name}.tmp", ignore_errors=True)
        if not final_existed:
            shutil.rmtree(final, ignore_errors=True)
            (root / f"{LATEST}.tmp").unlink(missing_ok=True)
        if not root_existed:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert a megatron-sr checkpoint between layouts or export it.")
    ap.add_argument("--load", required=True, help="checkpoint root or iter_XXXXXXX directory")
    ap.add_argument("--save", help="output checkpoint root (must not hold this iteration yet)")
    ap.add_argument("--target-tensor-parallel-size", type=int, default=1)
    ap.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--target-data-parallel-size", type=int, default=1,
                    help="recorded in metadata only: the optimizer state loads at any dp size")
    ap.add_argument("--layer-numbering", choices=["local", "global"],
                    help="transformer layer numbers per stage in the output (default: as in the input)")
    ap.add_argument("--tie", action="append", default=[], metavar="COPY=SOURCE",
                    help="last-stage tied copy name and the embedding it copies (needed when splitting a pp=1 "
                         "checkpoint into stages)")
    ap.add_argument("--target-padded-vocab-size", type=int,
                    help="rows of the vocab-parallel weights in the output (default: from the saved config, "
                         "a multiple of --make-vocab-size-divisible-by x target tp; else unchanged)")
    ap.add_argument("--export", help="write a single-file model (.safetensors or .pt)")
    args = ap.parse_args(argv)
    if not args.save and not args.export:
        ap.error("give --save and/or --export")
    for flag in ("target_tensor_parallel_size", "target_pipeline_model_parallel_size", "target_data_parallel_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    def run() -> int:
        full = read_full_checkpoint(args.load)
        if args.layer_numbering:
            full.layer_numbering = args.layer_numbering
        for tie in args.tie:
            copy, _, source = tie.partition("=")
            if not copy or source not in full.tensors:
                ap.error(f"--tie {tie}: expected COPY=SOURCE with SOURCE a parameter of the checkpoint")
            full.ties[copy] = source
            full.section[copy] = "post"
            full.partition_dim[copy] = full.partition_dim[source]
        padded = args.target_padded_vocab_size or padded_vocab_for(full.common, args.target_tensor_parallel_size)
        if args.save and padded is not None:
            old = repad_vocab(full, padded)
            if old != padded:
                print(f"vocabulary padding {old} -> {padded} rows (padding rows are zeros; logits of padding "
                      "rows change, so the loss differs slightly from the source layout)")
        if args.save:
            out = write_or_nothing(full, args.save, tp=args.target_tensor_parallel_size,
                                   pp=args.target_pipeline_model_parallel_size, dp=args.target_data_parallel_size)
            print(f"wrote {out}")
        if args.export:
            padded_one = args.target_padded_vocab_size or padded_vocab_for(full.common, 1)
            if padded_one is not None:
                repad_vocab(full, padded_one)  # the exported model is a tp = 1 model
            export = Path(args.export)
            try:
                kind = write_export(full, export)
            except BaseException:  # write_export leaves its temporary name behind on a failure
                export.with_name(export.name + ".tmp").unlink(missing_ok=True)
                raise
            print(f"exported {len(full.tensors)} tensors to {args.export} ({kind})")
        return 0

    return run_tool(TOOL, run, interrupted="error: interrupted; nothing of this conversion is kept")


if __name__ == "__main__":
    raise SystemExit(main())
