"""FLOPs per iteration (Megatron's formula), the dense BF16 peak of the detected GPU, and memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense (non-sparse) BF16 tensor-core peak, TFLOP/s.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0)]


def flops_per_iteration(batch: int, seq: int, num_layers: int, hidden: int, vocab: int,
                        recomputed_layers: float = 0.0, selective: bool = False, *, ffn: int | None = None,
                        swiglu: bool = False, heads: int | None = None, query_groups: int | None = None,
                        kv_channels: int | None = None) -> float:
    """Megatron's model FLOPs (forward + backward = 3 forwards of every GEMM):

        12 B s L h^2 [(1 + g/a + s/h) (a d / h) + (f / h) glu + V / (2 L h)]

    a heads, g query groups (GQA; g = a without), d = kv channels, f the MLP size, glu 3/2 with SwiGLU. The
    shape defaults (a d = h, g = a, f = 4 h, no GLU) give 72 B s L h^2 (1 + s/(6h)) + 6 B s h V. Hardware FLOPs
    add one more forward of what is recomputed: of `recomputed_layers` (a fraction of the layers,
    --recompute-granularity full) and, with `selective`, of every layer's attention core (the s/h term)."""
    q_ratio = 1.0 if heads is None else heads * (kv_channels or hidden // heads) / hidden  # a d / h
    g_ratio = 1.0 if heads is None or query_groups is None else query_groups / heads
    mlp = (4.0 if ffn is None else ffn / hidden) * (1.5 if swiglu else 1.0)
    unit = 4.0 * batch * seq * num_layers * hidden ** 2  # one forward's GEMM unit over all layers
    core = unit * seq / hidden * q_ratio  # q k^T and the weighted sum of v
    layers = unit * ((1.0 + g_ratio) * q_ratio + mlp) + core
    logits = 2.0 * batch * seq * hidden * vocab
    return 3 * (layers + logits) + recomputed_layers * layers + (core if selective else 0.0)


def model_shape(model_config) -> dict:
    """flops_per_iteration's shape keywords of a ModelConfig (after finalize)."""
    m = model_config
    return {"ffn": m.ffn_hidden_size, "swiglu": m.swiglu, "heads": m.num_attention_heads,
            "query_groups": m.query_groups, "kv_channels": m.head_dim}


def recomputed_fraction(model_config, pipeline_size: int = 1) -> float:
    """The fraction of the layers that --recompute-granularity full recomputes."""
    if model_config.recompute_granularity != "full":
        return 0.0
    if model_config.recompute_method == "uniform":
        return 1.0
    layers_per_stage = model_config.num_layers // pipeline_size  # block: the first N layers of each stage
    return min(1.0, model_config.recompute_num_layers / layers_per_stage)


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
