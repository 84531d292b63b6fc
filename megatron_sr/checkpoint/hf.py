"""Hugging Face model directories out (`export_hf`) and in (`import_hf`): GPT2LMHeadModel and LlamaForCausalLM.

A GPT-style model (learned positions, LayerNorm, GELU) is a GPT2LMHeadModel, a Llama-style one (RoPE, RMSNorm,
SwiGLU, grouped-query attention) a LlamaForCausalLM; any other combination has no faithful Hugging Face
equivalent and is refused in one line naming the option. The key mapping is in docs/interop.md:
- GPT-2's Conv1D weights are our linear weights transposed, and its fused c_attn is [q | k | v] of whole
  projections, where ours is per head [q k v | q k v | ...] (interop.py's row order);
- Llama's q/k/v projections are our per-group rows, split; RoPE is the same rotate-half form on both sides
  (the same inv_freq, cos/sin of cat(freqs, freqs)), so no row is permuted; SwiGLU's gate_proj is our
  linear_fc1_gate and its up_proj our linear_fc1.
The vocabulary leaves at its real size (config vocab_size): the rows of Megatron's padding are no token of the
tokenizer, and a round trip Hugging Face -> here -> Hugging Face then gives back the shapes it started from.
A directory is written under a temporary name and renamed in; the tokenizer's files travel with the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model.gpt import WORD_EMBEDDING
from .convert import VOCAB_NAMES, FullModel
from .interop import (
    OUTPUT_LAYER,
    POSITION_EMBEDDING,
    config_dict,
    fresh_full_model,
    fuse_qkv,
    model_config,
    split_qkv,
)

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"  # beside the iterations of a checkpoint imported with tokenizer files
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # three spellings of tanh-approximate GELU


# ---------------------------------------------------------------------------------------------------------------
# which architecture


def _no_equivalent(option: str, why: str) -> ValueError:
    return ValueError(f"{option}: no faithful Hugging Face equivalent ({why}); export with --export instead")


def hf_architecture(m: ModelConfig) -> str:
    """GPT2 or LLAMA for this model; a ValueError naming the option when neither computes the same function."""
    if m.apply_residual_connection_post_layernorm:
        raise _no_equivalent("--apply-residual-connection-post-layernorm", "GPT-2 and Llama take the residual "
                             "before the norm")
    if m.position_embedding_type == "learned_absolute":
        if m.normalization != "LayerNorm":
            raise _no_equivalent(f"--normalization {m.normalization}", "learned positions are GPT-2's, which has "
                                 "LayerNorm")
        if m.swiglu:
            raise _no_equivalent("--swiglu", "learned positions are GPT-2's, whose MLP is GELU")
        if m.query_groups != m.num_attention_heads:
            raise _no_equivalent("--group-query-attention", "learned positions are GPT-2's, which has one k/v head "
                                 "per query head")
        if m.head_dim * m.num_attention_heads != m.hidden_size:
            raise _no_equivalent(f"--kv-channels {m.kv_channels}", "GPT-2's heads x head size is its hidden size")
        return GPT2
    if m.position_embedding_type == "rope":
        if m.normalization != "RMSNorm":
            raise _no_equivalent(f"--normalization {m.normalization}", "RoPE models are exported as Llama, which "
                                 "has RMSNorm")
        if not m.swiglu:
            raise _no_equivalent("GELU MLP (no --swiglu)", "RoPE models are exported as Llama, whose MLP is SwiGLU")
        return LLAMA
    raise _no_equivalent(f"--position-embedding-type {m.position_embedding_type}", "GPT-2 has learned positions, "
                         "Llama RoPE")


# ---------------------------------------------------------------------------------------------------------------
# our whole tensors <-> Hugging Face tensors


def _layer(i: int, name: str) -> str:
    return f"decoder.{i}.{name}"


def gpt2_tensors(t: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict from ours (vocabulary rows already the real ones). A model trained with
    --disable-bias-linear gets zero biases, which compute the same function."""
    heads, d = m.num_attention_heads, m.head_dim

    def bias(name: str, rows: int) -> torch.Tensor:
        return t.get(name, torch.zeros(rows, dtype=t[WORD_EMBEDDING].dtype))

    out = {"transformer.wte.weight": t[WORD_EMBEDDING], "transformer.wpe.weight": t[POSITION_EMBEDDING]}
    for i in range(m.num_layers):
        p, ours = f"transformer.h.{i}.", f"decoder.{i}."
        qkv_w = split_qkv(t[ours + "self_attention.linear_qkv.weight"], heads, heads, d)
        qkv_b = split_qkv(bias(ours + "self_attention.linear_qkv.bias", 3 * heads * d), heads, heads, d)
        out.update({
            p + "ln_1.weight": t[ours + "input_layernorm.weight"], p + "ln_1.bias": t[ours + "input_layernorm.bias"],
            p + "attn.c_attn.weight": torch.cat(qkv_w).t(), p + "attn.c_attn.bias": torch.cat(qkv_b),
            p + "attn.c_proj.weight": t[ours + "self_attention.linear_proj.weight"].t(),
            p + "attn.c_proj.bias": bias(ours + "self_attention.linear_proj.bias", m.hidden_size),
            p + "ln_2.weight": t[ours + "pre_mlp_layernorm.weight"],
            p + "ln_2.bias": t[ours + "pre_mlp_layernorm.bias"],
            p + "mlp.c_fc.weight": t[ours + "mlp.linear_fc1.weight"].t(),
            p + "mlp.c_fc.bias": bias(ours + "mlp.linear_fc1.bias", m.ffn_hidden_size),
            p + "mlp.c_proj.weight": t[ours + "mlp.linear_fc2.weight"].t(),
            p + "mlp.c_proj.bias": bias(ours + "mlp.linear_fc2.bias", m.hidden_size),
        })
    out["transformer.ln_f.weight"] = t["final_layernorm.weight"]
    out["transformer.ln_f.bias"] = t["final_layernorm.bias"]
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = t[OUTPUT_LAYER]
    return out


