"""The sharded SR AdamW optimizer over a DistributedDataParallel model's buffers.

Each data-parallel rank owns one contiguous shard of every bucket (ParamAndGradBuffer) and keeps the
optimizer states (FP32 by default) for that shard only. One step:

1. finish the gradient sync (the buckets' reduce-scatters, started during backward);
2. the global gradient norm (parallel/grad_norm.py): squares summed over this rank's pieces of the
   parameters it counts (tensor-parallel replicas and the last stage's tied-embedding copy once),
   all-reduced over the model-parallel and dp groups; NaN/Inf skips the step on every rank alike;
3. clipping, then `adamw_step_` on the shard's pieces, each with its *unsharded* stream index
   (`param.sr_index_base` + offset in the param) and its parameter's key, so the shard's update is
   bitwise the slice of the unsharded update; BF16 results go straight into the parameter buffer;
4. all-gather of the parameter buffer, bucket by bucket (with --overlap-param-gather left in flight,
   each bucket waited for by the next forward just before it uses it: data_parallel.py).

With `shard_over_dp=False` (plain data parallelism: grads all-reduced) every rank updates whole
buckets and no all-gather is needed; with dp = 1 both modes are the single-process update.
`precision="bf16-mp"` keeps an FP32 master copy of the shard (Megatron's baseline, for comparison).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from ..optimizer.adamw_reference import AdamWConstants, step_scalars
from ..optimizer.chunks import AdamWChunk, group_by_sr_key, weight_decay_for
from ..optimizer.dispatch import adamw_step_
from ..optimizer.sr_adamw import DeviceStepCount, StepResult, finite_step  # shared by both optimizers
from ..optimizer.sr_streams import check_sr_streams
from ..parallel import parallel_state as ps
from ..parallel.grad_norm import clip_grads_on_device_, global_grad_norm
from ..precision import precision_mode
from .data_parallel import DistributedDataParallel

STATE_FORMAT = "megatron_sr.distributed_optimizer/1"


@dataclass
class _Piece:
    param: nn.Parameter
    name: str
    lo: int  # range in the buffers
    hi: int
    offset: int  # first element's flat offset inside the param
    state_offset: int  # range start in this rank's flat state tensors


class DistributedOptimizer(DeviceStepCount):
    def __init__(self, model: DistributedDataParallel, config: OptimizerConfig, *, seed: int,
                 shard_over_dp: bool | None = None):
        mode = precision_mode(config.precision)
        self.model = model
        self.config = config
        self.param_groups = [{"lr": config.lr}]  # torch-style: a scheduler may set param_groups[0]["lr"]
        self._seed = seed
        self.shard = model.config.use_distributed_optimizer if shard_over_dp is None else shard_over_dp
        if self.shard and not model.config.use_distributed_optimizer and model.dp_size > 1:
            raise ValueError("sharding the optimizer needs DDP with use_distributed_optimizer=True (reduce-scatter)")
        if model.dp_group is not ps.get_data_parallel_group():
            raise ValueError("DistributedOptimizer: the model's dp group must be parallel_state's (the norm is reduced "
                             "over parallel_state's groups)")
        self.consts = AdamWConstants.make(config.adam_beta1, config.adam_beta2, config.adam_eps)
        self.rounding = mode.rounding
        buf = model.buffer
        check_sr_streams(model.module.named_parameters())
        names = {p: n for n, p in model.module.named_parameters()}
        self.pieces: list[_Piece] = []
        total = 0
        for p, lo, hi, off in buf.shard_pieces(model.dp_rank, self.shard):
            self.pieces.append(_Piece(p, names[p], lo, hi, off, total))
            total += hi - lo
        device = buf.param_data.device
        state_dtype = mode.state_dtype(config.optimizer_state_dtype)
        self.exp_avg = torch.zeros(total, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(total, dtype=state_dtype, device=device)
        self.master = None
        if mode.fp32_master:
            self.master = torch.empty(total, dtype=torch.float32, device=device)
            for pc in self.pieces:
                self.master[pc.state_offset:pc.state_offset + pc.hi - pc.lo].copy_(buf.param_data[pc.lo:pc.hi])
        # updates applied, on the device: the SR stream's step counter and the bias corrections read it there
        self._step = torch.zeros((), dtype=torch.int64, device=device)
        self._groups = self._chunk_groups()

    def _chunk_groups(self):
        """AdamW chunks grouped by SR key (adamw_step_ takes one key per call)."""
        buf = self.model.buffer
        pieces = []
        for pc in self.pieces:
            s = slice(pc.state_offset, pc.state_offset + pc.hi - pc.lo)
            param = self.master[s] if self.master is not None else buf.param_data[pc.lo:pc.hi]
            pieces.append((pc.param, AdamWChunk(param, buf.grad_data[pc.lo:pc.hi], self.exp_avg[s], self.exp_avg_sq[s],
                                                pc.param.sr_index_base + pc.offset,
                                                weight_decay_for(pc.param, self.config.weight_decay))))
        return group_by_sr_key(pieces, self._seed)

    # ---- the trainer's optimizer interface ----
    @property
    def seed(self) -> int:
        """The SR stream's seed (settable, like SRAdamW's: the chunks' keys are rebuilt)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)
        self._groups = self._chunk_groups()

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = float(value)

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (FP32 tensor), the same on every rank (parallel/grad_norm.py)."""
        buf = self.model.buffer
        return global_grad_norm(((pc.param, buf.grad_data[pc.lo:pc.hi]) for pc in self.pieces),
                                sharded_over_dp=self.shard and self.model.dp_size > 1, device=buf.grad_data.device)

    @torch.no_grad()
    def step(self) -> StepResult:
        self.model.finish_param_sync()  # the shard is about to be rewritten: no gather may still read it
        self.model.finish_grad_sync()
        norm = self.grad_norm()
        skip = finite_step(norm, self._step)  # no host synchronisation from here to the end of the step
        buf = self.model.buffer
        # one multiply per bucket shard (padding is zero), not one per parameter piece
        clip_grads_on_device_((buf.grad_data[lo:hi] for lo, hi in self._shard_ranges()), norm, self.config.clip_grad)
        device = buf.param_data.device
        scalars = step_scalars(self.lr, self._step, self.config.adam_beta1, self.config.adam_beta2, device, skip)
        path = None
        for key, chunks in self._groups.items():
            path = adamw_step_(chunks, scalars=scalars, step=self._step, consts=self.consts,
                               rounding=self.rounding, key=key) or path
        if self.master is not None:
            for pc in self.pieces:
                buf.param_data[pc.lo:pc.hi].copy_(self.master[pc.state_offset:pc.state_offset + pc.hi - pc.lo])
        self._all_gather_params()
        return StepResult(norm, skip, path)

    def _shard_ranges(self) -> list[tuple[int, int]]:
        buf, model = self.model.buffer, self.model
        if not self.shard:
            return [(b.start, b.end) for b in buf.buckets]
        return [b.shard_range(model.dp_rank, model.dp_size) for b in buf.buckets]

    def _all_gather_params(self) -> None:
        model = self.model
        if not self.shard or model.dp_size == 1:
            return
        buf = model.buffer
        handles = {}
        for bucket in buf.buckets:
            lo, hi = bucket.shard_range(model.dp_rank, model.dp_size)
            # in place: the input is this rank's slice of the output, as Megatron does with NCCL
            handles[bucket.index] = dist.all_gather_into_tensor(buf.bucket_param_data(bucket), buf.param_data[lo:hi],
                                                                group=model.dp_group, async_op=True)
        model.set_param_gather_handles(handles)
        if not model.config.overlap_param_gather:
            model.finish_param_sync()

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers still in flight (--overlap-param-gather): the full parameters."""
        self.model.finish_param_sync()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for params, grads and optimizer states (FP32 master included), from the
        real buffers: the numbers behind the precision table's bytes per parameter (tools/bench_memory.py)."""
        buf = self.model.buffer
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        states = size(self.exp_avg) + size(self.exp_avg_sq) + (size(self.master) if self.master is not None else 0)
        return {"params": size(buf.param_data), "grads": size(buf.grad_data), "optimizer_states": states,
                "num_params": buf.numel_unpadded}

    # ---- checkpoint state: pieces named by parameter, so any dp layout can load any other ----
    def state_dict(self) -> dict:
        pieces = [{"name": pc.name, "offset": pc.offset, "numel": pc.hi - pc.lo, "state_offset": pc.state_offset}
                  for pc in self.pieces]
        return {"format": STATE_FORMAT, "step": self.step_count, "lr": self.lr, "pieces": pieces,
                "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "master": None if self.master is None else self.master.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Load a state saved at any dp size (one rank's, or several merged with `merge_state_dicts`)."""
        self.load_state_dicts([state])

    @torch.no_grad()
    def load_state_dicts(self, states: Iterable[dict]) -> None:
        """Load from several ranks' states, one at a time (e.g. a generator reading files): each rank
        copies only the ranges of its own pieces, so it never holds more than one saved shard."""
        covered = [0] * len(self.pieces)
        by_name = defaultdict(list)
        for i, pc in enumerate(self.pieces):
            by_name[pc.name].append(i)
        step = lr = None
        any_master = True
        for state in states:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"optimizer state: expected format {STATE_FORMAT}, got {state.get('format')!r}")
            step, lr = int(state["step"]), float(state.get("lr", self.lr))
            any_master &= state.get("master") is not None
            for sp in state["pieces"]:
                for i in by_name.get(sp["name"], []):
                    covered[i] += self._copy_overlap(self.pieces[i], sp, state)
        if step is None:
            raise ValueError("optimizer state: nothing to load")
        for pc, got in zip(self.pieces, covered):
            if got != pc.hi - pc.lo:
                raise ValueError(f"optimizer state: parameter {pc.name} elements [{pc.offset}, "
                                 f"{pc.offset + pc.hi - pc.lo}) are not all in the checkpoint ({got} found)")
        if self.master is not None and not any_master:  # saved without a master: start from the params
            for pc in self.pieces:
                self.master[pc.state_offset:pc.state_offset + pc.hi - pc.lo].copy_(
                    self.model.buffer.param_data[pc.lo:pc.hi])
        self.step_count, self.lr = step, lr

    def _copy_overlap(self, pc: _Piece, sp: dict, state: dict) -> int:
        n = pc.hi - pc.lo
        lo, hi = max(pc.offset, sp["offset"]), min(pc.offset + n, sp["offset"] + sp["numel"])
        if lo >= hi:
            return 0
        dst = slice(pc.state_offset + lo - pc.offset, pc.state_offset + hi - pc.offset)
        src = slice(sp["state_offset"] + lo - sp["offset"], sp["state_offset"] + hi - sp["offset"])
        self.exp_avg[dst].copy_(state["exp_avg"][src])
        self.exp_avg_sq[dst].copy_(state["exp_avg_sq"][src])
        if self.master is not None and state.get("master") is not None:
            self.master[dst].copy_(state["master"][src])
        return hi - lo


def merge_state_dicts(states: list[dict]) -> dict:
    """Concatenate several ranks' optimizer states into one state that `load_state_dict` accepts."""
    if not states:
        raise ValueError("merge_state_dicts: no states given")
    pieces, base = [], 0
    for st in states:
        for sp in st["pieces"]:
            pieces.append(dict(sp, state_offset=sp["state_offset"] + base))
        base += st["exp_avg"].numel()
    masters = [st.get("master") for st in states]
    return {"format": STATE_FORMAT, "step": states[0]["step"], "lr": states[0]["lr"], "pieces": pieces,
            "exp_avg": torch.cat([st["exp_avg"] for st in states]),
            "exp_avg_sq": torch.cat([st["exp_avg_sq"] for st in states]),
            "master": torch.cat(masters) if all(m is not None for m in masters) else None}
