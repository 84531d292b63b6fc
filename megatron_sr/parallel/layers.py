"""Parallel layers the GPT model is built from.

Contract shared by the model and the parallel code:
- Every layer takes an `init_method(full_tensor)` that fills the *full, unsharded* weight in place;
  the layer keeps its tensor-parallel slice, so initial weights do not depend on the layout.
- Weights are [out_features, in_features] like nn.Linear. Column-parallel splits dim 0 of the
  weight, row-parallel dim 1, the vocab-parallel embedding dim 0 (the vocabulary).
- Parameters carry `tensor_model_parallel` (bool) and `partition_dim` (int, -1 when replicated),
  which the gradient norm, SR random keys and checkpoint conversion read.
- Activations are [batch, seq, hidden] (the sequence dimension is `parallel_state.get_sequence_dim()`).
With a tensor-parallel size of 1 these are plain layers and communicate nothing.
- The two linear layers take an optional `quant` scheme: the six quantization points of simulated low-bit
  training (quantized_linear.py). Without one, or with every point off, they run plain F.linear.

Tensor parallelism (Megatron's): a column-parallel linear takes the full input and produces its slice
of the output features; the following row-parallel linear takes that slice and all-reduces the partial
products. Under --sequence-parallel the activations between those pairs are split along the sequence
instead of replicated: the column-parallel layer all-gathers its input along the sequence and the
row-parallel layer reduce-scatters its output, so norms and dropout work on 1/tp of the tokens. The
replicated parameters used on a sequence shard (norm weights, the row-parallel bias) then get only a
partial gradient on each rank; their gradients are summed over tp (`sequence_parallel_param`,
`register_sequence_parallel_grad_hooks`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel_state as ps
from .cross_entropy import VocabParallelCrossEntropy
from .mappings import (
    _all_reduce,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .partition import partition
from .quantized_linear import LinearQuant, QuantScheme, quantized_linear

InitMethod = Callable[[torch.Tensor], None]


def mark_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    param.tensor_model_parallel = partition_dim >= 0
    param.partition_dim = partition_dim
    return param


def _tp_slice(full: torch.Tensor, dim: int) -> torch.Tensor:
    return partition(full, dim, ps.get_tensor_model_parallel_world_size(),
                     ps.get_tensor_model_parallel_rank()).contiguous()


def _make_weight(shape: tuple[int, ...], dim: int, init_method: InitMethod, dtype: torch.dtype) -> nn.Parameter:
    full = torch.empty(shape, dtype=torch.float32)
    init_method(full)
    return mark_parallel(nn.Parameter(_tp_slice(full, dim).to(dtype)), dim)


def _sequence_parallel() -> bool:
    return ps.get_sequence_parallel()


def sequence_parallel_param(param: torch.Tensor) -> torch.Tensor:
    """Use a replicated parameter on a sequence shard: its gradient is summed over tp ranks in backward."""
    return copy_to_tensor_model_parallel_region(param) if _sequence_parallel() else param


def register_sequence_parallel_grad_hooks(params) -> int:
    """Sum the gradients of replicated parameters used on sequence shards (norm weights) over tp ranks.

    For models whose norm layers are plain torch modules: the hook runs before the gradient is
    accumulated into .grad (or a data-parallel buffer), so every optimizer sees the full gradient.
    A no-op (returns 0) unless --sequence-parallel is on with tp > 1; returns the number of hooks.
    """
    if not _sequence_parallel():
        return 0
    count = 0
    for param in params:
        if getattr(param, "tensor_model_parallel", False) or getattr(param, "sequence_parallel", False):
            continue
        param.sequence_parallel = True
        param.register_hook(_all_reduce)
        count += 1
    return count


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dimension (each rank computes its slice of y)."""

    def __init__(self, input_size: int, output_size: int, *, init_method: InitMethod, bias: bool = True,
                 gather_output: bool = False, dtype: torch.dtype = torch.float32,
                 quant: QuantScheme | None = None, quant_id: int = 0):
        super().__init__()
        self.gather_output = gather_output
        self.weight = _make_weight((output_size, input_size), 0, init_method, dtype)
        tp = ps.get_tensor_model_parallel_world_size()
        self.bias = mark_parallel(nn.Parameter(torch.zeros(output_size // tp, dtype=dtype)), 0) if bias else None
        self.quant = (LinearQuant(quant, quant_id, parallel="column", in_features=input_size,
                                  out_features=output_size // tp) if quant is not None and quant.enabled else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _sequence_parallel():
            if self.gather_output:
                raise ValueError("ColumnParallelLinear: gather_output is not supported with --sequence-parallel")
            x = gather_from_sequence_parallel_region(x, ps.get_sequence_dim())
        else:
            x = copy_to_tensor_model_parallel_region(x)
        if self.quant is not None:
            y = quantized_linear(x, self.weight, self.bias, self.quant)
        else:
            y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dimension; partial products summed over tp, bias replicated."""

    def __init__(self, input_size: int, output_size: int, *, init_method: InitMethod, bias: bool = True,
                 input_is_parallel: bool = True, dtype: torch.dtype = torch.float32,
                 quant: QuantScheme | None = None, quant_id: int = 0):
        super().__init__()
        self.input_is_parallel = input_is_parallel
        self.weight = _make_weight((output_size, input_size), 1, init_method, dtype)
        self.bias = mark_parallel(nn.Parameter(torch.zeros(output_size, dtype=dtype)), -1) if bias else None
        tp = ps.get_tensor_model_parallel_world_size()
        self.quant = (LinearQuant(quant, quant_id, parallel="row", in_features=input_size // tp,
                                  out_features=output_size) if quant is not None and quant.enabled else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        if self.quant is not None:
            partial = quantized_linear(x, self.weight, None, self.quant)
        else:
            partial = F.linear(x, self.weight)
        if _sequence_parallel():
            y = reduce_scatter_to_sequence_parallel_region(partial, ps.get_sequence_dim())
        else:
            y = reduce_from_tensor_model_parallel_region(partial)
        # The bias is added once, after the sum (adding it before would count it tp times).
        return y + sequence_parallel_param(self.bias) if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tensor-parallel ranks.

    Each rank looks up the tokens in its vocabulary range, zeros the rest, and the all-reduce sums
    the one non-zero row per token. The output is the full [batch, seq, hidden] on every tp rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = _make_weight((num_embeddings, embedding_dim), 0, init_method, dtype)
        per_rank = num_embeddings // ps.get_tensor_model_parallel_world_size()
        self.vocab_start = ps.get_tensor_model_parallel_rank() * per_rank
        self.vocab_end = self.vocab_start + per_rank

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if ps.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)


def parallel_lm_logits(hidden: torch.Tensor, word_embedding_weight: torch.Tensor, *,
                       gather_output: bool = False) -> torch.Tensor:
    """Vocab-parallel logits [.., vocab / tp] from hidden states and the (tied) embedding weight.

    Under --sequence-parallel `hidden` is this rank's sequence shard and is all-gathered first.
    `gather_output=True` returns the full vocabulary (for generation).
    """
    if _sequence_parallel():
        hidden = gather_from_sequence_parallel_region(hidden, ps.get_sequence_dim())
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    logits = F.linear(hidden, word_embedding_weight)
    return gather_from_tensor_model_parallel_region(logits) if gather_output else logits


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (FP32) from vocab-parallel logits; same shape as target."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return VocabParallelCrossEntropy.apply(logits, target)
