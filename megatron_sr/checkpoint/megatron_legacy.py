"""Megatron-LM checkpoints in: its legacy `torch` format (`torch_dist` is refused in one line naming the way out).

    ROOT/latest_checkpointed_iteration.txt                 "500" or "release"
    ROOT/iter_0000500/mp_rank_TT[_PPP]/model_optim_rng.pt  {"model", "args", "iteration", "checkpoint_version", ...}
    ROOT/release/mp_rank_TT[_PPP]/model_optim_rng.pt       (what `release` names)

Each file holds one (tp, pp) rank's state dict with megatron-core's GPTModel names and `args`, the argparse
Namespace of the run (the model's shape comes from it). The shards are merged to whole tensors (tp: the
column-parallel weights along dim 0, the row-parallel ones along dim 1; pp: stage-local layer numbers made global)
and renamed to ours (docs/interop.md has the table). Two layouts differ from ours:
- SwiGLU's fused linear_fc1 holds, on every tp rank, [that rank's gate rows | its up rows]; ours keeps the gate
  (linear_fc1_gate) and up (linear_fc1) projections apart, so each rank's slice is cut in two before merging;
- Transformer Engine's fused norms store the layer norm inside the next linear layer
  (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`): they become our input_layernorm and
  pre_mlp_layernorm.
The fused qkv rows are per k/v group, [its q heads, k, v], in Megatron as here: taken as they are.
Weights only: Megatron's optimizer state is laid out by its parameter groups and buffers, not by name, so the
converted checkpoint starts a fresh optimizer (as Megatron's --no-load-optim); the iteration and consumed samples
are kept, so the learning-rate schedule and the data continue where the run stopped.
"""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import torch

from ..model.gpt import WORD_EMBEDDING
from .convert import FullModel
from .interop import OUTPUT_LAYER, POSITION_EMBEDDING, config_dict, fresh_full_model
from .layout import LATEST, iteration_dir, load_file

FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# tensor-parallel dim of each Megatron parameter (by the end of its name); anything else is replicated
COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                   "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
# Megatron's name inside a layer -> ours
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight", "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias": "self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias": "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight", "mlp.linear_fc1.bias": "mlp.linear_fc1.bias",
    # SwiGLU's gate half of linear_fc1, cut out by _merge_tp
    "mlp.linear_fc1_gate.weight": "mlp.linear_fc1_gate.weight", "mlp.linear_fc1_gate.bias": "mlp.linear_fc1_gate.bias",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight", "mlp.linear_fc2.bias": "mlp.linear_fc2.bias",
}
OTHER_NAMES = {"embedding.word_embeddings.weight": WORD_EMBEDDING,
               "embedding.position_embeddings.weight": POSITION_EMBEDDING,
               "decoder.final_layernorm.weight": "final_layernorm.weight",
               "decoder.final_layernorm.bias": "final_layernorm.bias", "output_layer.weight": OUTPUT_LAYER}
# (args attribute, value that is fine, the flag to name): Megatron options this model does not have
UNSUPPORTED = (("num_experts", None, "--num-experts (MoE)"), ("qk_layernorm", False, "--qk-layernorm"),
               ("rotary_interleaved", False, "--rotary-interleaved"), ("use_rope_scaling", False, "--use-rope-scaling"),
               ("apply_layernorm_1p", False, "--apply-layernorm-1p"), ("squared_relu", False, "--squared-relu"),
               ("multi_latent_attention", False, "--multi-latent-attention"),
               ("num_layers_per_virtual_pipeline_stage", None, "--num-layers-per-virtual-pipeline-stage"),
               ("virtual_pipeline_model_parallel_size", None, "--virtual-pipeline-model-parallel-size"),
               ("mtp_num_layers", None, "--mtp-num-layers"), ("softmax_scale", None, "--softmax-scale"),
               ("expert_model_parallel_size", 1, "--expert-model-parallel-size"))


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron root (its latest file naming an iteration or `release`) or iteration directory, of either format;
    not this project's one-process checkpoint, which has the same file names (and a format tag, no `args`)."""
    try:
        directory = megatron_iteration_dir(path)
    except (FileNotFoundError, ValueError):
        return False
    if is_torch_dist(directory):
        return True
    first = next(iter(sorted(directory.glob(f"mp_rank_*/{FILE}"))), None)
    if first is None:
        return False
    try:
        payload = load_file(first, mmap=True)
    except ValueError:
        return False
    return isinstance(payload, dict) and "args" in payload and "format" not in payload


