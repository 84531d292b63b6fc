"""The SR AdamW step on the CPU: a small C++ library (csrc/sr_adamw_cpu.cpp), bitwise equal to the reference.

Built and loaded by numerics/native.py (once per source, compiler and CPU, into ~/.cache/megatron_sr/,
atomically), with the Philox tile it shares with the quantization points' library (numerics/csrc/philox_cpu.h).

Flags are part of the contract (see the source's header): -O3 -march=native with -ffp-contract=off and
without fast math, so every FP32 operation is rounded once, as the reference's tensor ops are.
`CpuFastUnavailable` says why it cannot be used (no compiler, a failed build); dispatch.py then runs
the eager reference and warns once. MEGATRON_SR_CPU_FAST=0 turns it off.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..numerics import native
from ..numerics.native import NativeUnavailable as CpuFastUnavailable
from ..numerics.native import compiler  # noqa: F401  (part of this module's interface: tests, tools)
from ..numerics.philox import MASK32, SRKey
from .adamw_reference import AdamWConstants, sqrt_rn

if TYPE_CHECKING:
    from .chunks import AdamWChunk

SOURCE = Path(__file__).resolve().parent / "csrc" / "sr_adamw_cpu.cpp"
HEADERS = (Path(native.__file__).resolve().parent / "csrc" / "philox_cpu.h",)  # the shared Philox tile
ABI_VERSION = 2
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno",
              "-fno-trapping-math")
ARCH_FLAGS = ("-march=native",)  # dropped when the compiler refuses it (the build is retried without)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_CHUNK = struct.Struct("<QQQQqqdq")  # SrCpuChunk: 4 pointers, numel, base_index, weight_decay, dtype bits


class UnsupportedChunks(ValueError):
    """The chunks cannot go to the CPU library (a dtype, device, layout or size it does not take)."""


class _Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in ("lr", "bc1", "bc2", "beta1", "beta2", "eps",
                                                     "one_minus_beta1", "one_minus_beta2")] + \
               [(name, ctypes.c_uint32) for name in ("step", "key0", "key1")] + \
               [("stochastic", ctypes.c_int32), ("nan_bits", ctypes.c_uint32), ("sqrt_negative_bits", ctypes.c_uint32)]


_library: ctypes.CDLL | None = None
_failure: str | None = None
_nan_bits: tuple[int, int] | None = None


def enabled() -> bool:
    return native.enabled()


def build_directory(cxx: str) -> Path:
    """~/.cache/megatron_sr/cpu-<hash of the sources, flags, compiler version and CPU> (numerics/native.py)."""
    return native.build_directory(cxx, (SOURCE, *HEADERS), (BASE_FLAGS, ARCH_FLAGS))


def load_library() -> ctypes.CDLL:
    """The compiled library (built on first use); CpuFastUnavailable when it cannot be."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise CpuFastUnavailable(_failure)
    try:
        _library = _load()
    except CpuFastUnavailable as exc:
        _failure = str(exc)
        raise
    except Exception as exc:  # noqa: BLE001  (any failure to load means: run the reference)
        _failure = f"loading the CPU SR AdamW library failed: {type(exc).__name__}: {exc}"
        raise CpuFastUnavailable(_failure) from exc
    return _library


def _load() -> ctypes.CDLL:
    lib = native.load_library("sr_adamw_cpu", SOURCE, HEADERS, BASE_FLAGS, ARCH_FLAGS, "CPU SR AdamW library")
    lib.sr_adamw_cpu_abi.restype = ctypes.c_int32
    if lib.sr_adamw_cpu_abi() != ABI_VERSION:
        raise CpuFastUnavailable(f"{lib._name} has ABI {lib.sr_adamw_cpu_abi()}, expected {ABI_VERSION}")
    lib.sr_adamw_cpu_step.restype = None
    lib.sr_adamw_cpu_step.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(_Step), ctypes.c_int32]
    return lib


def reset() -> None:
    """Forget the loaded library and any failure (tests use it to take the build path again)."""
    global _library, _failure
    _library, _failure = None, None


