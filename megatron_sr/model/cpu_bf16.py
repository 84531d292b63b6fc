"""BF16 GEMMs and attention on CPUs without native BF16 matrix units, computed in FP32 from the BF16 operands.

On AVX2-only CPUs torch's BF16 GEMM is emulated and ~35x slower than FP32, and its BF16 flash attention
(whose inner GEMMs are BF16) ~2.5x slower than the FP32 one. Inside `cpu_bf16_matmul(x)`, on the CPU:
- a BF16 `F.linear` runs as linear(x.float(), w.float()) rounded to BF16: exact products of BF16
  inputs, FP32 accumulation, a BF16 result - the arithmetic of a GPU's BF16 tensor-core GEMM;
- a BF16 `F.scaled_dot_product_attention` runs on the FP32 values of q, k, v (and a floating mask),
  its output rounded to BF16: FP32 scores, softmax and accumulation, as a GPU's BF16 flash attention
  keeps them (which rounds the probabilities to BF16 before the PV product; here they stay FP32).
Gradients flow through the casts, so weight and activation gradients are BF16 too. Parameters and
activations stay BF16; only the inner arithmetic changes. CUDA is untouched.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _on_cpu_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _fp32_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), b.float() if b is not None else None).to(torch.bfloat16)


def _fp32_attention(q, k, v, attn_mask=None, *args, **kwargs) -> torch.Tensor:
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask, *args, **kwargs).to(q.dtype)


class _FP32LinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _on_cpu_bf16(args[0]):
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return _fp32_linear(args[0], args[1], b)
        if func is F.scaled_dot_product_attention and _on_cpu_bf16(args[0]):
            return _fp32_attention(*args, **kwargs)
        return func(*args, **kwargs)


def cpu_bf16_matmul(x: torch.Tensor):
    """The FP32-GEMM mode for BF16 CPU tensors, else a no-op context."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return _FP32LinearMode()
    return contextlib.nullcontext()
