#!/usr/bin/env python3
"""Pretrain a GPT with BF16 stochastic-rounding AdamW (Megatron-LM flags; see docs/training.md).

    python3 pretrain_gpt.py --config examples/gpt_125m.yaml --data-path data/my_text_document \
        --tokenizer-model data/tok.model --save ckpt
    torchrun --nproc-per-node 8 pretrain_gpt.py ...   (parallel layouts: see examples/)
"""

from __future__ import annotations

import sys

from megatron_sr.config import ConfigError, parse_config


def main(argv: list[str] | None = None):
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    from megatron_sr.training.pretrain import pretrain

    try:
        return pretrain(cfg)
    except (OSError, ValueError) as exc:  # bad paths, data, checkpoints, a full disk, divergence: one line
        print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops after the iteration)
        print("pretrain_gpt.py: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, then the traceback for the report
        print(f"pretrain_gpt.py: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
