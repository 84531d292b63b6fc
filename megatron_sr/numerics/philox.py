"""Philox4x32-10 counter-based random bits, computed with int64 tensor ops.

This is the single definition of the random stream used by stochastic rounding. The CUDA kernel
(`megatron_sr/optimizer/csrc/`) computes the same function in registers; the two must agree bit
for bit, so the layout below is part of the project's contract:

    key     = (seed & 0xFFFFFFFF, ((seed >> 32) ^ (pp_rank << 16 | tp_rank)) & 0xFFFFFFFF)
    counter = (group & 0xFFFFFFFF, group >> 32, step & 0xFFFFFFFF, stream)
    group   = index // 8,   lane = index % 8
    bits16(index) = 16-bit half (lane % 2: 0 = low, 1 = high) of output word lane // 2

`index` is the element's offset in the model-parallel rank's full (not data-parallel-sharded)
parameter space, `step` the optimizer step (1-based), `stream` one of STREAM_* below. One Philox
call yields 128 bits, i.e. the rounding bits of 8 consecutive elements: one 16-byte vector of BF16.

Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011) define Philox; the
known-answer vectors in tests/test_sr_numerics.py come from their Random123 distribution.
All arithmetic is overflow-free in int64: 32x32-bit products are split into 16-bit halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
ELEMENTS_PER_CALL = 8

STREAM_PARAM = 0
STREAM_EXP_AVG = 1
STREAM_EXP_AVG_SQ = 2


@dataclass(frozen=True)
class SRKey:
    """The Philox key of one model-parallel rank's random stream."""

    k0: int
    k1: int

    @classmethod
    def from_seed(cls, seed: int, tp_rank: int = 0, pp_rank: int = 0) -> SRKey:
        if not (0 <= tp_rank < 1 << 16 and 0 <= pp_rank < 1 << 16):
            raise ValueError(f"tp_rank and pp_rank must be in [0, 65536), got {tp_rank}, {pp_rank}")
        seed &= (1 << 64) - 1
        rank_word = (pp_rank << 16) | tp_rank
        return cls(seed & MASK32, ((seed >> 32) ^ rank_word) & MASK32)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for int64 tensors a in [0, 2^32) and a 32-bit constant m."""
    t_lo = a * (m & 0xFFFF)  # < 2^48
    t_hi = a * (m >> 16)  # < 2^48;  a*m = t_hi * 2^16 + t_lo
    mid = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2^49
    return ((t_hi >> 16) + (mid >> 32)) & MASK32, mid & MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: int | torch.Tensor, c3: int | torch.Tensor, key: SRKey
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words; returns the four output words."""
    k0, k1 = key.k0, key.k1
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device).expand_as(c0)
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device).expand_as(c0)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_bits16(
    base_index: int, numel: int, step: int, stream: int, key: SRKey, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """16 random bits (int64 in [0, 65536)) for element indices base_index .. base_index + numel - 1."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first_group = base_index // ELEMENTS_PER_CALL
    last_group = (base_index + numel - 1) // ELEMENTS_PER_CALL
    group = torch.arange(first_group, last_group + 1, dtype=torch.int64, device=device)
    words = philox4x32(group & MASK32, group >> 32, int(step) & MASK32, int(stream), key)
    w = torch.stack(words, dim=1)  # [groups, 4]
    halves = torch.stack((w & 0xFFFF, w >> 16), dim=2).reshape(-1)  # lane order: word0.lo, word0.hi, ...
    start = base_index - first_group * ELEMENTS_PER_CALL
    return halves[start : start + numel]
