"""Data parallelism over contiguous gradient buckets, with each bucket's collective overlapping backward.

`DistributedDataParallel(module, config, dp_group)` moves the module's parameters into a
`ParamAndGradBuffer`. During backward a post-accumulate-grad hook adds each `param.grad` into its
`param.main_grad` view (in the buffer's dtype) and frees `param.grad`. With `overlap_grad_reduce`
(Megatron's --overlap-grad-reduce), on the last micro-batch (outside `no_sync()`), as soon as every
parameter of a bucket has its gradient, that bucket's collective is started asynchronously: a
reduce-scatter onto this rank's shard with the distributed optimizer, an all-reduce without it.
Without it (Megatron's default) every bucket starts in `finish_grad_sync()`, after backward, which
waits for all. Either way each bucket is reduced by the same collective: the results are identical.

Gradients are averaged over data-parallel ranks: pre-scaled by 1/dp, then summed, as Megatron does (exact
for power-of-two dp sizes); with `average_in_collective`, summed and divided in the collective (NCCL's
ReduceOp.AVG; gloo has no AVG, so there the sum is divided after the wait).

With `overlap_param_gather` the distributed optimizer leaves its parameter all-gathers in flight after
the step (`set_param_gather_handles`); a forward pre-hook on each module waits for the buckets of its
own parameters just before it first uses them, so the gather of later layers overlaps the forward of
earlier ones. `finish_param_sync()` waits for whatever is left (before a checkpoint, say).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import parallel_state as ps
from .param_and_grad_buffer import DEFAULT_BUCKET_SIZE, Bucket, ParamAndGradBuffer

# torch >= 2.13 renames these collectives; the old names are what torch 2.5 .. 2.12 have.
warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`"
                        r" is deprecated", category=FutureWarning)


@dataclass
class DDPConfig:
    grad_dtype: torch.dtype = torch.float32
    use_distributed_optimizer: bool = False
    bucket_size: int | None = DEFAULT_BUCKET_SIZE  # elements per bucket; None: one bucket
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    average_in_collective: bool = False


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


class DistributedDataParallel(nn.Module):
    """Wraps `module`; forward is the module's. See the module docstring for the gradient path."""

    def __init__(self, module: nn.Module, config: DDPConfig, dp_group=None,
                 late_sync_params: Iterable[nn.Parameter] = (), before_late_sync: Callable[[], None] | None = None):
        super().__init__()
        self.module = module
        self.config = config
        if dp_group is None:
            dp_group = ps.get_data_parallel_group()
        self.dp_group = dp_group  # None: no data parallelism (one replica)
        self.dp_size = group_size(dp_group) if dp_group is not None else 1
        self.dp_rank = group_rank(dp_group) if dp_group is not None else 0
        self.buffer = ParamAndGradBuffer(list(module.parameters()), grad_dtype=config.grad_dtype,
                                         dp_size=self.dp_size, bucket_size=config.bucket_size)
        # Buckets holding these params start only in finish_grad_sync(), after `before_late_sync` ran
        # (e.g. pipeline/tied_embeddings.allreduce_tied_embedding_grads, which needs the full gradients:
        # after a reduce-scatter only this rank's shard would be valid, at different places per stage).
        self.before_late_sync = before_late_sync
        late = {id(p) for p in late_sync_params}
        self._late_buckets = {b.index for b in self.buffer.buckets if any(id(p) in late for p in b.params)}
        self._sync_enabled = True
        self._ready: list[set[int]] = [set() for _ in self.buffer.buckets]
        self._handles: dict[int, object] = {}
        self.event_log: list[tuple[str, int]] | None = None  # set to [] to record ("grad", i)/("launch", b)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self.buffer.params)]
        self._param_gathers: dict[int, object] = {}  # bucket index -> all-gather handle still in flight
        if config.overlap_param_gather:
            self._register_param_gather_hooks()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without communication (every micro-batch but the last)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _make_hook(self, param_index: int) -> Callable[[torch.Tensor], None]:
        param = self.buffer.params[param_index]
        bucket = self.buffer.param_to_bucket[param]

        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                p.main_grad.add_(p.grad)  # converts to the buffer's dtype
                p.grad = None
            if self.event_log is not None:
                self.event_log.append(("grad", param_index))
            if self._sync_enabled and self.config.overlap_grad_reduce:
                self._ready[bucket.index].add(id(param))
                if (len(self._ready[bucket.index]) == len(bucket.params)
                        and bucket.index not in self._late_buckets):
                    self._start_bucket(bucket)

        return hook

    def _start_bucket(self, bucket: Bucket) -> None:
        if bucket.index in self._handles:
            return
        if self.event_log is not None:
            self.event_log.append(("launch", bucket.index))
        if self.dp_size == 1:
            self._handles[bucket.index] = None
            return
        grads = self.buffer.bucket_grad_data(bucket)
        op = dist.ReduceOp.SUM
        if not self.config.average_in_collective:
            grads.mul_(1.0 / self.dp_size)
        elif dist.get_backend(self.dp_group) == "nccl":
            op = dist.ReduceOp.AVG
        if self.config.use_distributed_optimizer:
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            result = self.buffer.grad_data[lo:hi]
            handle = dist.reduce_scatter_tensor(result, grads, op=op, group=self.dp_group, async_op=True)
        else:
            result = grads
            handle = dist.all_reduce(grads, op=op, group=self.dp_group, async_op=True)
        # gloo's sum, to be divided once it has arrived (ReduceOp.AVG does that inside NCCL)
        divide = result if self.config.average_in_collective and op == dist.ReduceOp.SUM else None
        self._handles[bucket.index] = (handle, divide)

    def start_grad_sync(self) -> None:
        """Start every bucket not started yet (except late-sync ones)."""
        for bucket in self.buffer.buckets:
            if bucket.index not in self._late_buckets:
                self._start_bucket(bucket)

    def finish_grad_sync(self, before_late_sync: Callable[[], None] | None = None) -> None:
        """Start what is left (late-sync buckets after `before_late_sync`, given here or to the
        constructor), wait for every bucket; afterwards main_grad holds the dp-averaged grads (with the
        distributed optimizer: only in this rank's shard of each bucket)."""
        if self.is_grad_synced:
            return
        self.start_grad_sync()
        callback = before_late_sync or self.before_late_sync
        if callback is not None:
            callback()
        for index in self._late_buckets:
            self._start_bucket(self.buffer.buckets[index])
        for pending in self._handles.values():
            if pending is not None:
                handle, divide = pending
                handle.wait()
                if divide is not None:
                    divide.mul_(1.0 / self.dp_size)
        self._synced = True

    def set_param_gather_handles(self, handles: dict[int, object]) -> None:
        """The distributed optimizer's all-gathers in flight (bucket index -> handle), waited for lazily."""
        self.finish_param_sync()
        self._param_gathers = dict(handles)

    def finish_param_sync(self, buckets: Iterable[int] | None = None) -> None:
        """Wait for the parameter all-gathers of `buckets` (default: all) still in flight."""
        for index in list(self._param_gathers) if buckets is None else buckets:
            handle = self._param_gathers.pop(index, None)
            if handle is not None:
                handle.wait()

    def _register_param_gather_hooks(self) -> None:
        for module in self.module.modules():
            own = [p for p in module.parameters(recurse=False) if p in self.buffer.param_to_bucket]
            if own:
                buckets = sorted({self.buffer.param_to_bucket[p].index for p in own})
                module.register_forward_pre_hook(self._param_gather_hook(buckets))

    def _param_gather_hook(self, buckets: list[int]):
        @torch.compiler.disable  # a wait on a communication handle is not traceable: run it eagerly
        def hook(module, args):
            if self._param_gathers:
                self.finish_param_sync(buckets)

        return hook

    @property
    def is_grad_synced(self) -> bool:
        return getattr(self, "_synced", False)

    def zero_grad_buffer(self) -> None:
        """Zero the gradient buffer and reset the per-iteration bucket state."""
        self.buffer.zero_grad()
        for p in self.buffer.params:
            p.grad = None
        self._ready = [set() for _ in self.buffer.buckets]
        self._handles = {}
        self._synced = False

    def broadcast_params(self) -> None:
        """Make every dp replica start from rank 0's parameters (the model init is layout-independent,
        so this is a safety net, not a requirement)."""
        if self.dp_size > 1:
            src = dist.get_global_rank(self.dp_group, 0) if self.dp_group is not None else 0
            dist.broadcast(self.buffer.param_data, src=src, group=self.dp_group)
