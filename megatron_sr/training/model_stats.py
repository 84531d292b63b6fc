"""--log-params-norm and --log-num-zeros-in-grad: the parameters' L2 norm and the number of zero gradient
elements, over the whole model at any tp x pp x dp layout, each element counted once.

Both read the pieces the optimizer updates (`optimizer_pieces`): the whole parameters and their gradients
for SRAdamW and for plain data parallelism, this rank's shard of each for the distributed optimizer. Which
rank counts which piece is the global grad norm's rule (parallel/grad_norm.py): tensor-parallel slices on
every tp rank, tp-replicated parameters on tp rank 0 only, the last stage's tied-embedding copy never; the
sums are then reduced over the model-parallel group and, for shards, over the data-parallel group.

--log-update-stall-interval N (`UpdateStallProbe`): at every N-th iteration, the fraction of the weight updates
that round to no change. The weights are the ones the optimizer keeps as the truth (the FP32 master in bf16-mp,
the parameters themselves in bf16-sr, bf16 and fp32); an element counts when its gradient is nonzero (Adam then
moves it), and stalls when its stored bits are the same after the step. Pieces are counted by the same rule.

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


def _stored_weights(optimizer, pieces: list[Piece]) -> list[torch.Tensor]:
    """Per piece, the values the optimizer's step writes: its FP32 master where it keeps one, else the param."""
    master = optimizer.master
    if master is None:
        return [values for _, _, values in pieces]
    if isinstance(optimizer, DistributedOptimizer):
        return [master[pc.state_offset:pc.state_offset + pc.hi - pc.lo] for pc in optimizer.pieces]
    return list(master)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0 vs +0 counts as a change and NaN as equal to itself."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class UpdateStallProbe:
    """Made just before the optimizer step (it copies the counted weights), read just after it (`fraction`)."""

    @torch.no_grad()
    def __init__(self, optimizer):
        pieces, self.sharded = optimizer_pieces(optimizer)
        tp_rank = ps.get_tensor_model_parallel_rank()
        self.device = pieces[0][2].device if pieces else None
        self.entries = [(weights, _bits(weights).clone(), grad.reshape(weights.shape) != 0)
                        for (param, grad, _), weights in zip(pieces, _stored_weights(optimizer, pieces))
                        if grad is not None and counts_in_grad_norm(param, tp_rank)]

    @torch.no_grad()
    def fraction(self, skipped: torch.Tensor) -> torch.Tensor:
        """Stalled / updated elements over the whole model (FP32 0-d tensor, the same on every rank); NaN when
        the step was skipped (NaN/Inf gradients) or no gradient was nonzero."""
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)  # (stalled, updated)
        for weights, before, moved in self.entries:
            counts[0] += ((_bits(weights) == before) & moved).sum()
            counts[1] += moved.sum()
        _sum_over(counts, ps.get_model_parallel_group())
        if self.sharded:
            _sum_over(counts, ps.get_data_parallel_group())
        value = counts[0].float() / counts[1].float()  # 0/0 is NaN
        return torch.where(skipped.to(value.device).bool(), torch.full_like(value, float("nan")), value)
