"""The single-process AdamW optimizer in the four precision modes (megatron_sr/precision.py).

FP32 main grads (bf16-mp, or --grad-dtype fp32) are accumulated over micro-batches by a
post-accumulate-grad hook that adds each BF16 .grad into the FP32 buffer and frees it, so the BF16
gradient of one micro-batch never sums with another's in BF16.

One `step()`: global grad norm (NaN/Inf: skip and report), clipping, then `dispatch.adamw_step_`
per SR key with each parameter's canonical stream index (optimizer/sr_streams.py).
The interface (step -> StepResult, zero_grad, state_dict, load_state_dict, `lr`, `seed`) is shared with
megatron_sr.distributed.DistributedOptimizer; both take the trainer's OptimizerConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import OptimizerConfig
from ..parallel.grad_norm import clip_grads_on_device_, global_grad_norm
from ..precision import precision_mode
from .adamw_reference import AdamWConstants, step_scalars
from .chunks import AdamWChunk, group_by_sr_key, weight_decay_for
from .dispatch import adamw_step_
from .sr_streams import check_sr_streams

STATE_FORMAT = "megatron_sr.sr_adamw/1"


@dataclass
class StepResult:
    """What one optimizer step did. The norm and the skip decision stay on the device: reading
    `grad_norm`, `skipped` or `updated` synchronises with it, so the loop reads them at log intervals."""

    grad_norm_tensor: torch.Tensor  # FP32 0-d: the global gradient norm before clipping
    skipped_tensor: torch.Tensor  # bool 0-d: NaN/Inf in the gradients, nothing was updated
    path: str | None = None  # which AdamW ran: "fused" (the CUDA kernel) or "reference"

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_tensor)

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_tensor)

    @property
    def updated(self) -> bool:
        return not self.skipped


@torch.no_grad()
def finite_step(norm: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The skip decision on the device: non-finite norm -> skip; otherwise the step counter advances."""
    skip = ~torch.isfinite(norm)
    step.add_((~skip).to(step.dtype))
    return skip


class DeviceStepCount:
    """`step_count` over an optimizer's device counter `_step` (both optimizers keep the count there)."""

    _step: torch.Tensor

    @property
    def step_count(self) -> int:
        """Updates applied so far (reading it synchronises with the device)."""
        return int(self._step)

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step.fill_(int(value))


class SRAdamW(DeviceStepCount):
    def __init__(self, model_chunks: list[nn.Module], config: OptimizerConfig, *, seed: int):
        mode = precision_mode(config.precision)
        self.config, self.precision, self.seed = config, config.precision, seed
        self.lr = config.lr
        self.consts = AdamWConstants.make(config.adam_beta1, config.adam_beta2, config.adam_eps)
        self.rounding = mode.rounding
        named = [(n, p) for i, chunk in enumerate(model_chunks) for n, p in chunk.named_parameters()]
        self.names = [n if len(model_chunks) == 1 else f"chunk{i}.{n}" for i, (n, _) in enumerate(named)]
        self.params = [p for _, p in named]
        check_sr_streams(zip(self.names, self.params))
        for name, p in zip(self.names, self.params):
            if p.dtype != mode.param_dtype:
                raise ValueError(f"parameter {name} is {p.dtype}; --precision {mode.name} needs {mode.param_dtype}")

        state = mode.state_dtype(config.optimizer_state_dtype)
        self.exp_avg = [torch.zeros_like(p, dtype=state) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, dtype=state) for p in self.params]
        self.master = [p.detach().float().clone() for p in self.params] if mode.fp32_master else None
        # updates applied, on the device: the SR stream's step counter and the bias corrections read it there
        self._step = torch.zeros((), dtype=torch.int64, device=self.params[0].device)
        self.main_grads = None
        self._unused_grads: dict[int, torch.Tensor] = {}
        if mode.param_dtype != torch.float32 and mode.grad_dtype(config.grad_dtype) == torch.float32:
            self.main_grads = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            for p, buf in zip(self.params, self.main_grads):
                p.register_post_accumulate_grad_hook(_accumulate_into(buf))

    # ---- the trainer's optimizer interface ----
    @property
    def param_groups(self) -> list[dict]:
        return [{"lr": self.lr}]

    def grads(self) -> list[torch.Tensor | None]:
        """The gradient tensors the step reads (FP32 main grads when kept, else .grad)."""
        return list(self.main_grads) if self.main_grads is not None else [p.grad for p in self.params]

    def zero_grad(self) -> None:
        # Zero in place rather than dropping .grad: the gradient tensors then keep their storage from
        # step to step, so the fused kernel's cached launch plan (keyed by pointers) is reused.
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()
        if self.main_grads is not None:
            for g in self.main_grads:
                g.zero_()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients; overridable (it all-reduces over the model-parallel group)."""
        return global_grad_norm(zip(self.params, self.grads()), device=self.params[0].device)

    @torch.no_grad()
    def step(self) -> StepResult:
        grads = self.grads()
        norm = self.grad_norm()
        skip = finite_step(norm, self._step)  # no host synchronisation from here to the end of the step
        clip_grads_on_device_(grads, norm, self.config.clip_grad)
        device = self.params[0].device
        scalars = step_scalars(self.lr, self._step, self.config.adam_beta1, self.config.adam_beta2, device, skip)
        pieces = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:  # a parameter that took no part in the loss: one persistent zero gradient
                g = self._unused_grads.setdefault(i, torch.zeros_like(p))
            target = self.master[i] if self.master is not None else p.data
            pieces.append((p, AdamWChunk(target.view(-1), g.reshape(-1), self.exp_avg[i].view(-1),
                                         self.exp_avg_sq[i].view(-1), p.sr_index_base,
                                         weight_decay_for(p, self.config.weight_decay))))
        path = None
        for key, chunks in group_by_sr_key(pieces, self.seed).items():
            path = adamw_step_(chunks, scalars=scalars, step=self._step, consts=self.consts,
                               rounding=self.rounding, key=key) or path
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                p.data.copy_(m)  # round to nearest BF16, Megatron's bf16-mp (a skipped step leaves p as it is)
        return StepResult(norm, skip, path)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for params, grads and optimizer states (FP32 master counted as a state), from the tensors."""
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        grads = self.main_grads if self.main_grads is not None else [p.grad for p in self.params]
        states = size(self.exp_avg) + size(self.exp_avg_sq) + (size(self.master) if self.master else 0)
        return {"params": size(self.params), "grads": size(grads), "optimizer_states": states,
                "num_params": sum(p.numel() for p in self.params)}

    # ---- checkpoint state (keyed by parameter name) ----
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "precision": self.precision, "step": self.step_count, "lr": self.lr,
                "seed": self.seed, "names": list(self.names),
                "exp_avg": [t.clone() for t in self.exp_avg], "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
                "master": None if self.master is None else [t.clone() for t in self.master]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state: expected format {STATE_FORMAT}, got {state.get('format')!r}")
        if state["names"] != self.names:
            missing = sorted(set(self.names) ^ set(state["names"]))[:3]
            raise ValueError(f"optimizer state: parameters differ from the model's (e.g. {missing})")
        for dst, src in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
            for d, s in zip(dst, src):
                d.copy_(s)
        if self.master is not None:
            if state.get("master") is not None:
                for d, s in zip(self.master, state["master"]):
                    d.copy_(s)
            else:  # from a checkpoint without masters: start them from the BF16 params
                for d, p in zip(self.master, self.params):
                    d.copy_(p)
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])


def _accumulate_into(buf: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        buf.add_(p.grad)  # BF16 micro-batch gradient into the FP32 sum
        p.grad = None

    return hook
