"""The PyTorch reference of the SR AdamW step: the definition that the CUDA kernel matches bit for bit.

Per element, all in FP32, each operation rounded once (no fused multiply-add; the kernel uses the
__f*_rn intrinsics for the same reason):

    p = float(p);  g = float(g)
    if decay:  p = p - (lr * wd) * p                     # decoupled decay in FP32, before rounding
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p - lr * ((m / bc1) / (sqrt(v / bc2) + eps))
    p -> BF16 by stochastic rounding (or nearest, or kept in FP32); m, v likewise when stored in BF16

Constants (beta1, 1 - beta1, beta2, 1 - beta2, eps, wd) are Python doubles rounded once to FP32.
The per-step scalars lr, bc1 = 1 - beta1^step, bc2 = 1 - beta2^step live in one FP32 device tensor
made by `step_scalars` (FP64 math, one rounding), which both the reference and the kernel read, so
that a CUDA graph can capture the step and both paths see identical scalars.

Scalar operands are 0-dim tensors on the data's device: torch's CUDA division by a *CPU* scalar
multiplies by its reciprocal, which is not IEEE division.

sqrt is the correctly rounded FP32 square root (IEEE sqrt, the kernels' __fsqrt_rn / sqrtps), taken
as `sqrt_rn`: torch's CPU `torch.sqrt` on FP32 is not correctly rounded (on an AVX2 build ~16% of
results are one ulp off), which would make the definition depend on the device and the CPU's ISA.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from ..numerics.philox import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, STREAM_PARAM, SRKey
from .rounding import round_nearest_bf16, stochastic_round_bf16_at


class Rounding(str, Enum):
    STOCHASTIC = "stochastic"
    NEAREST = "nearest"


def to_fp32(x: float) -> float:
    """Round a Python float to the nearest FP32 value (returned as a Python float)."""
    return float(np.float32(x))


@dataclass(frozen=True)
class AdamWConstants:
    """Step-independent AdamW constants, each already rounded to FP32."""

    beta1: float
    beta2: float
    eps: float
    one_minus_beta1: float
    one_minus_beta2: float

    @classmethod
    def make(cls, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> AdamWConstants:
        return cls(to_fp32(beta1), to_fp32(beta2), to_fp32(eps), to_fp32(1.0 - beta1), to_fp32(1.0 - beta2))


def step_scalars(
    lr: float | torch.Tensor, step: int | torch.Tensor, beta1: float, beta2: float, device: torch.device | str,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP32 tensor [lr, 1 - beta1^step, 1 - beta2^step, skip] on `device` (math in FP64, rounded once).

    beta1/beta2 are the *unrounded* user values, so the bias corrections match torch.optim.AdamW's.
    `skip` (a device bool, e.g. "the gradients are not finite") makes the step leave every tensor as it
    is, decided on the device. Python numbers are filled on the device, never copied from the host, so
    building the scalars does not synchronise (a tensor `step` or `lr` stays where it is).
    """
    def f64(x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=torch.float64).reshape(())
        return torch.full((), x, dtype=torch.float64, device=device)

    step64 = f64(step)
    bc1 = 1.0 - torch.pow(f64(beta1), step64)
    bc2 = 1.0 - torch.pow(f64(beta2), step64)
    flag = f64(0.0) if skip is None else skip.to(device=device, dtype=torch.float64).reshape(())
    return torch.stack((f64(lr), bc1, bc2, flag)).to(torch.float32)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded FP32 sqrt on every device: the FP64 sqrt rounded once to FP32 (53 >= 2 * 24 + 2 bits,
    so the double rounding is innocuous; an FP64 sqrt within a few FP64 ulps is enough)."""
    return torch.sqrt(x.double()).float()


def _write_back(
    dst: torch.Tensor, value: torch.Tensor, rounding: Rounding, base_index: int, step: int, stream: int, key: SRKey
) -> None:
    if dst.dtype == torch.float32:
        dst.copy_(value)
    elif dst.dtype == torch.bfloat16:
        if rounding is Rounding.STOCHASTIC:
            dst.copy_(stochastic_round_bf16_at(value.reshape(-1), base_index, step, stream, key).view(dst.shape))
        else:
            dst.copy_(round_nearest_bf16(value))
    else:
        raise TypeError(f"unsupported dtype {dst.dtype} for an AdamW tensor")


@torch.no_grad()
def adamw_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    scalars: torch.Tensor,
    step: int,
    consts: AdamWConstants,
    weight_decay: float,
    rounding: Rounding | str,
    key: SRKey,
    base_index: int,
) -> None:
    """One AdamW step, in place, on one contiguous tensor whose first element has stream index base_index.

    param: BF16 or FP32; grad: BF16 or FP32; exp_avg/exp_avg_sq: FP32 or BF16 (BF16 states are
    written back with the same rounding as the param, on their own random streams).
    """
    rounding = Rounding(rounding)
    if scalars.numel() > 3 and bool(scalars[3] != 0):  # skip: a host read, as the reference is the definition
        return
    device = param.device
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=device)  # noqa: E731
    lr, bc1, bc2 = scalars[0], scalars[1], scalars[2]

    p = param.float()
    g = grad.float()
    wd = to_fp32(weight_decay)
    if wd != 0.0:
        p = p - (lr * f32(wd)) * p
    m = exp_avg.float() * f32(consts.beta1) + g * f32(consts.one_minus_beta1)
    v = exp_avg_sq.float() * f32(consts.beta2) + (g * g) * f32(consts.one_minus_beta2)
    p = p - lr * ((m / bc1) / (sqrt_rn(v / bc2) + f32(consts.eps)))

    _write_back(exp_avg, m, rounding, base_index, step, STREAM_EXP_AVG, key)
    _write_back(exp_avg_sq, v, rounding, base_index, step, STREAM_EXP_AVG_SQ, key)
    _write_back(param, p, rounding, base_index, step, STREAM_PARAM, key)