def llama_tensors(t: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict from ours (vocabulary rows already the real ones)."""
    heads, groups, d = m.num_attention_heads, m.query_groups, m.head_dim
    kinds = ("weight",) if m.disable_bias_linear else ("weight", "bias")
    out = {"model.embed_tokens.weight": t[WORD_EMBEDDING]}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = t[_layer(i, "input_layernorm.weight")]
        out[p + "post_attention_layernorm.weight"] = t[_layer(i, "pre_mlp_layernorm.weight")]
        for kind in kinds:
            q, k, v = split_qkv(t[_layer(i, f"self_attention.linear_qkv.{kind}")], heads, groups, d)
            out.update({p + f"self_attn.q_proj.{kind}": q, p + f"self_attn.k_proj.{kind}": k,
                        p + f"self_attn.v_proj.{kind}": v,
                        p + f"self_attn.o_proj.{kind}": t[_layer(i, f"self_attention.linear_proj.{kind}")],
                        p + f"mlp.gate_proj.{kind}": t[_layer(i, f"mlp.linear_fc1_gate.{kind}")],
                        p + f"mlp.up_proj.{kind}": t[_layer(i, f"mlp.linear_fc1.{kind}")],
                        p + f"mlp.down_proj.{kind}": t[_layer(i, f"mlp.linear_fc2.{kind}")]})
    out["model.norm.weight"] = t["final_layernorm.weight"]
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = t[OUTPUT_LAYER]
    return out


def _take(hf: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
    if name not in hf:
        raise ValueError(f"{source}: no tensor {name} (not a checkpoint of the architecture its config.json names)")
    return hf.pop(name)


def ours_from_gpt2(hf: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our whole tensors from a GPT2LMHeadModel (or GPT2Model: names without `transformer.`) state dict."""
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # the causal-mask buffers of older versions
    heads, d = m.num_attention_heads, m.head_dim
    take = lambda name: _take(hf, name, source)  # noqa: E731
    out = {WORD_EMBEDDING: take("transformer.wte.weight"), POSITION_EMBEDDING: take("transformer.wpe.weight")}
    for i in range(m.num_layers):
        p = f"transformer.h.{i}."
        attn_w, attn_b = take(p + "attn.c_attn.weight").t().chunk(3), take(p + "attn.c_attn.bias").chunk(3)
        out.update({
            _layer(i, "input_layernorm.weight"): take(p + "ln_1.weight"),
            _layer(i, "input_layernorm.bias"): take(p + "ln_1.bias"),
            _layer(i, "self_attention.linear_qkv.weight"): fuse_qkv(*attn_w, heads, heads, d),
            _layer(i, "self_attention.linear_qkv.bias"): fuse_qkv(*attn_b, heads, heads, d),
            _layer(i, "self_attention.linear_proj.weight"): take(p + "attn.c_proj.weight").t(),
            _layer(i, "self_attention.linear_proj.bias"): take(p + "attn.c_proj.bias"),
            _layer(i, "pre_mlp_layernorm.weight"): take(p + "ln_2.weight"),
            _layer(i, "pre_mlp_layernorm.bias"): take(p + "ln_2.bias"),
            _layer(i, "mlp.linear_fc1.weight"): take(p + "mlp.c_fc.weight").t(),
            _layer(i, "mlp.linear_fc1.bias"): take(p + "mlp.c_fc.bias"),
            _layer(i, "mlp.linear_fc2.weight"): take(p + "mlp.c_proj.weight").t(),
            _layer(i, "mlp.linear_fc2.bias"): take(p + "mlp.c_proj.bias"),
        })
    out["final_layernorm.weight"], out["final_layernorm.bias"] = take("transformer.ln_f.weight"), \
        take("transformer.ln_f.bias")
    _output_layer(hf, out, m, source)
    return out


def ours_from_llama(hf: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our whole tensors from a LlamaForCausalLM state dict."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer of older versions
    heads, groups, d = m.num_attention_heads, m.query_groups, m.head_dim
    take = lambda name: _take(hf, name, source)  # noqa: E731
    out = {WORD_EMBEDDING: take("model.embed_tokens.weight")}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out[_layer(i, "input_layernorm.weight")] = take(p + "input_layernorm.weight")
        for kind in ("weight",) if m.disable_bias_linear else ("weight", "bias"):
            q, k, v = (take(p + f"self_attn.{x}_proj.{kind}") for x in "qkv")
            out[_layer(i, f"self_attention.linear_qkv.{kind}")] = fuse_qkv(q, k, v, heads, groups, d)
            out[_layer(i, f"self_attention.linear_proj.{kind}")] = take(p + f"self_attn.o_proj.{kind}")
        out[_layer(i, "pre_mlp_layernorm.weight")] = take(p + "post_attention_layernorm.weight")
        for kind in ("weight",) if m.disable_bias_linear else ("weight", "bias"):
            out[_layer(i, f"mlp.linear_fc1.{kind}")] = take(p + f"mlp.up_proj.{kind}")
            out[_layer(i, f"mlp.linear_fc1_gate.{kind}")] = take(p + f"mlp.gate_proj.{kind}")
            out[_layer(i, f"mlp.linear_fc2.{kind}")] = take(p + f"mlp.down_proj.{kind}")
    out["final_layernorm.weight"] = take("model.norm.weight")
    _output_layer(hf, out, m, source)
    return out


def _output_layer(hf: dict[str, torch.Tensor], out: dict[str, torch.Tensor], m: ModelConfig, source: str) -> None:
    """An untied lm_head becomes output_layer; a tied one may be stored too (equal to the embedding): dropped.
    Anything else left over is a tensor this mapping does not know: refused, never dropped silently."""
    head = hf.pop("lm_head.weight", None)
    if m.untie_embeddings_and_output_weights:
        if head is None:
            raise ValueError(f"{source}: tie_word_embeddings is false but there is no lm_head.weight")
        out[OUTPUT_LAYER] = head
    if hf:
        raise ValueError(f"{source}: tensors with no counterpart here: {sorted(hf)[:3]}")


# ---------------------------------------------------------------------------------------------------------------
# config.json


def _gpt2_config(m: ModelConfig, vocab: int) -> dict:
    return {"architectures": [GPT2], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": m.max_position_embeddings, "n_embd": m.hidden_size, "n_layer": m.num_layers,
            "n_head": m.num_attention_heads, "n_inner": m.ffn_hidden_size,
            "activation_function": "gelu_new",  # tanh-approximate, as ours
            "resid_pdrop": m.hidden_dropout, "embd_pdrop": m.hidden_dropout, "attn_pdrop": m.attention_dropout,
            "layer_norm_epsilon": m.norm_epsilon, "initializer_range": m.init_method_std,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "use_cache": True}


def _llama_config(m: ModelConfig, vocab: int) -> dict:
    theta = float(m.rotary_base)
    return {"architectures": [LLAMA], "model_type": "llama", "vocab_size": vocab, "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.query_groups,
            "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_position_embeddings,
            "rms_norm_eps": m.norm_epsilon, "initializer_range": m.init_method_std,
            # rope_theta for transformers 4, rope_parameters for 5
            "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_scaling": None, "attention_bias": not m.disable_bias_linear, "mlp_bias": not m.disable_bias_linear,
            "attention_dropout": m.attention_dropout, "pretraining_tp": 1,
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "use_cache": True}


def _refuse(source: str, key: str, value, expected: str) -> ValueError:
    return ValueError(f"{source}: {key} {value!r} has no equivalent here (expected {expected})")


def _model_fields_from_gpt2(c: dict, source: str) -> dict:
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_TANH_GELUS:
        raise _refuse(source, "activation_function", act, "tanh-approximate GELU: " + ", ".join(GPT2_TANH_GELUS))
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if c.get(key, ok) != ok:
            raise _refuse(source, key, c[key], repr(ok))
    hidden, heads = c["n_embd"], c["n_head"]
    positions = c.get("n_positions", c.get("n_ctx", 1024))
    return {"num_layers": c["n_layer"], "hidden_size": hidden, "num_attention_heads": heads,
            "ffn_hidden_size": c.get("n_inner") or 4 * hidden, "seq_length": positions,
            "max_position_embeddings": positions, "vocab_size": c["vocab_size"],
            "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
            "norm_epsilon": c.get("layer_norm_epsilon", 1e-5), "swiglu": False,
            "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", True),
            "disable_bias_linear": False, "kv_channels": hidden // heads, "group_query_attention": False,
            "num_query_groups": None, "init_method_std": c.get("initializer_range", 0.02),
            "hidden_dropout": c.get("resid_pdrop", 0.1), "attention_dropout": c.get("attn_pdrop", 0.1)}


def _rope_theta(c: dict, source: str) -> int:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise _refuse(source, "rope scaling", kind if kind != "default" else scaling, "plain RoPE (rope_type default)")
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise _refuse(source, "rope_theta", theta, "a whole number: --rotary-base is an integer")
    return int(theta)


def _model_fields_from_llama(c: dict, source: str) -> dict:
    if c.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", c["hidden_act"], "silu (SwiGLU)")
    attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise _refuse(source, "attention_bias/mlp_bias", (attention_bias, mlp_bias),
                      "both or neither: --disable-bias-linear is all linear layers")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    positions = c.get("max_position_embeddings", 2048)
    return {"num_layers": c["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
            "ffn_hidden_size": c["intermediate_size"], "seq_length": positions, "max_position_embeddings": positions,
            "vocab_size": c["vocab_size"], "position_embedding_type": "rope", "rotary_base": _rope_theta(c, source),
            "normalization": "RMSNorm", "norm_epsilon": c.get("rms_norm_eps", 1e-6), "swiglu": True,
            "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", False),
            "disable_bias_linear": not attention_bias, "kv_channels": c.get("head_dim") or hidden // heads,
            "group_query_attention": kv_heads != heads, "num_query_groups": kv_heads if kv_heads != heads else None,
            "init_method_std": c.get("initializer_range", 0.02), "hidden_dropout": 0.0,
            "attention_dropout": c.get("attention_dropout", 0.0)}


# ---------------------------------------------------------------------------------------------------------------
# tokenizer files


def tokenizer_files(data: dict, seq_length: int) -> tuple[dict[str, Path], dict | None, dict]:
    """(files to copy: name in the export -> source, tokenizer_config.json to write or None, bos/eos ids) of the
    tokenizer a training config names; nothing for NullTokenizer or --mock-data without a tokenizer."""
    from ..data.tokenizers import GPT2_EOD, SENTENCEPIECE_TYPES, build_tokenizer, resolve_tokenizer_type

    kind = resolve_tokenizer_type(data.get("tokenizer_type"), data.get("tokenizer_model"))
    if kind in (None, "NullTokenizer"):
        return {}, None, {}
    tok = build_tokenizer(kind, data.get("tokenizer_model"), data.get("vocab_file"), data.get("merge_file"))
    if kind == "GPT2BPETokenizer":  # GPT-2's own convention: <|endoftext|> begins and ends a document
        files = {"vocab.json": Path(data["vocab_file"]), "merges.txt": Path(data["merge_file"])}
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_EOD, "eos_token": GPT2_EOD,
                  "unk_token": GPT2_EOD, "add_prefix_space": False, "add_bos_token": False,
                  "model_max_length": seq_length}
        return files, config, {"bos_token_id": tok.eod_id, "eos_token_id": tok.eod_id}
    if kind in SENTENCEPIECE_TYPES:
        return _sentencepiece_files(Path(data["tokenizer_model"]), seq_length)
    return _tokenizer_json_files(Path(data["tokenizer_model"]), tok.eod_id, seq_length)


