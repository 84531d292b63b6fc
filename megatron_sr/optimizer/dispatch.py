"""One entry point for the SR AdamW step over a list of chunks: the fused CUDA kernel or the reference.

A chunk is a contiguous 1-D piece of a parameter with its gradient and optimizer states and the
stream index of its first element. The single-process optimizer passes one chunk per parameter;
the distributed optimizer passes the pieces of parameters that fall inside its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adamw_reference import AdamWConstants, Rounding, adamw_reference_
from .philox import SRKey


@dataclass
class AdamWChunk:
    param: torch.Tensor  # BF16 or FP32, contiguous, updated in place
    grad: torch.Tensor  # BF16 or FP32, same numel
    exp_avg: torch.Tensor  # FP32 or BF16
    exp_avg_sq: torch.Tensor  # FP32 or BF16
    base_index: int  # stream index of param[0] in the model-parallel rank's full parameter space
    weight_decay: float  # 0.0 for biases and norm weights


def adamw_step_(
    chunks: list[AdamWChunk],
    *,
    scalars: torch.Tensor,
    step: int,
    consts: AdamWConstants,
    rounding: Rounding | str,
    key: SRKey,
) -> None:
    """Apply one AdamW step to every chunk in place (scalars from `step_scalars`)."""
    rounding = Rounding(rounding)
    for c in chunks:
        adamw_reference_(c.param, c.grad, c.exp_avg, c.exp_avg_sq, scalars=scalars, step=step, consts=consts,
                         weight_decay=c.weight_decay, rounding=rounding, key=key, base_index=c.base_index)
