"""FP32 -> BF16 rounding: stochastic (add-then-truncate) and round-to-nearest-even.

Stochastic rounding: with `bits` the FP32 pattern and `r` 16 uniform random
bits, the BF16 result is the top 16 bits of `bits + r`. For |x| this rounds away from zero with
probability low16(bits) / 2^16, so E[SR(x)] = x; representable values (low16 == 0) are exact; Inf
stays Inf (the carry never reaches the exponent); NaN is kept NaN explicitly (truncating a NaN whose
payload sits in the low bits would give Inf), as a quiet NaN with its sign.
"""

from __future__ import annotations

import torch

from ..numerics.philox import MASK32, SRKey, random_bits16


def _int64_bits_to_bf16(hi16: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 65536) -> bf16 tensor with those bit patterns."""
    signed = torch.where(hi16 >= 0x8000, hi16 - 0x10000, hi16)
    return signed.to(torch.int16).view(torch.bfloat16)


def stochastic_round_bf16(x: torch.Tensor, rand16: torch.Tensor) -> torch.Tensor:
    """Round an FP32 tensor to BF16 with the given 16-bit random values (int64, same shape)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    rounded = (bits + rand16.reshape(bits.shape)) >> 16
    quiet_nan = (bits >> 16) | 0x0040
    return _int64_bits_to_bf16(torch.where(torch.isnan(x), quiet_nan, rounded))


def stochastic_round_bf16_at(
    x: torch.Tensor, base_index: int, step: int, stream: int, key: SRKey
) -> torch.Tensor:
    """SR of a flat FP32 tensor whose elements sit at indices base_index.. of the random stream."""
    rand = random_bits16(base_index, x.numel(), step, stream, key, device=x.device)
    return stochastic_round_bf16(x, rand).view(x.shape)


def round_nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even FP32 -> BF16 (torch's own cast)."""
    return x.to(torch.bfloat16)