def _sentencepiece_files(model: Path, seq_length: int) -> tuple[dict[str, Path], dict, dict]:
    """transformers' LlamaTokenizer reads a sentencepiece .model as tokenizer.model; ours adds no BOS and no
    prefix space (tools/train_tokenizer.py's models keep every space), so neither may transformers'."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = {key: sp.IdToPiece(i) for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                   ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())) if i >= 0}
    config = {"tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, "legacy": False, "model_max_length": seq_length}
    ids = {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else sp.eos_id(), "eos_token_id": sp.eos_id()}
    return {"tokenizer.model": model}, config, ids


def _tokenizer_json_files(path: Path, eod_id: int | None, seq_length: int) -> tuple[dict[str, Path], dict, dict]:
    """A tokenizer.json as it is (PreTrainedTokenizerFast: its own pre-tokenizer and post-processor, whatever the
    model), with one tokenizer_config.json holding what the files beside it say of its special tokens."""
    from tokenizers import Tokenizer

    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    config: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the first one wins, as in ours
        if (directory / name).is_file():
            data = json.loads((directory / name).read_text(encoding="utf-8"))
            for key, value in data.items():
                if name == "tokenizer_config.json" or key in SPECIAL_TOKEN_KEYS:
                    config.setdefault(key, value)
    for key in SPECIAL_TOKEN_KEYS:  # {"content": ...} without transformers' "__type" tag: what it reads is the text
        if isinstance(config.get(key), dict) and "__type" not in config[key]:
            config[key] = config[key].get("content")
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if eod_id is not None:
        config.setdefault("eos_token", Tokenizer.from_file(str(file)).id_to_token(eod_id))
    config.setdefault("model_max_length", seq_length)
    return {"tokenizer.json": file}, config, {"eos_token_id": eod_id} if eod_id is not None else {}


def _copy_tokenizer_into(directory: Path, data: dict, seq_length: int) -> dict:
    files, config, special = tokenizer_files(data, seq_length)
    for name, src in files.items():
        shutil.copyfile(src, directory / name)
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return special


def _hf_tokenizer_names(hf_dir: Path) -> tuple[list[str], str | None]:
    """(the tokenizer files of a Hugging Face directory, Megatron's --tokenizer-type for them)."""
    if (hf_dir / "tokenizer.json").is_file():
        return [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                if (hf_dir / n).is_file()], "HuggingFaceTokenizer"
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        return ["vocab.json", "merges.txt"], "GPT2BPETokenizer"
    if (hf_dir / "tokenizer.model").is_file():
        return ["tokenizer.model"], "SentencePieceTokenizer"
    return [], None


def tokenizer_data_flags(hf_dir: Path, dest: Path) -> dict:
    """The data flags of the tokenizer in a Hugging Face directory once copy_tokenizer has put its files in `dest`
    (so the checkpoint does not depend on where the download lives): tokenizer.json -> HuggingFaceTokenizer,
    vocab.json + merges.txt -> GPT2BPETokenizer, tokenizer.model -> SentencePieceTokenizer; {} without one."""
    _, kind = _hf_tokenizer_names(hf_dir)
    dest = dest.resolve()
    if kind == "HuggingFaceTokenizer":
        return {"tokenizer_type": kind, "tokenizer_model": str(dest)}
    if kind == "GPT2BPETokenizer":
        return {"tokenizer_type": kind, "vocab_file": str(dest / "vocab.json"), "merge_file": str(dest / "merges.txt")}
    if kind == "SentencePieceTokenizer":
        return {"tokenizer_type": kind, "tokenizer_model": str(dest / "tokenizer.model")}
    return {}


def copy_tokenizer(hf_dir: str | Path, dest: Path) -> list[str]:
    """Copy the tokenizer files of a Hugging Face directory into `dest`; returns their names."""
    names, _ = _hf_tokenizer_names(Path(hf_dir))
    if names:
        dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(hf_dir) / name, dest / name)
    return names


