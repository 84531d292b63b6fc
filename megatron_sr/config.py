"""Typed configuration: one dataclass per component, Megatron-LM's flag names, YAML files that mirror them.

Every dataclass field is a flag: `num_layers` is `--num-layers`; the YAML key is either spelling
(`num-layers:` or `num_layers:`). Precedence: dataclass default < `--config FILE.yaml` < command line.
An unknown key, a bad value or an inconsistent setting raises ConfigError with one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .precision import PRECISIONS, precision_mode


class ConfigError(ValueError):
    """A one-line configuration error naming the flag or file at fault."""


def _opt(default, help: str, choices=None):  # noqa: A002  (argparse's own word)
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    num_layers: int = _opt(12, "transformer layers")
    hidden_size: int = _opt(768, "hidden size")
    num_attention_heads: int = _opt(12, "attention heads")
    ffn_hidden_size: int | None = _opt(None, "MLP hidden size (default 4 x hidden; with --swiglu 8/3 x hidden "
                                                  "rounded down to a multiple of 64, as Megatron)")
    seq_length: int = _opt(1024, "tokens per sample")
    max_position_embeddings: int | None = _opt(None, "learned position table size (default: seq length)")
    vocab_size: int | None = _opt(None, "vocabulary size (default: the tokenizer's)")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this (x tp size)")
    position_embedding_type: str = _opt("learned_absolute", "position embedding", ("learned_absolute", "rope"))
    rotary_base: int = _opt(10000, "RoPE base")
    swiglu: bool = _opt(False, "SwiGLU MLP instead of GELU")
    untie_embeddings_and_output_weights: bool = _opt(False, "separate output layer instead of the tied embedding")
    disable_bias_linear: bool = _opt(False, "no biases in linear layers")
    init_method_std: float = _opt(0.02, "std of the normal initialisation")
    hidden_dropout: float = _opt(0.1, "dropout on the residual branches and embeddings")
    attention_dropout: float = _opt(0.1, "dropout on the attention probabilities")
    layernorm_epsilon: float = _opt(1e-5, "LayerNorm epsilon")
    loss_chunk_tokens: int = _opt(4096, "tokens per chunk of the LM head + cross entropy, whose [tokens, vocab] "
                                        "logits are never held whole (0: one chunk, the plain loss)")
    recompute_activations: bool = _opt(False, "Megatron's alias for --recompute-granularity selective")
    recompute_granularity: str | None = _opt(
        None, "recompute in backward: full (whole layers, see --recompute-method) or selective (the attention core)",
        ("full", "selective"))
    recompute_method: str | None = _opt(
        None, "with full: uniform (every group of --recompute-num-layers layers) or block (the first "
        "--recompute-num-layers layers of each pipeline stage, the rest not)", ("uniform", "block"))
    recompute_num_layers: int | None = _opt(None, "with full: layers per recomputed group (uniform) or recomputed "
                                                  "layers per stage (block)")


@dataclass
class OptimizerConfig:
    lr: float = _opt(1e-4, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of decay")
    lr_decay_style: str = _opt("linear", "decay after warm-up (Megatron's default: linear)",
                               ("cosine", "linear", "constant"))
    lr_warmup_iters: int = _opt(0, "linear warm-up iterations")
    lr_decay_iters: int | None = _opt(None, "iterations of decay, warm-up included (default: train iters)")
    weight_decay: float = _opt(0.01, "decoupled weight decay (matrices only)")
    clip_grad: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.999, "Adam beta2")
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    precision: str = _opt("bf16-sr", "precision mode (megatron_sr/precision.py)", PRECISIONS)
    optimizer_state_dtype: str = _opt("fp32", "dtype of Adam's m and v", ("fp32", "bf16"))
    grad_dtype: str = _opt("bf16", "gradient dtype in bf16-sr/bf16 (fp32 keeps an FP32 accumulator)", ("bf16", "fp32"))


@dataclass
class TrainingConfig:
    micro_batch_size: int = _opt(1, "samples per micro-batch")
    global_batch_size: int | None = _opt(None, "samples per iteration (default: micro batch x dp)")
    train_iters: int = _opt(1000, "iterations to train")
    seed: int = _opt(1234, "seed of the init, dropout and the SR random stream")
    device: str = _opt("auto", "where to train", ("auto", "cpu", "cuda"))
    torch_compile: str = _opt("auto", "torch.compile the model: auto (on CUDA, not on the CPU), on, off",
                              ("auto", "on", "off"))
    log_interval: int = _opt(100, "iterations between log lines")
    eval_interval: int = _opt(1000, "iterations between validations (0: only at the end)")
    eval_iters: int = _opt(100, "iterations per validation")
    save: str | None = _opt(None, "checkpoint directory to write")
    load: str | None = _opt(None, "checkpoint directory to resume from")
    save_interval: int | None = _opt(None, "iterations between checkpoints")
    max_consecutive_skips: int = _opt(10, "stop (exit 2, no checkpoint) after this many iterations in a row "
                                          "skipped for NaN/Inf gradients (0: never)")
    overwrite_checkpoints: bool = _opt(False, "train although --save holds a later checkpoint than the one "
                                              "loaded (or none is loaded): its iterations get overwritten")
    exit_interval: int | None = _opt(None, "stop (with a checkpoint if --save) after this iteration")
    exit_duration_in_mins: float | None = _opt(None, "stop (with a checkpoint if --save) after this many minutes")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")


@dataclass
class DataConfig:
    data_path: list[str] | None = _opt(None, "dataset prefix(es), optionally weighted: [W1] P1 [W2 P2 ...]")
    split: str = _opt("969,30,1", "train,valid,test proportions")
    tokenizer_model: str | None = _opt(None, "sentencepiece model")
    mock_data: bool = _opt(False, "synthetic token data instead of --data-path (tests, benchmarks)")
    data_cache_path: str | None = _opt(None, "where to cache the dataset indices")
    num_workers: int = _opt(0, "data loader worker processes")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _opt(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = _opt(1, "pipeline-parallel size")
    use_distributed_optimizer: bool = _opt(False, "shard optimizer states over data-parallel ranks")
    sequence_parallel: bool = _opt(False, "with tp > 1: split activations along the sequence between tp regions")
    ddp_bucket_size: int | None = _opt(None, "elements per data-parallel gradient bucket (default 40M)")

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def data_parallel_size(self) -> int:
        return max(1, self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{s.name: _SECTIONS[s.name](**d.get(s.name, {})) for s in dataclasses.fields(cls)})


_SECTIONS = {"model": ModelConfig, "optimizer": OptimizerConfig, "training": TrainingConfig,
             "data": DataConfig, "parallel": ParallelConfig}


def _flag_fields() -> dict[str, tuple[str, dataclasses.Field, type]]:
    """field name -> (section, field, base type)."""
    out = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if args and typing.get_origin(tp) is not list else tp
            out[f.name] = (section, f, base)
    return out


FLAGS = _flag_fields()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: Megatron's --optimizer adam must not be taken for --optimizer-state-dtype
    parser = _Parser(description="Pretrain a GPT with BF16 stochastic-rounding AdamW.", allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file whose keys mirror the flags (the command line wins)")
    for name, (section, f, base) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{section}; default {f.default}]"
        if base is bool:
            parser.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, dest=name, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=base, choices=f.metadata["choices"], help=help_text)
    return parser


def _optional(name: str) -> bool:
    section, f, _ = FLAGS[name]
    return type(None) in typing.get_args(typing.get_type_hints(_SECTIONS[section])[f.name])


def _coerce(name: str, value, source: str):
    section, f, base = FLAGS[name]
    if value is None:
        if not _optional(name):
            raise ConfigError(f"{source}: {name.replace('_', '-')} needs a value (it has no 'unset' state)")
        return None
    if typing.get_origin(base) is list:
        return [str(v) for v in value] if isinstance(value, list) else str(value).split()
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name.replace('_', '-')} must be true or false, got {value!r}")
        return value
    try:
        if isinstance(value, bool) or (base is int and isinstance(value, float)):
            raise ValueError  # YAML's true is not 1, and 2.7 layers is not 2
        value = base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name.replace('_', '-')} expects {base.__name__}, got {value!r}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{source}: {name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
    return value


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FLAGS:
            raise ConfigError(f"{path}: unknown key '{key}'")
        out[name] = _coerce(name, value, path)
    return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags (and an optional YAML file) into a validated Config; ConfigError on any problem."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)  # the command line wins
    return config_from_values(values)


def config_from_values(values: dict) -> Config:
    sections: dict[str, dict] = {s: {} for s in _SECTIONS}
    for name, value in values.items():
        if name not in FLAGS:
            raise ConfigError(f"unknown setting '{name}'")
        sections[FLAGS[name][0]][name] = value
    cfg = Config(**{s: cls(**sections[s]) for s, cls in _SECTIONS.items()})
    finalize(cfg)
    return cfg


def _check_recompute(m: ModelConfig, layers_per_stage: int) -> None:
    """Megatron's rules: --recompute-activations means selective; full needs a method and a layer count."""
    if m.recompute_activations:
        m.recompute_granularity = "selective"
    if m.recompute_granularity is None:
        if m.recompute_method is not None or m.recompute_num_layers is not None:
            raise ConfigError("--recompute-method/--recompute-num-layers need --recompute-granularity full")
    elif m.recompute_granularity == "selective":
        if m.recompute_method is not None or m.recompute_num_layers is not None:
            raise ConfigError("--recompute-granularity selective takes no --recompute-method/--recompute-num-layers")
    else:
        if m.recompute_method is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
        if m.recompute_num_layers is None or not 1 <= m.recompute_num_layers <= layers_per_stage:
            raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers between 1 and the "
                              f"{layers_per_stage} layers per pipeline stage, got {m.recompute_num_layers}")