def megatron_iteration_dir(path: str | Path) -> Path:
    """The iteration directory given, or the one a root's latest file names (Megatron's `release` is ROOT/release)."""
    path = Path(path)
    if any(path.glob(f"mp_rank_*/{FILE}")) or is_torch_dist(path):
        return path
    latest = path / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"{path}: neither a Megatron checkpoint iteration directory nor a root with {LATEST}")
    text = latest.read_text().strip()
    if text == "release":
        return path / "release"
    if not text.isdigit():
        raise ValueError(f"{latest}: expected an iteration number or 'release', got {text!r}")
    return iteration_dir(path, int(text))


def is_torch_dist(directory: Path) -> bool:
    """megatron-core's dist_checkpointing layout: metadata.json naming its sharded backend, common.pt, .metadata."""
    meta = directory / "metadata.json"
    if not meta.is_file():
        return False
    import json

    try:
        return "sharded_backend" in json.loads(meta.read_text())
    except (UnicodeDecodeError, ValueError):
        return False


def _rank_files(directory: Path) -> dict[tuple[int, int], Path]:
    files = {}
    for path in sorted(directory.glob(f"mp_rank_*/{FILE}")):
        m = RANK_DIR.match(path.parent.name)
        if m is None:
            raise ValueError(f"{path.parent}: an mp_rank directory with an expert-parallel part (MoE) is not "
                             "supported")
        files[(int(m.group(1)), int(m.group(2) or 0))] = path
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        raise FileNotFoundError(f"{directory}: no {FILE} for tp rank {missing[0][0]}, pp rank {missing[0][1]}")
    return files


# ---------------------------------------------------------------------------------------------------------------
# args -> our config


def _arg(args: Namespace, name: str, default=None):
    return getattr(args, name, default)


def _activation_is_ours(args: Namespace) -> str | None:
    """Why Megatron's GELU differs from ours (tanh-approximate), or None: megatron-core's MLP runs the fused
    bias-GELU (tanh) with biases and --bias-gelu-fusion (Megatron's default), or --openai-gelu; otherwise the
    exact erf GELU."""
    if _arg(args, "swiglu", False) or _arg(args, "openai_gelu", False):
        return None
    if _arg(args, "add_bias_linear", True) and _arg(args, "bias_gelu_fusion", True):
        return None
    return "the exact (erf) GELU of --no-bias-gelu-fusion or --disable-bias-linear without --openai-gelu"


