"""Pre-norm transformer layer: causal self-attention and a GELU or SwiGLU MLP, batch-first [b, s, h].

Linear layers come from megatron_sr.parallel.layers (column-parallel in, row-parallel out), so each
tensor-parallel rank holds num_heads / tp query heads, num_query_groups / tp k/v heads and ffn / tp MLP
columns. The norm is LayerNorm or RMSNorm (--normalization). Dropout is plain torch dropout; attention
is torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU), grouped-query
attention through its enable_gqa.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel import parallel_state as ps
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, mark_parallel
from ..parallel.quantized_linear import POINTS, QuantScheme, linear_id
from ..parallel.random import checkpoint, get_rng_tracker
from .cpu_bf16 import cpu_bf16_matmul
from .init import init_method_for, output_layer_std


def tp_rng():
    """The tracked tp stream when tensor-parallel (heads differ per rank); a no-op with tp = 1."""
    return get_rng_tracker().fork() if ps.get_tensor_model_parallel_world_size() > 1 else contextlib.nullcontext()


def sp_rng():
    return get_rng_tracker().fork() if ps.get_sequence_parallel() else contextlib.nullcontext()


def recompute_granularity(config: ModelConfig) -> str | None:
    """None, "full" or "selective" (Megatron's --recompute-activations is selective)."""
    return config.recompute_granularity or ("selective" if config.recompute_activations else None)


def quant_scheme(config: ModelConfig, seed: int) -> QuantScheme | None:
    """The linear layers' quantization points (--quant-*), None when all are off."""
    scheme = QuantScheme.parse({p: getattr(config, f"quant_{p}") for p in POINTS}, seed)
    return scheme if scheme.enabled else None


def _quant(config: ModelConfig, seed: int, layer_number: int, kind: str) -> dict:
    """The keyword arguments that give one linear its quantization points and stream id."""
    return {"quant": quant_scheme(config, seed), "quant_id": linear_id(layer_number, kind)}


def layer_norm(config: ModelConfig, dtype: torch.dtype) -> nn.LayerNorm | nn.RMSNorm:
    """--normalization: LayerNorm (weight and bias) or RMSNorm (weight only).

    torch's RMSNorm computes x * rsqrt(mean(x^2) + eps) * w in FP32 for BF16 inputs and weights and rounds
    once (as Megatron's fused/TE kernels); its eps must be given, its default is the dtype's machine epsilon.
    """
    if config.normalization == "RMSNorm":
        norm = nn.RMSNorm(config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
    else:
        norm = nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
    for p in norm.parameters():
        mark_parallel(p, -1)  # replicated over tensor-parallel ranks
    return norm


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half form) on [b, heads, s, head_dim], computed in FP32."""

    def __init__(self, head_dim: int, base: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids.float()[..., None] * self.inv_freq.to(x.device)  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, d]
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x32 * emb.cos() + rotated * emb.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    """Causal self-attention with `query_groups` k/v heads, each shared by heads / groups query heads.

    The fused qkv weight's rows are ordered per group, as Megatron's: [group0: its q heads, k, v | group1:
    ...] (without GQA, one q head per group: [head0 q k v | head1 q k v | ...]). A tp slice of dim 0 then
    holds whole groups, and query head i uses the k/v of group i // (heads / groups), on every layout.
    """

    def __init__(self, config: ModelConfig, prefix: str, seed: int, dtype: torch.dtype, layer_number: int = 0):
        super().__init__()
        h, std = config.hidden_size, config.init_method_std
        bias = not config.disable_bias_linear
        tp = ps.get_tensor_model_parallel_world_size()
        heads, groups = config.num_attention_heads, config.query_groups
        self.num_heads, self.num_groups = heads // tp, groups // tp  # this rank's
        self.heads_per_group = heads // groups
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.linear_qkv = ColumnParallelLinear(
            h, (heads + 2 * groups) * self.head_dim, bias=bias, dtype=dtype,
            init_method=init_method_for(seed, f"{prefix}.linear_qkv.weight", std),
            **_quant(config, seed, layer_number, "linear_qkv"))
        self.linear_proj = RowParallelLinear(
            heads * self.head_dim, h, bias=bias, dtype=dtype,
            init_method=init_method_for(seed, f"{prefix}.linear_proj.weight", output_layer_std(std, config.num_layers)),
            **_quant(config, seed, layer_number, "linear_proj"))
        self.rotary = (RotaryEmbedding(self.head_dim, config.rotary_base)
                       if config.position_embedding_type == "rope" else None)
        self.recompute_core = recompute_granularity(config) == "selective"

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax(q k^T / sqrt(d)) v with causal mask and dropout: what selective recompute recomputes."""
        gqa = {"enable_gqa": True} if self.heads_per_group > 1 else {}  # k/v heads repeated over their group
        # the CPU's FP32-inner mode here too, so that selective recompute (outside the layer's mode) replays it
        with tp_rng(), cpu_bf16_matmul(q):  # tp_rng: this rank's heads, their own dropout stream
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                  is_causal=True, **gqa)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        # Rows per group (see the class docstring), so this rank's output is its groups, whole.
        qkv = self.linear_qkv(x)
        b, s = qkv.shape[:2]  # the full sequence (x is a sequence shard under --sequence-parallel)
        qkv = qkv.view(b, s, self.num_groups, self.heads_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d], group-major
        k, v = (t.squeeze(3).transpose(1, 2) for t in (k, v))  # [b, groups, s, d]
        if self.rotary is not None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v)  # replays the dropout streams in backward
        else:
            out = self.core(q, k, v)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, seed: int, dtype: torch.dtype, layer_number: int = 0):
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.init_method_std
        bias = not config.disable_bias_linear
        self.linear_fc1 = ColumnParallelLinear(
            h, f, bias=bias, dtype=dtype, init_method=init_method_for(seed, f"{prefix}.linear_fc1.weight", std),
            **_quant(config, seed, layer_number, "linear_fc1"))
        # SwiGLU's gate is its own column-parallel layer, so a tp slice keeps gate and value rows paired.
        self.linear_fc1_gate = (ColumnParallelLinear(
            h, f, bias=bias, dtype=dtype, init_method=init_method_for(seed, f"{prefix}.linear_fc1_gate.weight", std),
            **_quant(config, seed, layer_number, "linear_fc1_gate"))
            if config.swiglu else None)
        self.linear_fc2 = RowParallelLinear(
            f, h, bias=bias, dtype=dtype,
            init_method=init_method_for(seed, f"{prefix}.linear_fc2.weight", output_layer_std(std, config.num_layers)),
            **_quant(config, seed, layer_number, "linear_fc2"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_fc1_gate is not None:
            return self.linear_fc2(F.silu(self.linear_fc1_gate(x)) * self.linear_fc1(x))
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """x + drop(attn(ln(x))), then + drop(mlp(ln(.))). `layer_number` is the global, 0-based index.

    --apply-residual-connection-post-layernorm (Megatron's legacy option): each residual is the norm's
    output instead of its input, ln(x) + drop(attn(ln(x))), and likewise around the MLP.
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int, dtype: torch.dtype):
        super().__init__()
        prefix = f"decoder.layers.{layer_number}"
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.residual_post_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = layer_norm(config, dtype)
        self.self_attention = SelfAttention(config, f"{prefix}.self_attention", seed, dtype, layer_number)
        self.pre_mlp_layernorm = layer_norm(config, dtype)
        self.mlp = MLP(config, f"{prefix}.mlp", seed, dtype, layer_number)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        p = self.hidden_dropout if self.training else 0.0
        with cpu_bf16_matmul(x):  # inside the layer, so activation recomputation uses it too
            normed = self.input_layernorm(x)
            attn = self.self_attention(normed, position_ids)
            with sp_rng():  # a sequence shard under --sequence-parallel: its own dropout stream
                x = (normed if self.residual_post_norm else x) + F.dropout(attn, p)
            normed = self.pre_mlp_layernorm(x)
            mlp = self.mlp(normed)
            with sp_rng():
                return (normed if self.residual_post_norm else x) + F.dropout(mlp, p)
