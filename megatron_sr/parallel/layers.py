"""Parallel layers the GPT model is built from.

Contract shared by the model and the parallel code:
- Every layer takes an `init_method(full_tensor)` that fills the *full, unsharded* weight in place;
  the layer keeps its tensor-parallel slice, so initial weights do not depend on the layout.
- Weights are [out_features, in_features] like nn.Linear. Column-parallel splits dim 0 of the
  weight, row-parallel dim 1, the vocab-parallel embedding dim 0 (the vocabulary).
- Parameters carry `tensor_model_parallel` (bool) and `partition_dim` (int, -1 when replicated),
  which the gradient norm, SR random keys and checkpoint conversion read.
With a tensor-parallel size of 1 (the only case implemented here so far) these are plain layers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel_state as ps

InitMethod = Callable[[torch.Tensor], None]


def mark_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    param.tensor_model_parallel = partition_dim >= 0
    param.partition_dim = partition_dim
    return param


def _tp_slice(full: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if full.shape[dim] % size:
        raise ValueError(f"dimension {full.shape[dim]} is not divisible by the tensor-parallel size {size}")
    return full.chunk(size, dim=dim)[rank].contiguous()


def _make_weight(shape: tuple[int, ...], dim: int, init_method: InitMethod, dtype: torch.dtype) -> nn.Parameter:
    full = torch.empty(shape, dtype=torch.float32)
    init_method(full)
    return mark_parallel(nn.Parameter(_tp_slice(full, dim).to(dtype)), dim)


def _require_single_rank(name: str) -> None:
    if ps.get_tensor_model_parallel_world_size() != 1:
        raise NotImplementedError(f"{name}: tensor parallelism is not implemented yet")


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dimension."""

    def __init__(self, input_size: int, output_size: int, *, init_method: InitMethod, bias: bool = True,
                 gather_output: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        _require_single_rank("ColumnParallelLinear")
        self.gather_output = gather_output
        self.weight = _make_weight((output_size, input_size), 0, init_method, dtype)
        self.bias = mark_parallel(nn.Parameter(torch.zeros(output_size, dtype=dtype)), 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dimension; the bias is replicated."""

    def __init__(self, input_size: int, output_size: int, *, init_method: InitMethod, bias: bool = True,
                 input_is_parallel: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        _require_single_rank("RowParallelLinear")
        self.input_is_parallel = input_is_parallel
        self.weight = _make_weight((output_size, input_size), 1, init_method, dtype)
        self.bias = mark_parallel(nn.Parameter(torch.zeros(output_size, dtype=dtype)), -1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tensor-parallel ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        _require_single_rank("VocabParallelEmbedding")
        self.num_embeddings = num_embeddings
        self.weight = _make_weight((num_embeddings, embedding_dim), 0, init_method, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def parallel_lm_logits(hidden: torch.Tensor, word_embedding_weight: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [.., vocab / tp] from hidden states and the (tied) embedding weight."""
    return F.linear(hidden, word_embedding_weight)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (FP32) from vocab-parallel logits; same shape as target."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
