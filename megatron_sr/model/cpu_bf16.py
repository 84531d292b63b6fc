"""BF16 linear layers on CPUs without native BF16 matrix units, computed as FP32 GEMMs of the BF16 operands.

On AVX2-only CPUs torch's BF16 GEMM is emulated and ~35x slower than FP32. Inside
`cpu_bf16_matmul(x)`, a BF16 `F.linear` on the CPU runs as linear(x.float(), w.float()) rounded
to BF16: exact products of BF16 inputs, FP32 accumulation, a BF16 result - the arithmetic of a
GPU's BF16 tensor-core GEMM. Gradients flow through the casts, so weight gradients are BF16 too.
Parameters and activations stay BF16; only the GEMM's inner arithmetic changes. CUDA is untouched.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _FP32LinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == torch.bfloat16 and x.device.type == "cpu":
                out = F.linear(x.float(), w.float(), b.float() if b is not None else None)
                return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def cpu_bf16_matmul(x: torch.Tensor):
    """The FP32-GEMM mode for BF16 CPU tensors, else a no-op context."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return _FP32LinearMode()
    return contextlib.nullcontext()
