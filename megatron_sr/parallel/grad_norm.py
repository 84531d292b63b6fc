"""The global gradient norm over every parallel layout, counting each parameter exactly once, and clipping.

Which rank adds which gradient to the sum of squares:
- a tensor-parallel slice (`param.tensor_model_parallel`): every tp rank adds its own slice;
- a parameter replicated over tp ranks (norm weights, row-parallel biases, position embeddings):
  only tp rank 0 adds it (the replicas hold identical gradients);
- the last pipeline stage's copy of a tied embedding (`param.shared_embedding_copy`): never (the
  first stage counts the embedding; after the embedding all-reduce both copies hold the same grad);
- data-parallel replicas hold identical (all-reduced) gradients, so the dp group joins the sum only
  when each dp rank holds a different shard (the distributed optimizer's reduce-scatter).
The partial sums are then all-reduced over the model-parallel group (tp x pp) and, for sharded
gradients, over the dp group, so every rank gets the same norm.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from . import parallel_state as ps


def counts_in_grad_norm(param: torch.Tensor, tp_rank: int | None = None) -> bool:
    """Whether this rank adds `param`'s gradient to the global norm."""
    if getattr(param, "shared_embedding_copy", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    return tp_rank == 0


def _all_reduce_if_needed(t: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


@torch.no_grad()
def global_grad_norm(grads: Iterable[tuple[torch.Tensor, torch.Tensor]], *, sharded_over_dp: bool = False,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """L2 norm (FP32 0-d tensor, equal on all ranks) of the model's gradients.

    `grads` yields (param, grad) pairs; `grad` may be the whole `param.grad` or, for a sharded
    optimizer, this dp rank's piece of it (then pass `sharded_over_dp=True`). NaN/Inf propagate.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    total = None
    for param, grad in grads:
        if grad is None or not counts_in_grad_norm(param, tp_rank):
            continue
        g = grad.detach().reshape(-1).float()
        sq = torch.dot(g, g)
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), dtype=torch.float32, device=device)
    _all_reduce_if_needed(total, ps.get_model_parallel_group())
    if sharded_over_dp:
        _all_reduce_if_needed(total, ps.get_data_parallel_group())
    return total.sqrt()


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Megatron's factor: max_norm / (norm + 1e-6) when that is below 1, else 1 (no clipping at 0)."""
    if max_norm <= 0 or not torch.isfinite(torch.tensor(total_norm)):
        return 1.0
    coef = max_norm / (total_norm + 1e-6)
    return coef if coef < 1.0 else 1.0


@torch.no_grad()
def clip_grads_(grads: Iterable[torch.Tensor], total_norm: float, max_norm: float) -> float:
    """Scale the gradient tensors in place so their global norm is at most max_norm; returns the factor."""
    coef = clip_coefficient(float(total_norm), max_norm)
    if coef < 1.0:
        for g in grads:
            if g is not None:
                g.mul_(coef)
    return coef


@torch.no_grad()
def clip_grads_on_device_(grads: Iterable[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """clip_grads_ with the norm left on the device: the same factor (computed in FP64 as Python would,
    then rounded to FP32 as a scalar multiplier is) and no host synchronisation. A factor of 1 (no
    clipping, or a non-finite norm, whose step is skipped anyway) leaves the gradients' bits unchanged."""
    if max_norm <= 0:
        return
    norm = total_norm.double()
    coef = torch.where(torch.isfinite(norm), max_norm / (norm + 1e-6), torch.ones_like(norm))
    coef = torch.clamp(coef, max=1.0).float()
    for g in grads:
        if g is None:
            continue
        if g.dtype == torch.float32:
            g.mul_(coef)
        else:  # a BF16 tensor times an FP32 tensor would round the factor to BF16 first; a Python scalar does not
            g.copy_(g.float() * coef)


def model_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """global_grad_norm over params' `.grad` (the non-sharded path: plain DP, single process)."""
    params = list(params)
    device = params[0].device if params else None
    return global_grad_norm(((p, p.grad) for p in params), device=device)