def nan_patterns() -> tuple[int, int]:
    """Two NaNs the reference takes from torch's kernels, probed once: the BF16 bits its CPU cast (the
    round-to-nearest) gives a NaN (the vectorised cast drops sign and payload), and the FP32 bits of its
    sqrt_rn of a negative number."""
    global _nan_bits
    if _nan_bits is None:
        cast = torch.tensor([float("nan"), -float("nan")] * 32, dtype=torch.float32).to(torch.bfloat16)
        root = sqrt_rn(torch.full((64,), -2.0))
        _nan_bits = (int(cast.view(torch.int16)[0]) & 0xFFFF, int(root.view(torch.int32)[0]) & MASK32)
    return _nan_bits


# (param, grad, exp_avg, exp_avg_sq) dtypes -> the library's dtype bits (bit 0 param, 1 grad, 2 states BF16)
_DTYPE_BITS = {(p, g, s, s): int(p == torch.bfloat16) | int(g == torch.bfloat16) << 1 | int(s == torch.bfloat16) << 2
               for p in SUPPORTED_DTYPES for g in SUPPORTED_DTYPES for s in SUPPORTED_DTYPES}


def _pack(chunks: list[AdamWChunk]) -> tuple[bytes | None, str | None]:
    """The library's chunk table for these (non-empty) chunks, or (None, why they cannot go to it).
    One pass, few calls per chunk: its host cost is a step's fixed price (~5 us per chunk)."""
    rows = []
    pack = _CHUNK.pack
    for c in chunks:
        p, g, m, v = c.param, c.grad, c.exp_avg, c.exp_avg_sq
        bits = _DTYPE_BITS.get((p.dtype, g.dtype, m.dtype, v.dtype))
        if bits is None:
            return None, (f"unsupported dtypes param={p.dtype} grad={g.dtype} exp_avg={m.dtype} "
                          f"exp_avg_sq={v.dtype}")
        if not (p.is_cpu and g.is_cpu and m.is_cpu and v.is_cpu):
            return None, "a chunk has a tensor that is not on the CPU"
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            return None, "a chunk has a non-contiguous tensor"
        n = p.numel()
        if not (g.numel() == m.numel() == v.numel() == n):
            return None, "a chunk's tensors differ in size"
        if c.base_index < 0:
            return None, f"negative base_index {c.base_index}"
        # the weight decay goes as a double; the library rounds it to FP32 as to_fp32 does
        rows.append(pack(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), n, int(c.base_index),
                         float(c.weight_decay), bits))
    return b"".join(rows), None


def unusable_reason(chunks: list[AdamWChunk], scalars: torch.Tensor) -> str | None:
    """Why these (non-empty) chunks cannot go to the CPU library, or None when they can."""
    if not enabled():
        return "disabled by MEGATRON_SR_CPU_FAST=0"
    if scalars.device.type != "cpu":
        return f"scalars are on {scalars.device}, not the CPU"
    return _pack(chunks)[1]


def step(chunks: list[AdamWChunk], *, scalars: torch.Tensor, step: int, consts: AdamWConstants,
         stochastic: bool, key: SRKey) -> None:
    """One AdamW step over the (non-empty) chunks, in place, on up to torch.get_num_threads() threads; the
    skip flag scalars[3] != 0 leaves every tensor as it is. Raises CpuFastUnavailable (no library) or
    UnsupportedChunks (what `unusable_reason` says) before writing anything."""
    reason = unusable_reason([], scalars)
    table, reason = (None, reason) if reason else _pack(chunks)
    if reason:
        raise UnsupportedChunks(reason)
    lib = load_library()
    values = scalars.tolist()
    if len(values) > 3 and values[3] != 0:
        return
    args = _Step(values[0], values[1], values[2], consts.beta1, consts.beta2, consts.eps, consts.one_minus_beta1,
                 consts.one_minus_beta2, int(step) & MASK32, key.k0, key.k1, int(stochastic), *nan_patterns())
    lib.sr_adamw_cpu_step(table, len(chunks), ctypes.byref(args), torch.get_num_threads())
