"""FLOPs per iteration (Megatron's formula), the dense BF16 peak of the detected GPU, and memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense (non-sparse) BF16 tensor-core peak, TFLOP/s.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0)]


def flops_per_iteration(batch: int, seq: int, num_layers: int, hidden: int, vocab: int, recompute: bool) -> float:
    """Megatron's 24*f*B*s*L*h^2*(1 + s/(6h) + V/(16*L*h)), f = 3 (fwd + bwd) or 4 with recomputation."""
    factor = 4 if recompute else 3
    return (24.0 * factor * batch * seq * num_layers * hidden ** 2
            * (1.0 + seq / (6.0 * hidden) + vocab / (16.0 * num_layers * hidden)))


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:  # "H100 PCIe" is listed before "H100"
            return peak
    return None


def memory_report(device: torch.device) -> str:
    if device.type == "cuda":
        gib = 2 ** 30
        return (f"mem allocated (GiB): {torch.cuda.memory_allocated(device) / gib:.2f} | "
                f"max mem allocated (GiB): {torch.cuda.max_memory_allocated(device) / gib:.2f}")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    rss = kib / 2 ** 30 if sys.platform == "darwin" else kib / 2 ** 20
    return f"max RSS (GiB): {rss:.2f}"