def model_fields(args: Namespace, vocab_size: int | None, source: str, approximate_gelu: bool = False) -> dict:
    """Our model settings from Megatron's args; a ValueError naming the Megatron flag this model does not have."""
    for name, fine, flag in UNSUPPORTED:
        value = _arg(args, name, fine)
        if value not in (fine, None, False):
            raise ValueError(f"{source}: the checkpoint was trained with {flag} {value}, which megatron-sr does not "
                             "have")
    if _arg(args, "rotary_percent", 1.0) != 1.0:
        raise ValueError(f"{source}: --rotary-percent {args.rotary_percent}: megatron-sr rotates the whole head")
    why = _activation_is_ours(args)
    if why and not approximate_gelu:
        raise ValueError(f"{source}: the checkpoint's MLP uses {why}; megatron-sr's GELU is tanh-approximate (pass "
                         "--accept-gelu-approximation to convert anyway: logits then differ slightly)")
    position = _arg(args, "position_embedding_type", "learned_absolute")
    if _arg(args, "use_rotary_position_embeddings", False):
        position = "rope"
    if position not in ("learned_absolute", "rope", "none"):
        raise ValueError(f"{source}: --position-embedding-type {position}: megatron-sr has learned_absolute, rope, "
                         "none")
    add_bias = bool(_arg(args, "add_bias_linear", True))
    if _arg(args, "add_qkv_bias", False) and not add_bias:
        raise ValueError(f"{source}: --add-qkv-bias without the other biases: megatron-sr's biases are all or none "
                         "(--disable-bias-linear)")
    heads = args.num_attention_heads
    gqa = bool(_arg(args, "group_query_attention", False))
    seq = _arg(args, "seq_length") or _arg(args, "max_position_embeddings")
    return {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": heads,
            "ffn_hidden_size": _arg(args, "ffn_hidden_size") or 4 * args.hidden_size, "seq_length": seq,
            "max_position_embeddings": _arg(args, "max_position_embeddings") or seq,
            "vocab_size": vocab_size or args.padded_vocab_size,
            "make_vocab_size_divisible_by": _arg(args, "make_vocab_size_divisible_by", 128),
            "position_embedding_type": position, "rotary_base": int(_arg(args, "rotary_base", 10000)),
            "swiglu": bool(_arg(args, "swiglu", False)),
            "untie_embeddings_and_output_weights": bool(_arg(args, "untie_embeddings_and_output_weights", False)),
            "disable_bias_linear": not add_bias, "init_method_std": _arg(args, "init_method_std", 0.02),
            "hidden_dropout": _arg(args, "hidden_dropout", 0.1),
            "attention_dropout": _arg(args, "attention_dropout", 0.1),
            "normalization": _arg(args, "normalization", "LayerNorm"),
            "norm_epsilon": _arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5)),
            "group_query_attention": gqa, "num_query_groups": _arg(args, "num_query_groups") if gqa else None,
            "kv_channels": _arg(args, "kv_channels") or args.hidden_size // heads,
            "apply_residual_connection_post_layernorm": bool(_arg(args, "apply_residual_connection_post_layernorm",
                                                                  False))}


