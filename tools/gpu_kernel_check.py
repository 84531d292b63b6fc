#!/usr/bin/env python3
"""Device-side checks of the fused SR AdamW extension (run on a CUDA machine).

    python3 tools/gpu_kernel_check.py build      # JIT-build (or load) the extension, print the build time
    python3 tools/gpu_kernel_check.py sanitize   # small launches of every variant, odd sizes and offsets,
                                                 # compared bitwise with the reference; meant to run under
                                                 # PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck
    python3 tools/gpu_kernel_check.py fallback   # the torch.compile'd reference fallback vs the eager one
    python3 tools/gpu_kernel_check.py probe-exception  # a bad chunk list comes back as an error string
"""

from __future__ import annotations

import sys
import time

import torch

from megatron_sr.optimizer import AdamWConstants, SRKey, adamw_reference_, fused, step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_


def build() -> int:
    t0 = time.perf_counter()
    fused.load_extension()
    where = fused.build_directory(torch.cuda.get_device_capability())
    print(f"extension ready in {time.perf_counter() - t0:.1f} s at {where}")
    return 0


def sanitize() -> int:
    consts, key = AdamWConstants.make(0.9, 0.95, 1e-8), SRKey.from_seed(3)
    bf, f = torch.bfloat16, torch.float32
    failures = launches = 0
    for pd in (bf, f):
        for gd in (bf, f):
            for sd in (f, bf):
                for rounding in ("stochastic", "nearest"):
                    chunks = []
                    for n, base, pad in [(1, 0, 0), (7, 3, 1), (8, 8, 0), (9, 13, 0), (33, 5, 2), (1031, 6, 1),
                                         (4096 + 3, 0, 0), (70_001, 11, 3)]:
                        mk = lambda dt, s, n=n, pad=pad: (torch.randn(n + pad, device="cuda") * s).to(dt)[pad:]  # noqa: E731
                        chunks.append(AdamWChunk(mk(pd, 1), mk(gd, 1e-2), mk(sd, 1e-3), mk(sd, 1e-5).abs(), base,
                                                 0.1 if n % 2 else 0.0))
                    want = [AdamWChunk(c.param.clone(), c.grad.clone(), c.exp_avg.clone(), c.exp_avg_sq.clone(),
                                       c.base_index, c.weight_decay) for c in chunks]
                    scalars = step_scalars(1e-3, 1, 0.9, 0.95, "cuda")
                    path = adamw_step_(chunks, scalars=scalars, step=1, consts=consts, rounding=rounding, key=key)
                    launches += 1
                    assert path == "fused"
                    for c, w in zip(chunks, want):
                        adamw_reference_(w.param, w.grad, w.exp_avg, w.exp_avg_sq, scalars=scalars, step=1,
                                         consts=consts, weight_decay=w.weight_decay, rounding=rounding, key=key,
                                         base_index=w.base_index)
                        for name in ("param", "exp_avg", "exp_avg_sq"):
                            a, b = getattr(c, name), getattr(w, name)
                            it = torch.int16 if a.element_size() == 2 else torch.int32
                            if not torch.equal(a.view(it), b.view(it)):
                                failures += 1
                                print(f"MISMATCH {pd} {gd} {sd} {rounding} n={c.param.numel()} {name}")
    torch.cuda.synchronize()
    print(f"sanitize: {launches} fused launches over 8 chunks each, {failures} mismatches")
    return 1 if failures else 0


def probe_exception() -> int:
    """A bad chunk list comes back from the binding as an error string, not a crash."""
    ext = fused.load_extension()
    a = torch.zeros(4, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(5, dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(4, device="cuda")
    error = ext.plan([a], [b], [m], [m], [0], [0.0])[0]
    print(f"probe: binding returned error {error!r}")
    return 0 if "elements" in error else 1


def fallback() -> int:
    """The GPU fallback (reference under torch.compile, MEGATRON_SR_FUSED=0) against the eager reference."""
    import os
    import warnings

    os.environ["MEGATRON_SR_FUSED"] = "0"
    consts, key = AdamWConstants.make(0.9, 0.95, 1e-8), SRKey.from_seed(3)
    n = 1_000_003
    mk = lambda dt, s: (torch.randn(n, device="cuda") * s).to(dt)  # noqa: E731
    c = AdamWChunk(mk(torch.bfloat16, 1), mk(torch.bfloat16, 1e-2), mk(torch.float32, 1e-3),
                   mk(torch.float32, 1e-5).abs(), 13, 0.1)
    w = AdamWChunk(c.param.clone(), c.grad.clone(), c.exp_avg.clone(), c.exp_avg_sq.clone(), 13, 0.1)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            scalars = step_scalars(1e-3, step, 0.9, 0.95, "cuda")
            path = adamw_step_([c], scalars=scalars, step=step, consts=consts, rounding="stochastic", key=key)
            adamw_reference_(w.param, w.grad, w.exp_avg, w.exp_avg_sq, scalars=scalars, step=step, consts=consts,
                             weight_decay=0.1, rounding="stochastic", key=key, base_index=13)
    torch.cuda.synchronize()
    print(f"fallback: path={path}, 2 steps incl. compile {time.perf_counter() - t0:.1f} s, "
          f"warnings={[str(x.message)[:90] for x in caught]}")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        a, b = getattr(c, name).float(), getattr(w, name).float()
        print(f"fallback {name}: {int((a != b).sum())} of {n} differ from eager, max abs diff "
              f"{float((a - b).abs().max()):.3g}")
    return 0


if __name__ == "__main__":
    modes = {"build": build, "sanitize": sanitize, "probe-exception": probe_exception, "fallback": fallback}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        print(f"usage: {sys.argv[0]} {{{'|'.join(modes)}}}", file=sys.stderr)
        sys.exit(2)
    sys.exit(modes[sys.argv[1]]())
