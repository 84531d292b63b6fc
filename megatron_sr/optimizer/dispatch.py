"""One entry point for the SR AdamW step over a list of chunks (chunks.py): a fused kernel or the reference.

On CUDA the fused kernel (fused.py, csrc/) runs when it builds; on the CPU the C++ library (cpu_fast.py,
csrc/sr_adamw_cpu.cpp) when a C++ compiler builds it. Both are bitwise equal to the eager reference.
Otherwise the reference runs (wrapped in torch.compile on a GPU, for speed) and one RuntimeWarning per
process says why. MEGATRON_SR_FUSED=0 forces the reference on every device, MEGATRON_SR_CPU_FAST=0 on
the CPU; MEGATRON_SR_COMPILE_FALLBACK=0 keeps the GPU fallback eager.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from ..numerics.philox import SRKey
from . import cpu_fast, fused
from .adamw_reference import AdamWConstants, Rounding, adamw_reference_
from .chunks import AdamWChunk

__all__ = ["AdamWChunk", "adamw_step_", "fused_unusable_reason"]

_warned = False
_compiled_reference: Callable | None = None
_compile_failed = False


def adamw_step_(
    chunks: list[AdamWChunk],
    *,
    scalars: torch.Tensor,
    step: int | torch.Tensor,
    consts: AdamWConstants,
    rounding: Rounding | str,
    key: SRKey,
) -> str | None:
    """Apply one AdamW step to every chunk in place (scalars from `step_scalars`); returns the path taken,
    "fused" (CUDA kernel), "cpu" (CPU library) or "reference" (None when every chunk is empty).

    `step` is an int or a one-element int64 tensor; on the fused path a CUDA step tensor and the
    scalars tensor are read on the device, so a CUDA graph can capture the step. The first call with a
    chunk list checks it and plans the launch; later calls with the same tensors (new AdamWChunk objects
    are fine) reuse that plan, so their host cost is one C++ pass over the list plus the launch.
    """
    rounding = Rounding(rounding)
    fused_on = os.environ.get("MEGATRON_SR_FUSED", "1") != "0"
    # Fast path for a chunk list seen before (same tensors, sizes, dtypes, offsets): one C++ pass computes
    # its signature, then one launch per dtype triple. Its checks ran when its plan was built.
    plan = fused.cached_plan(chunks) if fused_on else None
    if plan is not None:
        plan.step(scalars=scalars, step=step, consts=consts, stochastic=rounding is Rounding.STOCHASTIC, key=key)
        return "fused"
    live = [c for c in chunks if c.param.numel() > 0]
    if not live:
        return None
    if live[0].param.device.type == "cpu":
        reason = _cpu_step(live, scalars=scalars, step=step, consts=consts, rounding=rounding, key=key)
        if reason is None:
            return "cpu"
        reason = f"tensors are on cpu; the CPU library: {reason}"
    else:
        reason = _cuda_step(chunks, live, scalars=scalars, step=step, consts=consts, rounding=rounding, key=key)
        if reason is None:
            return "fused"
    _warn_once(f"megatron_sr: fused SR AdamW kernel not used ({reason}); running the PyTorch reference")
    step_int = int(step)
    for c in live:
        _reference_for(c.param.device)(
            c.param, c.grad, c.exp_avg, c.exp_avg_sq, scalars=scalars, step=step_int, consts=consts,
            weight_decay=c.weight_decay, rounding=rounding, key=key, base_index=c.base_index)
    return "reference"


def _cpu_step(live: list[AdamWChunk], *, scalars: torch.Tensor, step: int | torch.Tensor, consts: AdamWConstants,
              rounding: Rounding, key: SRKey) -> str | None:
    """The step on the CPU library; None when it ran, else why it could not (nothing was written then)."""
    if os.environ.get("MEGATRON_SR_FUSED", "1") == "0":
        return "disabled by MEGATRON_SR_FUSED=0"
    try:
        cpu_fast.step(live, scalars=scalars, step=int(step), consts=consts, stochastic=rounding is Rounding.STOCHASTIC,
                      key=key)
    except (cpu_fast.CpuFastUnavailable, cpu_fast.UnsupportedChunks) as exc:
        return str(exc)
    return None


def _cuda_step(chunks: list[AdamWChunk], live: list[AdamWChunk], *, scalars: torch.Tensor, step: int | torch.Tensor,
               consts: AdamWConstants, rounding: Rounding, key: SRKey) -> str | None:
    """The step on the fused CUDA kernel (planned and cached under `chunks`); None when it ran, else why not."""
    reason = fused_unusable_reason(live, scalars)
    if reason is None:
        try:
            fused.build_plan(chunks, live).step(scalars=scalars, step=step, consts=consts,
                                                stochastic=rounding is Rounding.STOCHASTIC, key=key)
        except fused.FusedUnavailable as exc:
            reason = str(exc)
    return reason


def fused_unusable_reason(chunks: list[AdamWChunk], scalars: torch.Tensor) -> str | None:
    """Why these chunks cannot go to the fused kernel, or None when they can (the build is tried later)."""
    if os.environ.get("MEGATRON_SR_FUSED", "1") == "0":
        return "disabled by MEGATRON_SR_FUSED=0"
    device = chunks[0].param.device
    if device.type != "cuda":
        return f"tensors are on {device.type}, not CUDA"
    if scalars.device != device:
        return f"scalars are on {scalars.device}, params on {device}"
    for c in chunks:
        tensors = (c.param, c.grad, c.exp_avg, c.exp_avg_sq)
        if any(t.device != device for t in tensors):
            return "a chunk's tensors are on different devices"
        if not all(t.is_contiguous() for t in tensors):
            return "a chunk has a non-contiguous tensor"
        if any(t.dtype not in fused.SUPPORTED_DTYPES for t in tensors) or c.exp_avg.dtype != c.exp_avg_sq.dtype:
            return (f"unsupported dtypes param={c.param.dtype} grad={c.grad.dtype} "
                    f"exp_avg={c.exp_avg.dtype} exp_avg_sq={c.exp_avg_sq.dtype}")
        if c.base_index < 0:
            return f"negative base_index {c.base_index}"
    return None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _reference_for(device: torch.device) -> Callable:
    """The eager reference on CPU; on a GPU the same function through torch.compile (eager if that fails)."""
    global _compiled_reference
    if device.type != "cuda" or _compile_failed or os.environ.get("MEGATRON_SR_COMPILE_FALLBACK", "1") == "0":
        return adamw_reference_
    if _compiled_reference is None:
        _compiled_reference = _guard_compile(torch.compile(adamw_reference_, dynamic=True))
    return _compiled_reference


def _guard_compile(compiled: Callable) -> Callable:
    def run(*args, **kwargs):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (a compiler failure must not stop training)
                _compile_failed = True
                warnings.warn(f"megatron_sr: torch.compile of the reference AdamW failed ({exc}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
        return adamw_reference_(*args, **kwargs)

    return run
