"""The SR AdamW bitwise tests' shared cases (test helper): constants, chunks of random tensors, the reference
step and the bit-pattern comparison. Used by the CUDA kernel's tests (test_fused_adamw.py) and the CPU
library's (test_cpu_fast_path.py), so both check against the same reference in the same way.

Tensors are made on the generator's device.
"""

from __future__ import annotations

import torch

from megatron_sr.optimizer import AdamWConstants, SRKey, adamw_reference_
from megatron_sr.optimizer.dispatch import AdamWChunk

BF16, F32 = torch.bfloat16, torch.float32
B1, B2, LR = 0.9, 0.95, 3e-3
CONSTS = AdamWConstants.make(B1, B2, 1e-8)
KEY = SRKey.from_seed(20261123, tp_rank=1, pp_rank=2)
VARIANTS = [(p, g, s, r) for p in (BF16, F32) for g in (BF16, F32) for s in (F32, BF16)
            for r in ("stochastic", "nearest")]


def rand_tensor(n, dtype, scale, gen, pad=0, positive=False):
    """n random elements; pad > 0 starts the tensor `pad` elements into its storage (an odd pointer)."""
    t = torch.randn(n + pad, generator=gen, device=gen.device) * scale
    return (t.abs() if positive else t).to(dtype)[pad:]


def make_chunk(n, dtypes, gen, base, wd, pad=0):
    p, g, s = dtypes
    return AdamWChunk(rand_tensor(n, p, 1.0, gen, pad), rand_tensor(n, g, 1e-2, gen, pad),
                      rand_tensor(n, s, 1e-3, gen, pad), rand_tensor(n, s, 1e-5, gen, pad, positive=True), base, wd)


def clone_chunk(c):
    def cl(t):  # the same pointer offset as the original
        pad = t.storage_offset()
        return torch.empty(t.numel() + pad, dtype=t.dtype, device=t.device)[pad:].copy_(t)
    return AdamWChunk(cl(c.param), cl(c.grad), cl(c.exp_avg), cl(c.exp_avg_sq), c.base_index, c.weight_decay)


def reference_step(chunks, scalars, step, rounding):
    for c in chunks:
        adamw_reference_(c.param, c.grad, c.exp_avg, c.exp_avg_sq, scalars=scalars, step=step, consts=CONSTS,
                         weight_decay=c.weight_decay, rounding=rounding, key=KEY, base_index=c.base_index)


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_same_bits(got, want, what=""):
    for name in ("param", "exp_avg", "exp_avg_sq"):
        a, b = bits(getattr(got, name)), bits(getattr(want, name))
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            i = int(bad[0])
            raise AssertionError(f"{what} {name}: {bad.numel()} of {a.numel()} differ, first at {i} "
                                 f"(numel {a.numel()}, base {got.base_index}): {int(a[i])} vs {int(b[i])}")
