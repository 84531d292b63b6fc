"""JIT build of the fused SR AdamW CUDA extension (csrc/) and its Python wrapper.

The extension is built once per (torch version, CUDA version, GPU architecture) with
torch.utils.cpp_extension.load (ninja) into ~/.cache/megatron_sr/<torch>-cu<cuda>-sm<arch>/
(override with MEGATRON_SR_EXT_DIR), with -O3 and -fmad=false and without fast math: the kernel
must round every operation exactly like the PyTorch reference.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adamw_reference import AdamWConstants
from .philox import SRKey

if TYPE_CHECKING:
    from .dispatch import AdamWChunk

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binding.cpp", "sr_adamw.cu")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class FusedUnavailable(RuntimeError):
    """The extension cannot be used in this process; the message says why."""


_extensions: dict[tuple[int, int], object] = {}
_failures: dict[tuple[int, int], str] = {}
_tables: OrderedDict[tuple[int, bytes], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_MAX_TABLES = 32


def build_directory(capability: tuple[int, int]) -> Path:
    root = os.environ.get("MEGATRON_SR_EXT_DIR") or Path.home() / ".cache" / "megatron_sr"
    tag = f"torch{torch.__version__.replace('+', '_')}-cu{torch.version.cuda}-sm{capability[0]}{capability[1]}"
    return Path(root) / tag


def load_extension(device: torch.device | int | None = None):
    """The compiled extension for `device`'s architecture (built on first use); FusedUnavailable if it cannot be."""
    if torch.version.cuda is None:
        raise FusedUnavailable(f"torch {torch.__version__} is not a CUDA build")
    if not torch.cuda.is_available():
        raise FusedUnavailable("no CUDA device is available")
    cap = torch.cuda.get_device_capability(device)
    if cap in _extensions:
        return _extensions[cap]
    if cap in _failures:
        raise FusedUnavailable(_failures[cap])
    try:
        ext = _build(cap)
    except Exception as exc:  # noqa: BLE001  (any build failure means: use the reference)
        _failures[cap] = f"building the CUDA extension for sm_{cap[0]}{cap[1]} failed: {type(exc).__name__}: {exc}"
        raise FusedUnavailable(_failures[cap]) from exc
    _extensions[cap] = ext
    return ext


def _build(cap: tuple[int, int]):
    from torch.utils.cpp_extension import load

    build_dir = build_directory(cap)
    build_dir.mkdir(parents=True, exist_ok=True)
    arch = f"{cap[0]}{cap[1]}"
    old_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"  # only this GPU's architecture
    try:
        return load(
            name=f"megatron_sr_adamw_sm{arch}",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-fmad=false"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            verbose=os.environ.get("MEGATRON_SR_EXT_VERBOSE") == "1",
        )
    finally:
        if old_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch_list


def _device_tables(ext, table: torch.Tensor, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device copies of a chunk table and its tile map, reused while the same chunks come back."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), table.numpy().tobytes())
    cached = _tables.get(key)
    if cached is None:
        cached = (table.to(device), ext.tile_map(table, tiles).to(device))
        _tables[key] = cached
        if len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return cached


def fused_adamw_step_(
    chunks: list["AdamWChunk"],
    *,
    scalars: torch.Tensor,
    step: int | torch.Tensor,
    consts: AdamWConstants,
    stochastic: bool,
    key: SRKey,
) -> None:
    """One fused launch per (param, grad, state) dtype triple over non-empty CUDA chunks."""
    device = chunks[0].param.device
    for i, c in enumerate(chunks):  # checked here too: a C++ exception is the binding's last resort, not its API
        n = c.param.numel()
        if not (c.grad.numel() == c.exp_avg.numel() == c.exp_avg_sq.numel() == n):
            raise ValueError(f"sr_adamw: chunk {i} sizes differ: param {n}, grad {c.grad.numel()}, "
                             f"exp_avg {c.exp_avg.numel()}, exp_avg_sq {c.exp_avg_sq.numel()}")
    ext = load_extension(device)
    step_tensor, step_value = None, 0
    if isinstance(step, torch.Tensor) and step.is_cuda:
        step_tensor = step if step.dtype == torch.int64 else step.to(torch.int64)
    else:
        step_value = int(step)
    by_dtypes: dict[tuple[torch.dtype, ...], list[AdamWChunk]] = {}
    for c in chunks:
        by_dtypes.setdefault((c.param.dtype, c.grad.dtype, c.exp_avg.dtype), []).append(c)
    for group in by_dtypes.values():
        error, table, tiles, dtypes = ext.plan(
            [c.param for c in group], [c.grad for c in group], [c.exp_avg for c in group],
            [c.exp_avg_sq for c in group], [int(c.base_index) for c in group], [float(c.weight_decay) for c in group],
        )
        if error:
            raise ValueError(error)
        if tiles == 0:
            continue
        table_dev, tile_map_dev = _device_tables(ext, table, tiles, device)
        error = ext.step(table_dev, tile_map_dev, tiles, dtypes, scalars, step_tensor, step_value,
                         consts.beta1, consts.beta2, consts.eps, consts.one_minus_beta1, consts.one_minus_beta2,
                         key.k0, key.k1, stochastic)
        if error:
            raise RuntimeError(error)
