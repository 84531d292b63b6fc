"""What both optimizers hand the AdamW step: chunks of parameters, grouped by their SR key.

A chunk is a contiguous 1-D piece of a parameter with its gradient and optimizer states and the
stream index of its first element. The single-process optimizer passes one chunk per parameter;
the distributed optimizer passes the pieces of parameters that fall inside its shard.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch

from ..numerics.philox import SRKey
from .sr_streams import sr_key_for


@dataclass
class AdamWChunk:
    param: torch.Tensor  # BF16 or FP32, contiguous, updated in place
    grad: torch.Tensor  # BF16 or FP32, same numel
    exp_avg: torch.Tensor  # FP32 or BF16
    exp_avg_sq: torch.Tensor  # FP32 or BF16
    base_index: int  # stream index of param[0] in the model-parallel rank's full parameter space
    weight_decay: float  # 0.0 for biases and norm weights


def weight_decay_for(param: torch.Tensor, weight_decay: float) -> float:
    """Decoupled weight decay on matrices only: none on biases and norm weights (Megatron's default)."""
    return weight_decay if param.dim() > 1 else 0.0


def group_by_sr_key(pieces: Iterable[tuple[torch.Tensor, AdamWChunk]], seed: int) -> dict[SRKey, list[AdamWChunk]]:
    """(parameter, chunk of it) pairs grouped by the parameter's SR key: `adamw_step_` takes one key per call."""
    groups: dict[SRKey, list[AdamWChunk]] = defaultdict(list)
    for param, chunk in pieces:
        groups[sr_key_for(param, seed)].append(chunk)
    return dict(groups)