# (flag, lowest, highest, whether the lowest itself is allowed): a value out of range is an error, never clamped
_RANGES = [("lr", 0.0, None, True), ("min_lr", 0.0, None, True), ("weight_decay", 0.0, None, True),
           ("clip_grad", 0.0, None, True), ("adam_beta1", 0.0, 1.0, True), ("adam_beta2", 0.0, 1.0, True),
           ("adam_eps", 0.0, None, False), ("init_method_std", 0.0, None, False),
           ("layernorm_epsilon", 0.0, None, False), ("hidden_dropout", 0.0, 1.0, True),
           ("attention_dropout", 0.0, 1.0, True)]


def _check_values(cfg: Config) -> None:
    """Every number finite; the optimizer and model hyper-parameters within their meaningful range."""
    for name, (section, _, base) in FLAGS.items():
        value = getattr(getattr(cfg, section), name)
        if base is float and value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if base is int and isinstance(value, bool):
            raise ConfigError(f"--{name.replace('_', '-')} expects int, got {value!r}")
    for name, low, high, low_ok in _RANGES:
        value = getattr(getattr(cfg, FLAGS[name][0]), name)
        if value < low or (value == low and not low_ok) or (high is not None and value >= high):
            interval = f"{'[' if low_ok else '('}{low:g}, {'inf)' if high is None else f'{high:g})'}"
            raise ConfigError(f"--{name.replace('_', '-')} must be in {interval}, got {value}")


