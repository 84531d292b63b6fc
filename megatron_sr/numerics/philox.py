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

import ctypes
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import native

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
# Streams with the top bit set belong to the linear layers' quantization points
# (megatron_sr/parallel/quantized_linear.py), never to the optimizer's three above.
STREAM_QUANT = 1 << 31
WORDS_PER_CALL = 4


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


def _group_words(group: torch.Tensor, step: int, stream: int, key: SRKey) -> torch.Tensor:
    """[groups, 4] Philox words of the given group counters."""
    return torch.stack(philox4x32(group & MASK32, group >> 32, int(step) & MASK32, int(stream), key), dim=1)


def _to_uniform(words: torch.Tensor) -> torch.Tensor:
    return (words.reshape(-1) >> 8).to(torch.float32) * 2.0**-24


def _uniform_of_runs(starts: torch.Tensor, step: int, stream: int, key: SRKey) -> torch.Tensor:
    """Flat uniforms of the aligned runs of 4 indices starting at `starts` (each a multiple of 4): one group each."""
    return _to_uniform(_group_words(starts >> 2, step, stream, key))


def _uniform_of_each(flat: torch.Tensor, step: int, stream: int, key: SRKey) -> torch.Tensor:
    """Flat uniforms of any indices: one Philox call per element."""
    return _to_uniform(_group_words(flat >> 2, step, stream, key).gather(1, (flat & 3).unsqueeze(1)))


def uniform24_at(index: torch.Tensor, step: int, stream: int, key: SRKey) -> torch.Tensor:
    """A uniform FP32 value k * 2^-24 (k in [0, 2^24)) per element index of an int64 tensor, same shape.

    The quantization points' layout (one 32-bit word per element, 4 per Philox call):
        group = index // 4,  lane = index % 4,  k = word[lane] of philox(group, step, stream) >> 8
    Each index is a position in the *unsharded* tensor, so the value does not depend on the layout.
    When the indices come in aligned runs of 4 (index % 4 == lane, the usual case) each group is
    computed once; otherwise once per element.
    """
    flat = index.reshape(-1)
    runs = flat.view(-1, WORDS_PER_CALL) if flat.numel() % WORDS_PER_CALL == 0 else None
    lanes = torch.arange(WORDS_PER_CALL, dtype=torch.int64, device=index.device)
    if runs is not None and bool(((runs - runs[:, :1]) == lanes).all() and (runs[:, 0] % WORDS_PER_CALL == 0).all()):
        return _uniform_of_runs(runs[:, 0], step, stream, key).view(index.shape)
    return _uniform_of_each(flat, step, stream, key).view(index.shape)


_UNIFORM_SOURCE = Path(__file__).resolve().parent / "csrc" / "quant_uniform_cpu.cpp"
_UNIFORM_HEADERS = (Path(__file__).resolve().parent / "csrc" / "philox_cpu.h",)
_UNIFORM_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
_uniform_library: ctypes.CDLL | None = None
_uniform_failure: str | None = None


def _uniform_cpu() -> ctypes.CDLL | None:
    """The CPU library for uniform24_rows, built on first use; None (and one warning) when it cannot be."""
    global _uniform_library, _uniform_failure
    if _uniform_library is None and _uniform_failure is None:
        try:
            if not native.enabled():
                raise native.NativeUnavailable("disabled by MEGATRON_SR_CPU_FAST=0")
            lib = native.load_library("quant_uniform_cpu", _UNIFORM_SOURCE, _UNIFORM_HEADERS, _UNIFORM_FLAGS,
                                      ("-march=native",), "CPU quantization uniforms library")
            lib.quant_uniform24_rows.restype = None
            lib.quant_uniform24_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_uint32] * 4 + [
                ctypes.c_int32]
            _uniform_library = lib
        except (native.NativeUnavailable, OSError, AttributeError) as exc:
            _uniform_failure = str(exc)
            warnings.warn(f"quantization uniforms on the CPU run in PyTorch ({_uniform_failure})", RuntimeWarning,
                          stacklevel=3)
    return _uniform_library


def uniform24_rows(rows: int, width: int, first_row: int, full_width: int, col_offset: int, step: int, stream: int,
                   key: SRKey, device: torch.device | str = "cpu") -> torch.Tensor:
    """uniform24_at for a [rows, width] view whose element (r, c) is at index (first_row + r) * full_width +
    col_offset + c of the unsharded tensor. On the CPU a C++ library computes it (numerics/csrc/, the same
    bits); elsewhere, or without a compiler, the tensor ops of uniform24_at."""
    device = torch.device(device)
    lib = _uniform_cpu() if device.type == "cpu" and rows * width > 0 else None
    if lib is not None:
        out = torch.empty(rows, width, dtype=torch.float32)
        lib.quant_uniform24_rows(out.data_ptr(), rows, width, first_row, full_width, col_offset, int(step) & MASK32,
                                 int(stream) & MASK32, key.k0, key.k1, torch.get_num_threads())
        return out
    r = (torch.arange(rows, dtype=torch.int64, device=device) + first_row).unsqueeze(1) * full_width + col_offset
    if width % WORDS_PER_CALL == 0 and full_width % WORDS_PER_CALL == 0 and col_offset % WORDS_PER_CALL == 0:
        # aligned runs of 4, known from the shape (no data-dependent check, so no host synchronisation)
        starts = r + torch.arange(0, width, WORDS_PER_CALL, dtype=torch.int64, device=device)
        return _uniform_of_runs(starts.reshape(-1), step, stream, key).view(rows, width)
    return _uniform_of_each((r + torch.arange(width, dtype=torch.int64, device=device)).reshape(-1), step, stream,
                            key).view(rows, width)
