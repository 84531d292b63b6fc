"""How tensor parallelism cuts a tensor: `parts` equal pieces along one dimension, piece `index` for rank `index`.

Weights at initialisation (parallel/layers.py), activations in the tp mappings (parallel/mappings.py)
and checkpoints at another tp size (checkpoint/convert.py) all cut the same way, through this one function.
"""

from __future__ import annotations

import torch


def partition(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """Piece `index` of `tensor` split into `parts` along `dim` (a view); ValueError when it does not divide."""
    if tensor.shape[dim] % parts:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} is not divisible by the tensor-parallel "
                         f"size {parts}")
    return tensor.chunk(parts, dim=dim)[index]