def data_fields(args: Namespace) -> dict:
    """The tokenizer flags of the Megatron run (paths as that run saw them), for the saved config."""
    kind = _arg(args, "tokenizer_type")
    if kind not in ("GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return {}
    return {k: _arg(args, k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
            if _arg(args, k) is not None}


# ---------------------------------------------------------------------------------------------------------------
# state dicts -> our whole tensors


def _tp_dim(name: str) -> int:
    if name.endswith(COLUMN_PARALLEL):
        return 0
    return 1 if name.endswith(ROW_PARALLEL) else -1


def _skipped(name: str) -> bool:
    """Not parameters: Transformer Engine's FP8 metadata, RoPE's cached frequencies."""
    return name.endswith(("_extra_state", "inv_freq"))


def _merge_tp(name: str, parts: list[torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """One Megatron parameter's tp slices -> {Megatron-style name: whole tensor}; SwiGLU's fc1 becomes its gate
    (name + '_gate') and up halves, each rank's slice being [its gate | its up]."""
    dim = _tp_dim(name)
    if swiglu and MEGATRON_LAYER.match(name) and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
        halves = [p.chunk(2, dim=0) for p in parts]
        stem, kind = name.rsplit(".", 1)
        return {f"{stem}_gate.{kind}": torch.cat([g for g, _ in halves]), name: torch.cat([u for _, u in halves])}
    if dim < 0:
        return {name: parts[0]}
    return {name: torch.cat(parts, dim=dim)}


def _stage_tensors(files: list[Path], swiglu: bool) -> dict[str, torch.Tensor]:
    """The merged tensors of one pipeline stage (Megatron names, stage-local layer numbers)."""
    payloads = [load_file(f) for f in files]
    for path, payload in zip(files, payloads):
        if not isinstance(payload, dict) or "model" not in payload:
            extra = " (virtual pipeline stages: model0, model1, ...)" if isinstance(payload, dict) and \
                "model0" in payload else ""
            raise ValueError(f"{path}: no 'model' state dict{extra}; not a supported Megatron checkpoint")
    out: dict[str, torch.Tensor] = {}
    for name in payloads[0]["model"]:
        if _skipped(name) or payloads[0]["model"][name] is None:
            continue
        out.update(_merge_tp(name, [p["model"][name] for p in payloads], swiglu))
    return out


def _rename(stages: list[dict[str, torch.Tensor]], tied: bool, source: str) -> dict[str, torch.Tensor]:
    """Megatron names of every stage -> ours with global layer numbers (each stage's offset: the layers before)."""
    ours: dict[str, torch.Tensor] = {}
    offset = 0
    for tensors in stages:
        layers = set()
        for name, tensor in tensors.items():
            m = MEGATRON_LAYER.match(name)
            if m:
                local, rest = int(m.group(1)), m.group(2)
                rest_ours = LAYER_NAMES.get(rest)
                if rest_ours is None:
                    raise ValueError(f"{source}: {name} has no counterpart here")
                layers.add(local)
                ours[f"decoder.{offset + local}.{rest_ours}"] = tensor
            elif name in OTHER_NAMES:
                if name == "output_layer.weight" and tied:
                    continue  # the last stage's copy of the tied embedding
                ours[OTHER_NAMES[name]] = tensor
            else:
                raise ValueError(f"{source}: {name} has no counterpart here")
        offset += len(layers)
    return ours


def _truncate_vocab(tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
    for name in (WORD_EMBEDDING, OUTPUT_LAYER):
        if name in tensors:
            if tensors[name].shape[0] < vocab_size:
                raise ValueError(f"--vocab-size {vocab_size} is larger than the checkpoint's {tensors[name].shape[0]} "
                                 "vocabulary rows")
            tensors[name] = tensors[name][:vocab_size]


def read_megatron_checkpoint(path: str | Path, vocab_size: int | None = None,
                             approximate_gelu: bool = False) -> FullModel:
    """A Megatron-LM checkpoint (legacy torch format; torch_dist is refused) as a FullModel of our names with a
    fresh optimizer. `vocab_size`: the tokenizer's (Megatron saves only the padded size, which is used
    when not given; padding rows are never a token)."""
    directory = megatron_iteration_dir(path)
    if is_torch_dist(directory):
        raise _refuse_torch_dist(directory)
    files = _rank_files(directory)
    tp, pp = 1 + max(t for t, _ in files), 1 + max(p for _, p in files)
    first = load_file(files[(0, 0)], mmap=True)
    args = first.get("args") if isinstance(first, dict) else None
    if not isinstance(args, Namespace):
        raise ValueError(f"{files[(0, 0)]}: no Megatron 'args' (an argparse Namespace) in the checkpoint")
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if _arg(args, name, value) != value:
            raise ValueError(f"{directory}: args.{name} is {_arg(args, name)} but the directory holds {value}")
    fields = model_fields(args, vocab_size, str(directory), approximate_gelu)
    stages = [_stage_tensors([files[(t, p)] for t in range(tp)], fields["swiglu"]) for p in range(pp)]
    ours = _rename(stages, not fields["untie_embeddings_and_output_weights"], str(directory))
    _truncate_vocab(ours, fields["vocab_size"])
    config = config_dict(fields, data_fields(args))
    iteration = int(first.get("iteration", 0)) if directory.name != "release" else 0
    return fresh_full_model(ours, config, iteration=iteration,
                            consumed_train_samples=int(_arg(args, "consumed_train_samples", 0) or 0),
                            source=str(directory))


def _refuse_torch_dist(directory: Path) -> ValueError:
    """torch_dist (megatron-core's dist_checkpointing) is not read: megatron-core cannot write one on a CPU (its
    save synchronises CUDA and needs psutil), so no reader here could be tested; Megatron converts its own."""
    return ValueError(f"{directory}: a Megatron-LM torch_dist checkpoint, which megatron-sr does not read; convert it "
                      "to Megatron's legacy torch format first (Megatron-LM's pretrain_gpt.py with the run's flags, "
                      f"--load {directory.parent} --ckpt-convert-format torch --ckpt-convert-save OUT), then "
                      "--from-megatron OUT")
