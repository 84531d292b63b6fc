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
    except (FileNotFoundError, ValueError) as exc:  # bad paths / data: one line, not a traceback
        print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