# ---------------------------------------------------------------------------------------------------------------
# export


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # a clone each: safetensors refuses tensors that share memory (q, k, v are views of one fused weight)
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}


def _publish_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()  # checked empty before writing
    os.replace(tmp, final)


def export_hf(full: FullModel, out_dir: str | Path, dtype: str | None = None) -> str:
    """Write `full` as a Hugging Face model directory (config.json, model.safetensors, generation_config.json,
    the tokenizer's files); returns the architecture. `out_dir` must not exist or be empty; `dtype` fp32, bf16
    or fp16 (default: the checkpoint's)."""
    from safetensors.torch import save_file

    config = full.common.get("config") if isinstance(full.common, dict) else None
    m = model_config(config)
    arch = hf_architecture(m)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--export-hf {out}: exists and is not an empty directory")
    ours = {k: (v[:m.vocab_size] if k.endswith(VOCAB_NAMES) else v) for k, v in full.tensors.items()}
    target = DTYPES[dtype] if dtype else ours[WORD_EMBEDDING].dtype
    if target not in HF_DTYPE_NAMES:
        raise ValueError(f"the checkpoint's dtype {target} is none of fp32, bf16, fp16: give --dtype")
    tensors = _cast(gpt2_tensors(ours, m) if arch == GPT2 else llama_tensors(ours, m), target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        special = _copy_tokenizer_into(tmp, (config or {}).get("data") or {}, m.seq_length)
        hf_config = (_gpt2_config if arch == GPT2 else _llama_config)(m, m.vocab_size)
        hf_config.update(special, torch_dtype=HF_DTYPE_NAMES[target], dtype=HF_DTYPE_NAMES[target])
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if special:
            generation = dict(special, _from_model_config=True)
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch


# ---------------------------------------------------------------------------------------------------------------
# import


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from-hf {hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin(s)."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", lambda p: load_file(str(p))),
                               ("pytorch_model.bin.index.json",
                                lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        if (hf_dir / index_name).is_file():
            shards = sorted(set(json.loads((hf_dir / index_name).read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(loader(hf_dir / shard))
            return tensors
    if (hf_dir / WEIGHTS).is_file():
        return load_file(str(hf_dir / WEIGHTS))
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"--from-hf {hf_dir}: no model.safetensors or pytorch_model.bin")


def import_hf(hf_dir: str | Path, tokenizer_dest: Path | None = None) -> FullModel:
    """A GPT-2 or Llama Hugging Face directory as a FullModel of our names at iteration 0 with a fresh optimizer;
    its saved config has the model's shape from config.json and, when the directory has tokenizer files, the
    tokenizer flags naming them in `tokenizer_dest` (where the caller puts them with copy_tokenizer)."""
    hf_dir = Path(hf_dir)
    c = read_hf_config(hf_dir)
    arch = (c.get("architectures") or [None])[0]
    model_type = c.get("model_type")
    if model_type == "gpt2" or arch in (GPT2, "GPT2Model"):
        fields, convert = _model_fields_from_gpt2(c, str(hf_dir)), ours_from_gpt2
    elif model_type == "llama" or arch == LLAMA:
        fields, convert = _model_fields_from_llama(c, str(hf_dir)), ours_from_llama
    else:
        raise ValueError(f"--from-hf {hf_dir}: model_type {model_type!r} ({arch}) is not supported "
                         "(GPT-2 and Llama are)")
    data = tokenizer_data_flags(hf_dir, tokenizer_dest) if tokenizer_dest is not None else {}
    config = config_dict(fields, data)
    m = model_config(config)
    tensors = convert(read_hf_weights(hf_dir), m, str(hf_dir))
    return fresh_full_model(tensors, config, source=str(hf_dir))
