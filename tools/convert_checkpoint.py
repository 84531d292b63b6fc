#!/usr/bin/env python3
"""Change a megatron-sr checkpoint's tensor/pipeline/data-parallel layout, export it, or bring one in.

    # (tp 2, pp 2, dp 2) -> (tp 1, pp 1): a new checkpoint that loads at any dp size
    python tools/convert_checkpoint.py --load ckpt --save ckpt_tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-model-parallel-size 1
    # one file for tools/generate.py (model.safetensors, or a torch file for a .pt name)
    python tools/convert_checkpoint.py --load ckpt --export model.safetensors
    # a Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM, with the tokenizer)
    python tools/convert_checkpoint.py --load ckpt --export-hf hf_model --dtype bf16
    # a Hugging Face GPT-2 / Llama directory, or a Megatron-LM checkpoint, into a checkpoint at tp 2 x pp 2
    python tools/convert_checkpoint.py --from-hf hf_model --save ckpt_hf \\
        --target-tensor-parallel-size 2 --target-pipeline-model-parallel-size 2
    python tools/convert_checkpoint.py --from-megatron megatron_ckpt --save ckpt_megatron

--load takes a checkpoint root (latest iteration) or an iter_XXXXXXX directory. The formats are in
docs/distributed.md, the Hugging Face and Megatron-LM key mappings in docs/interop.md.
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
from megatron_sr.checkpoint.hf import DTYPES, TOKENIZER_DIR, copy_tokenizer, export_hf, import_hf
from megatron_sr.checkpoint.layout import LATEST
from megatron_sr.checkpoint.megatron_legacy import is_megatron_checkpoint, read_megatron_checkpoint
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


def continue_hint(full: FullModel, save: str, tokenizer_files: list[str]) -> str:
    """How to continue pretraining from an imported checkpoint: its model shape is in the saved config."""
    data = full.common["config"]["data"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in data.items()
                     if k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file") and v)
    tokenizer = (f"the tokenizer ({', '.join(tokenizer_files)}) is in {Path(save) / TOKENIZER_DIR}: {flags}"
                 if tokenizer_files else "no tokenizer files: give the tokenizer flags")
    return (f"continue pretraining with: pretrain_gpt.py --load {save} --use-checkpoint-args (the model's shape) "
            f"and {tokenizer} (--vocab-size {full.common['config']['model']['vocab_size']} when the tokenizer has "
            "fewer tokens)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert a megatron-sr checkpoint between layouts, export it, or bring "
                                             "a Hugging Face or Megatron-LM checkpoint in.")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint root or iter_XXXXXXX directory")
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face GPT-2 or Llama model directory (config.json "
                        "+ safetensors or pytorch_model.bin): a checkpoint at iteration 0 to continue pretraining")
    source.add_argument("--from-megatron", metavar="DIR", help="a Megatron-LM checkpoint root or iteration directory "
                        "(its legacy --ckpt-format torch): weights, iteration, consumed samples; a fresh optimizer")
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
    ap.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face model directory (GPT2LMHeadModel or "
                    "LlamaForCausalLM, config.json, model.safetensors, the tokenizer's files)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                    help="weights' dtype of --export-hf, and of the checkpoint written from --from-hf or "
                         "--from-megatron (default: as stored)")
    ap.add_argument("--vocab-size", type=int, help="with --from-megatron: the tokenizer's vocabulary (Megatron saves "
                    "only the padded size, used when not given)")
    ap.add_argument("--accept-gelu-approximation", action="store_true",
                    help="with --from-megatron: convert a model with Megatron's exact (erf) GELU although "
                         "megatron-sr's is tanh-approximate (logits differ slightly)")
    args = ap.parse_args(argv)
    if not args.save and not args.export and not args.export_hf:
        ap.error("give --save, --export and/or --export-hf")
    if args.from_hf and not args.save:
        ap.error("--from-hf needs --save (the checkpoint to write)")
    for flag, given in (("--vocab-size", args.vocab_size is not None),
                        ("--accept-gelu-approximation", args.accept_gelu_approximation)):
        if given and not args.from_megatron:
            ap.error(f"{flag} applies to --from-megatron only")
    for flag in ("target_tensor_parallel_size", "target_pipeline_model_parallel_size", "target_data_parallel_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")

    def read() -> FullModel:
        if args.from_hf or args.from_megatron:
            full = (import_hf(args.from_hf, Path(args.save) / TOKENIZER_DIR) if args.from_hf else
                    read_megatron_checkpoint(args.from_megatron, args.vocab_size, args.accept_gelu_approximation))
            if args.dtype:
                full.tensors = {k: v.to(DTYPES[args.dtype]) for k, v in full.tensors.items()}
            return full
        if is_megatron_checkpoint(args.load):
            raise ValueError(f"--load {args.load}: a Megatron-LM checkpoint; convert it with --from-megatron "
                             f"{args.load}")
        return read_full_checkpoint(args.load)

    def run() -> int:
        full = read()
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
            if args.from_hf:
                copied = copy_tokenizer(args.from_hf, Path(args.save) / TOKENIZER_DIR)
                print(continue_hint(full, args.save, copied))
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
        if args.export_hf:
            arch = export_hf(full, args.export_hf, args.dtype)
            print(f"exported {arch} to {args.export_hf} (vocabulary of {full.common['config']['model']['vocab_size']} "
                  "tokens, without Megatron's padding rows)")
        return 0

    return run_tool(TOOL, run, interrupted="error: interrupted; nothing of this conversion is kept")


if __name__ == "__main__":
    raise SystemExit(main())
