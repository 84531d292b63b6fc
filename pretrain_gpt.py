#!/usr/bin/env python3
"""Pretrain a GPT with BF16 stochastic-rounding AdamW (Megatron-LM flags; see docs/training.md).

    python3 pretrain_gpt.py --config examples/gpt_125m.yaml --data-path data/my_text_document \
        --tokenizer-model data/tok.model --save ckpt
    torchrun --nproc-per-node 8 pretrain_gpt.py ...   (parallel layouts: see examples/)
"""

from __future__ import annotations

import sys

from megatron_sr.cli import run_tool
from megatron_sr.config import parse_config


def main(argv: list[str] | None = None):
    """The run's LoopResult, or the exit code of a failure (megatron_sr.cli: one line, exit 2)."""

    def train():
        cfg = parse_config(argv)  # ConfigError is a ValueError: one line naming the flag
        from megatron_sr.training.pretrain import pretrain

        return pretrain(cfg)

    # a second Ctrl-C ends up here (the first one saves and stops after the iteration)
    return run_tool("pretrain_gpt.py", train)


if __name__ == "__main__":
    outcome = main()
    sys.exit(outcome if isinstance(outcome, int) else 0)
