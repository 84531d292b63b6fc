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
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..numerics.philox import SRKey
from .adamw_reference import AdamWConstants

if TYPE_CHECKING:
    from .chunks import AdamWChunk

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binding.cpp", "sr_adamw.cu")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class FusedUnavailable(RuntimeError):
    """The extension cannot be used in this process; the message says why."""


_extensions: dict[tuple[int, int], object] = {}
_failures: dict[tuple[int, int], str] = {}
_plans: OrderedDict[bytes, FusedPlan] = OrderedDict()  # chunk-list signature -> plan (LRU)
_MAX_PLANS = 32
_plan_builds = 0  # plans built (checked) in this process: a steady training loop builds one and then hits


class PlanCacheInfo(NamedTuple):
    builds: int  # plans built and checked since the process started
    size: int  # plans cached now


def plan_cache_info() -> PlanCacheInfo:
    """How the launch-plan cache is doing (a re-plan costs 1.5-2 ms at 1.3B parameters)."""
    return PlanCacheInfo(_plan_builds, len(_plans))


def clear_plan_cache() -> None:
    """Forget every plan: the next call with any chunk list checks and plans it again (benchmarks time that)."""
    _plans.clear()


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


class FusedPlan:
    """The launches of one chunk list: per dtype triple, the chunk table and tile map on the device.

    Built (and checked) once per chunk list; a step is then one `ext.step` call per dtype triple,
    with no per-chunk work on the host.
    """

    def __init__(self, ext, launches: list[tuple[torch.Tensor, torch.Tensor, int, list[int]]]):
        self.ext = ext
        self.launches = launches  # (table, tile_map, tiles, dtypes) per dtype triple, tables on the device

    def step(self, *, scalars: torch.Tensor, step: int | torch.Tensor, consts: AdamWConstants, stochastic: bool,
             key: SRKey) -> None:
        step_tensor, step_value = None, 0
        if isinstance(step, torch.Tensor) and step.is_cuda:
            step_tensor = step if step.dtype == torch.int64 else step.to(torch.int64)
        else:
            step_value = int(step)
        for table, tile_map, tiles, dtypes in self.launches:
            error = self.ext.step(table, tile_map, tiles, dtypes, scalars, step_tensor, step_value,
                                  consts.beta1, consts.beta2, consts.eps, consts.one_minus_beta1,
                                  consts.one_minus_beta2, key.k0, key.k1, stochastic)
            if error:
                raise RuntimeError(error)


def cached_plan(chunks: list[AdamWChunk]) -> FusedPlan | None:
    """The plan built earlier for a chunk list with the same signature, or None (the caller checks and builds).

    The signature (csrc/chunk_signature.h) holds every input of a plan: each tensor's pointer, size, dtype,
    contiguity and device, and each chunk's base_index and weight_decay. So new chunk objects over the same
    tensors hit, and any change that could change the launch misses.
    """
    if not _plans or not _extensions:
        return None
    signature = next(iter(_extensions.values())).signature(chunks)
    plan = _plans.get(signature) if signature is not None else None
    if plan is not None:
        _plans.move_to_end(signature)
    return plan


def build_plan(chunks: list[AdamWChunk], live: list[AdamWChunk] | None = None) -> FusedPlan:
    """Check `live` (default: all chunks; non-empty CUDA chunks), build its plan and cache it under `chunks`."""
    global _plan_builds
    live = chunks if live is None else live
    device = live[0].param.device
    for i, c in enumerate(live):  # checked here too: a C++ exception is the binding's last resort, not its API
        n = c.param.numel()
        if not (c.grad.numel() == c.exp_avg.numel() == c.exp_avg_sq.numel() == n):
            raise ValueError(f"sr_adamw: chunk {i} sizes differ: param {n}, grad {c.grad.numel()}, "
                             f"exp_avg {c.exp_avg.numel()}, exp_avg_sq {c.exp_avg_sq.numel()}")
    ext = load_extension(device)
    by_dtypes: dict[tuple[torch.dtype, ...], list[AdamWChunk]] = {}
    for c in live:
        by_dtypes.setdefault((c.param.dtype, c.grad.dtype, c.exp_avg.dtype), []).append(c)
    launches = []
    for group in by_dtypes.values():
        error, table, tiles, dtypes = ext.plan(
            [c.param for c in group], [c.grad for c in group], [c.exp_avg for c in group],
            [c.exp_avg_sq for c in group], [int(c.base_index) for c in group], [float(c.weight_decay) for c in group],
        )
        if error:
            raise ValueError(error)
        if tiles > 0:
            launches.append((table.to(device), ext.tile_map(table, tiles).to(device), tiles, dtypes))
    plan = FusedPlan(ext, launches)
    _plan_builds += 1
    signature = ext.signature(chunks)
    if signature is not None:
        _plans[signature] = plan
        if len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    return plan
