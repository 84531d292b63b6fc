"""Autograd functions that move activations between tensor-parallel ranks.

Each forward collective has the adjoint collective as its backward:

| function | forward | backward |
|---|---|---|
| copy_to_tensor_model_parallel_region | identity | all-reduce |
| reduce_from_tensor_model_parallel_region | all-reduce | identity |
| scatter_to_tensor_model_parallel_region | keep my slice of the last dim | all-gather last dim |
| gather_from_tensor_model_parallel_region | all-gather last dim | keep my slice |
| scatter_to_sequence_parallel_region | keep my slice of dim `dim` | all-gather `dim` |
| gather_from_sequence_parallel_region | all-gather `dim` | reduce-scatter `dim` |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter `dim` | all-gather `dim` |

With a tensor-parallel size of 1 every function returns its input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import parallel_state as ps
from .partition import partition

# torch >= 2.12 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
_reduce_scatter_fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _tp() -> tuple[int, int, object]:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    size, _, group = _tp()
    if size == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank, _ = _tp()
    if size == 1:
        return x
    return partition(x, dim, size, rank).contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, _, group = _tp()
    if size == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0],) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, _, group = _tp()
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {size}")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_fn(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    """All-gather along the sequence; backward reduce-scatters, since every rank used the whole sequence."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x) if ps.get_tensor_model_parallel_world_size() > 1 else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x) if ps.get_tensor_model_parallel_world_size() > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToRegion.apply(x, x.dim() - 1) if ps.get_tensor_model_parallel_world_size() > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromRegion.apply(x, x.dim() - 1) if ps.get_tensor_model_parallel_world_size() > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _ScatterToRegion.apply(x, dim) if ps.get_tensor_model_parallel_world_size() > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _GatherFromSequenceRegion.apply(x, dim) if ps.get_tensor_model_parallel_world_size() > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _ReduceScatterToSequenceRegion.apply(x, dim) if ps.get_tensor_model_parallel_world_size() > 1 else x