# What a checkpoint's tensors were built from: resuming with another value would load into another model.
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                      "make_vocab_size_divisible_by", "position_embedding_type", "max_position_embeddings",
                      "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear")


def resume_differences(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(model-shape fields that differ: an error, other settings that differ: for the log) between the config
    saved in a checkpoint (Config.to_dict()) and this run's."""
    now = cfg.to_dict()
    shape, other = [], []
    for section, values in now.items():
        for name, value in values.items():
            old = (saved.get(section) or {}).get(name, value)
            if old != value and not (section == "model" and name == "max_position_embeddings"
                                     and cfg.model.position_embedding_type == "rope"):
                line = f"--{name.replace('_', '-')} {old} -> {value}"
                (shape if section == "model" and name in MODEL_SHAPE_FIELDS else other).append(line)
    return shape, other


def finalize(cfg: Config) -> Config:
    """Fill derived defaults and check consistency (one-line ConfigError naming the flags)."""
    m, o, t, d, p = cfg.model, cfg.optimizer, cfg.training, cfg.data, cfg.parallel
    _check_values(cfg)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters"):
        section = FLAGS[name][0]
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by "
                          f"--num-attention-heads {m.num_attention_heads}")
    if m.position_embedding_type == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError("--position-embedding-type rope needs an even head size (hidden size / heads)")
    if m.ffn_hidden_size is None:
        # Megatron's SwiGLU size: 2/3 of 4h, rounded down to a multiple of 64 (10880 at hidden 4096)
        m.ffn_hidden_size = 4 * m.hidden_size if not m.swiglu else int((4 * m.hidden_size * 2 / 3) / 64) * 64
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.position_embedding_type == "learned_absolute" and m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {m.seq_length} is longer than "
                          f"--max-position-embeddings {m.max_position_embeddings}")
    if m.loss_chunk_tokens < 0:
        raise ConfigError("--loss-chunk-tokens must be >= 0 (0: the whole micro-batch in one chunk)")
    if not (0.0 <= m.hidden_dropout < 1.0 and 0.0 <= m.attention_dropout < 1.0):
        raise ConfigError("--hidden-dropout and --attention-dropout must be in [0, 1)")
    if m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    if m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError(f"--num-layers {m.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}")
    _check_recompute(m, m.num_layers // p.pipeline_model_parallel_size)
    if p.sequence_parallel and m.seq_length % p.tensor_model_parallel_size:
        raise ConfigError(f"--sequence-parallel: --seq-length {m.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size <= 0:
        raise ConfigError("--ddp-bucket-size must be positive")
    if p.world_size % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size):
        raise ConfigError(f"world size {p.world_size} is not divisible by tensor x pipeline parallel size")
    dp = p.data_parallel_size
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                          f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is larger than --lr {o.lr}")
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > o.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} must be in [0, --lr-decay-iters {o.lr_decay_iters}]")
    settable = precision_mode(o.precision).dtypes_settable
    if not settable and (o.grad_dtype != "bf16" or o.optimizer_state_dtype != "fp32"):
        raise ConfigError(f"--grad-dtype/--optimizer-state-dtype apply to bf16-sr and bf16 only "
                          f"(--precision {o.precision} keeps FP32 grads and states)")
    if not d.mock_data and not d.data_path:
        raise ConfigError("--data-path is required (or --mock-data for synthetic tokens)")
    if d.data_path and not d.tokenizer_model and m.vocab_size is None:
        raise ConfigError("--tokenizer-model (or --vocab-size) is required with --data-path")
    if d.mock_data and m.vocab_size is None:
        m.vocab_size = 1024
    if t.save_interval is not None and t.save_interval <= 0:
        raise ConfigError("--save-interval must be positive")
    if t.max_consecutive_skips < 0:
        raise ConfigError("--max-consecutive-skips must be >= 0 (0: never stop)")
    if t.log_interval <= 0:
        raise ConfigError("--log-interval must be positive")
    return cfg
