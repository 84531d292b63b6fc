"""--log-params-norm and --log-num-zeros-in-grad: the parameters' L2 norm and the number of zero gradient
elements, over the whole model at any tp x pp x dp layout, each element counted once.

Both read the pieces the optimizer updates (`optimizer_pieces`): the whole parameters and their gradients
for SRAdamW and for plain data parallelism, this rank's shard of each for the distributed optimizer. Which
rank counts which piece is the global grad norm's rule (parallel/grad_norm.py): tensor-parallel slices on
every tp rank, tp-replicated parameters on tp rank 0 only, the last stage's tied-embedding copy never; the
sums are then reduced over the model-parallel group and, for shards, over the data-parallel group.

The values stay on the device (0-d tensors): the loop reads them with the rest of its records at a log line.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from ..distributed import DistributedOptimizer
from ..parallel import parallel_state as ps
from ..parallel.grad_norm import counts_in_grad_norm, global_grad_norm

Piece = tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor]  # (param, its gradient, its values)


def optimizer_pieces(optimizer) -> tuple[list[Piece], bool]:
    """(param, grad, param values) for what this rank's optimizer updates, and whether the pieces are this dp
    rank's shard. Under DDP the gradient sync is finished first (the step would do it next anyway)."""
    if isinstance(optimizer, DistributedOptimizer):
        model = optimizer.model
        model.finish_grad_sync()
        buf = model.buffer
        pieces = [(pc.param, buf.grad_data[pc.lo:pc.hi], buf.param_data[pc.lo:pc.hi]) for pc in optimizer.pieces]
        return pieces, optimizer.shard and model.dp_size > 1
    return [(p, g, p.detach()) for p, g in zip(optimizer.params, optimizer.grads())], False


@torch.no_grad()
def params_norm(optimizer) -> torch.Tensor:
    """L2 norm (FP32 0-d tensor, the same on every rank) of all the model's parameters, as the optimizer
    holds them after its step."""
    pieces, sharded = optimizer_pieces(optimizer)
    device = pieces[0][2].device if pieces else None
    return global_grad_norm(((p, values) for p, _, values in pieces), sharded_over_dp=sharded, device=device)


def _counted_grads(pieces: list[Piece]) -> Iterator[torch.Tensor]:
    tp_rank = ps.get_tensor_model_parallel_rank()
    for param, grad, _ in pieces:
        if grad is not None and counts_in_grad_norm(param, tp_rank):
            yield grad


def _sum_over(total: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)


@torch.no_grad()
def num_zeros_in_grad(optimizer) -> torch.Tensor:
    """Number of gradient elements equal to zero over the whole model (int64 0-d tensor, the same on every
    rank), as the optimizer's step is about to read them (after the dp reduction, before clipping)."""
    pieces, sharded = optimizer_pieces(optimizer)
    device = pieces[0][2].device if pieces else None
    total = torch.zeros((), dtype=torch.int64, device=device)
    for grad in _counted_grads(pieces):
        total += (grad == 0).sum()
    _sum_over(total, ps.get_model_parallel_group())
    if sharded:
        _sum_over(total, ps.get_data_parallel_group())
    return total
