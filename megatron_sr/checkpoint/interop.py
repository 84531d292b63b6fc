"""What the Hugging Face (hf.py) and Megatron-LM (megatron_legacy.py) converters share: this project's parameter
names, shapes and tensor-parallel dims for a model config, the fused qkv row order, and a whole model with a
fresh optimizer state that convert.write_checkpoint splits for any tp/pp.

The fused qkv weight of a layer (`decoder.N.self_attention.linear_qkv`) holds its rows per k/v group:
[group 0: its heads/groups q heads, its k head, its v head | group 1: ...], each head `head_dim` rows
(transformer.SelfAttention; Megatron's own order). Query head i uses the k/v of group i // (heads / groups).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config, ModelConfig
from ..model.gpt import WORD_EMBEDDING
from .convert import LAYER, FullModel

OUTPUT_LAYER = "output_layer.weight"
POSITION_EMBEDDING = "embedding.position_embeddings.weight"


def model_config(config: dict | None) -> ModelConfig:
    """The ModelConfig of a saved training config (Config.to_dict()), derived sizes filled as finalize does."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError("the checkpoint holds no saved training config (its model's shape is unknown)")
    m = Config.from_dict(config).model
    if m.vocab_size is None:
        raise ValueError("the checkpoint's saved config has no vocab_size")
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size if not m.swiglu else int((4 * m.hidden_size * 2 / 3) / 64) * 64
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    return m


def parameter_layout(m: ModelConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (whole shape, tensor-parallel partition dim, -1: replicated) of every parameter of the whole
    (one-stage, tp = 1) model, in GPTModel's order; vocabulary rows = m.vocab_size (before padding)."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    heads, groups, bias = m.num_attention_heads, m.query_groups, not m.disable_bias_linear
    out: dict[str, tuple[tuple[int, ...], int]] = {WORD_EMBEDDING: ((m.vocab_size, h), 0)}
    if m.position_embedding_type == "learned_absolute":
        out[POSITION_EMBEDDING] = ((m.max_position_embeddings, h), -1)
    norm = ("weight",) if m.normalization == "RMSNorm" else ("weight", "bias")

    def linear(name: str, rows: int, cols: int, dim: int) -> None:
        out[f"{name}.weight"] = ((rows, cols), dim)
        if bias:  # a row-parallel layer's bias is added after the reduction: replicated
            out[f"{name}.bias"] = ((rows,), 0 if dim == 0 else -1)

    for i in range(m.num_layers):
        p = f"decoder.{i}."
        out.update({f"{p}input_layernorm.{k}": ((h,), -1) for k in norm})
        linear(f"{p}self_attention.linear_qkv", (heads + 2 * groups) * d, h, 0)
        linear(f"{p}self_attention.linear_proj", h, heads * d, 1)
        out.update({f"{p}pre_mlp_layernorm.{k}": ((h,), -1) for k in norm})
        linear(f"{p}mlp.linear_fc1", f, h, 0)
        if m.swiglu:
            linear(f"{p}mlp.linear_fc1_gate", f, h, 0)
        linear(f"{p}mlp.linear_fc2", h, f, 1)
    out.update({f"final_layernorm.{k}": ((h,), -1) for k in norm})
    if m.untie_embeddings_and_output_weights:
        out[OUTPUT_LAYER] = ((m.vocab_size, h), 0)
    return out


def split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused qkv rows (weight [rows, in] or bias [rows]) -> (q, k, v), each in head order."""
    per = heads // groups
    rest = tuple(fused.shape[1:])
    t = fused.reshape(groups, per + 2, head_dim, *rest)
    q = t[:, :per].reshape(heads * head_dim, *rest)
    k = t[:, per].reshape(groups * head_dim, *rest)
    v = t[:, per + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
             head_dim: int) -> torch.Tensor:
    """The inverse of split_qkv: q, k, v in head order -> our per-group fused rows."""
    per = heads // groups
    rest = tuple(q.shape[1:])
    parts = (q.reshape(groups, per, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
             v.reshape(groups, 1, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, *rest)


def config_dict(model: dict, data: dict | None = None) -> dict:
    """A saved training config (what Config.to_dict() gives) with these model and data fields, the rest defaults."""
    cfg = Config()
    for section, values in (("model", model), ("data", data or {})):
        names = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        for name, value in values.items():
            if name not in names:
                raise KeyError(f"{section}.{name} is not a megatron-sr setting")
            setattr(getattr(cfg, section), name, value)
    return cfg.to_dict()


def check_tensors(tensors: dict[str, torch.Tensor], m: ModelConfig, source: str) -> None:
    """The converted tensors are exactly the model's parameters, with their shapes; else one line naming the first
    difference (a mapping error, or a checkpoint whose config does not describe it)."""
    layout = parameter_layout(m)
    missing = [n for n in layout if n not in tensors]
    extra = [n for n in tensors if n not in layout]
    if missing or extra:
        raise ValueError(f"{source}: the converted weights do not fit the model its config describes (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    for name, (shape, _) in layout.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, its config gives {shape}")


def fresh_full_model(tensors: dict[str, torch.Tensor], config: dict, *, iteration: int = 0,
                     consumed_train_samples: int = 0, source: str = "converted model") -> FullModel:
    """A whole model of our names (vocabulary rows = config vocab_size) as a FullModel at `iteration` with a fresh
    optimizer: zero Adam moments at step 0, which a run loading it treats exactly as a new optimizer (the first
    step's bias correction is step 1's), so a plain --load continues from it. A tied output layer becomes the
    last stage's copy of the embedding when split into pipeline stages."""
    m = model_config(config)
    check_tensors(tensors, m, source)
    layout = parameter_layout(m)
    full = FullModel({}, {}, {}, iteration=iteration, layer_numbering="local",
                     common={"consumed_train_samples": consumed_train_samples, "skipped_iters": 0, "config": config})
    seen_layer = False
    for name, (_, dim) in layout.items():
        is_layer = bool(LAYER.match(name))
        seen_layer |= is_layer
        full.tensors[name] = tensors[name].contiguous()
        full.partition_dim[name] = dim
        full.section[name] = "layer" if is_layer else ("post" if seen_layer else "pre")
        zeros = torch.zeros(tensors[name].shape, dtype=torch.bfloat16)  # zero is exact in any state dtype
        full.optimizer[name] = {"exp_avg": zeros, "exp_avg_sq": zeros}
    if not m.untie_embeddings_and_output_weights:
        full.ties[OUTPUT_LAYER] = WORD_EMBEDDING
        full.section[OUTPUT_LAYER], full.partition_dim[OUTPUT_LAYER] = "post", 0
    return full
