"""Typed configuration: one dataclass per component, Megatron-LM's flag names, YAML files that mirror them.

Every dataclass field is a flag: `num_layers` is `--num-layers`; the YAML key is either spelling
(`num-layers:` or `num_layers:`). Precedence: dataclass default < `--config FILE.yaml` < command line.
A bool field is off by default and switched on by its flag; one whose default is True is spelled, as in
Megatron, `--no-<flag>` and switches it off (`log_loss_scale_to_tensorboard` is
`--no-log-loss-scale-to-tensorboard`; its YAML key keeps the field's name: `log-loss-scale-to-tensorboard: false`).
A field may have aliases (`_opt(..., aliases=...)`): `--layernorm-epsilon` is `--norm-epsilon`, on the command
line and as a YAML key; both spellings with different values in one source are a ConfigError.
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

from .megatron_flags import TRANSLATED, classify, megatron_flags
from .precision import PRECISIONS, precision_mode


class ConfigError(ValueError):
    """A one-line configuration error naming the flag or file at fault."""


def _opt(default, help: str, choices=None, aliases: tuple[str, ...] = ()):  # noqa: A002  (argparse's own word)
    """A flag field; `aliases`: other field-style names of the same setting (flags and YAML keys alike)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


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
    position_embedding_type: str = _opt("learned_absolute", "position embedding (none: no position information "
                                        "but the causal mask)", ("learned_absolute", "rope", "none"))
    rotary_base: int = _opt(10000, "RoPE base")
    swiglu: bool = _opt(False, "SwiGLU MLP instead of GELU")
    untie_embeddings_and_output_weights: bool = _opt(False, "separate output layer instead of the tied embedding")
    disable_bias_linear: bool = _opt(False, "no biases in linear layers")
    init_method_std: float = _opt(0.02, "std of the normal initialisation")
    hidden_dropout: float = _opt(0.1, "dropout on the residual branches and embeddings")
    attention_dropout: float = _opt(0.1, "dropout on the attention probabilities")
    normalization: str = _opt("LayerNorm", "the norm of the layers and the final norm (RMSNorm: weight only, "
                                           "no bias, computed in FP32)", ("LayerNorm", "RMSNorm"))
    norm_epsilon: float = _opt(1e-5, "epsilon of LayerNorm and RMSNorm", aliases=("layernorm_epsilon",))
    group_query_attention: bool = _opt(False, "grouped-query attention: --num-query-groups k/v heads, each shared "
                                              "by num-attention-heads / num-query-groups query heads")
    num_query_groups: int | None = _opt(None, "k/v heads with --group-query-attention (default 1, Megatron's; "
                                              "refused without --group-query-attention)")
    kv_channels: int | None = _opt(None, "head dimension (default hidden size / heads); q and output projections "
                                         "have heads x kv-channels features")
    apply_residual_connection_post_layernorm: bool = _opt(
        False, "take each residual from the norm's output instead of its input (the original BERT ordering)")
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

    # Derived shapes, valid also for a config built without finalize (Config.from_dict of a saved one)
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """k/v heads: --num-query-groups (Megatron's default 1) under --group-query-attention, else one per head."""
        return (self.num_query_groups or 1) if self.group_query_attention else self.num_attention_heads


@dataclass
class OptimizerConfig:
    lr: float = _opt(1e-4, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of decay")
    # the LR schedule (Megatron's OptimizerParamScheduler; training/lr_schedule.py, docs/training.md)
    lr_decay_style: str = _opt("linear", "decay after warm-up (Megatron's default: linear)",
                               ("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_warmup_iters: int = _opt(0, "linear warm-up iterations (with --train-iters)")
    lr_warmup_samples: int = _opt(0, "linear warm-up samples (with --train-samples)")
    lr_warmup_fraction: float | None = _opt(None, "warm-up as a fraction of the decay length (instead of "
                                                  "--lr-warmup-iters/--lr-warmup-samples)")
    lr_warmup_init: float = _opt(0.0, "learning rate at the start of warm-up")
    lr_decay_iters: int | None = _opt(None, "iterations of decay, warm-up included (default: --train-iters)")
    lr_decay_samples: int | None = _opt(None, "samples of decay, warm-up included (default: --train-samples)")
    lr_wsd_decay_style: str = _opt("exponential", "shape of WSD's final annealing phase",
                                   ("exponential", "linear", "cosine", "minus_sqrt"))
    lr_wsd_decay_iters: int | None = _opt(None, "iterations of WSD's annealing phase, at the end of the decay "
                                                "(with --train-iters)")
    lr_wsd_decay_samples: int | None = _opt(None, "samples of WSD's annealing phase, at the end of the decay "
                                                  "(with --train-samples)")
    weight_decay: float = _opt(0.01, "decoupled weight decay (matrices only)")
    clip_grad: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.999, "Adam beta2")
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    precision: str = _opt("bf16-sr", "precision mode (megatron_sr/precision.py); without it --bf16 means bf16-mp, "
                                     "and megatron-sr's default is bf16-sr", PRECISIONS)
    bf16: bool = _opt(False, "Megatron's BF16 mixed precision: --precision bf16-mp unless --precision is given")
    optimizer: str = _opt("adam", "adam: AdamW (decoupled weight decay, as Megatron's adam), with the rounding of "
                                  "--precision; nothing else is built")
    accumulate_allreduce_grads_in_fp32: bool = _opt(
        False, "FP32 gradient accumulation and reduction: --grad-dtype fp32 in bf16-sr and bf16 (bf16-mp and fp32 "
        "always have FP32 gradients)")
    optimizer_state_dtype: str = _opt("fp32", "dtype of Adam's m and v", ("fp32", "bf16"))
    grad_dtype: str = _opt("bf16", "gradient dtype in bf16-sr/bf16 (fp32 keeps an FP32 accumulator)", ("bf16", "fp32"))


@dataclass
class TrainingConfig:
    micro_batch_size: int = _opt(1, "samples per micro-batch")
    global_batch_size: int | None = _opt(None, "samples per iteration (default: micro batch x dp)")
    train_iters: int | None = _opt(None, "iterations to train (exclusive with --train-samples; 1000 when "
                                         "neither is given)")
    train_samples: int | None = _opt(None, "samples to train, instead of --train-iters (sample-based schedules)")
    rampup_batch_size: list[int] | None = _opt(
        None, "START INCR SAMPLES: the global batch starts at START and grows by INCR in equal steps over SAMPLES "
        "consumed samples up to --global-batch-size (needs --train-samples)")
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
    no_load_optim: bool = _opt(False, "with --load: do not restore the optimizer (fresh Adam moments and step "
                                      "count, so bias correction and the SR stream restart)")
    no_load_rng: bool = _opt(False, "with --load: do not restore the random generators (dropout, data order is "
                                    "unaffected: it follows the consumed samples)")
    finetune: bool = _opt(False, "with --load: the weights only; iteration, consumed samples, optimizer and "
                                 "random generators start afresh")
    use_checkpoint_args: bool = _opt(False, "take the model's shape from the config saved in --load, overriding "
                                            "the command line (as Megatron)")
    ckpt_format: str = _opt("torch", "checkpoint format: torch, Megatron's iter_*/mp_rank_* layout (one file "
                                     "per rank in one process, a shard per rank and metadata under torchrun)",
                            ("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"))
    exit_on_missing_checkpoint: bool = _opt(False, "with --load: stop (exit 2) when it holds no checkpoint instead "
                                                   "of training from scratch")
    exit_signal_handler: bool = _opt(False, "on SIGTERM, finish the iteration, save to --save and exit (off: "
                                            "SIGTERM ends the process at once, as Megatron's default)")
    exit_interval: int | None = _opt(None, "stop (with a checkpoint if --save) after this iteration")
    exit_duration_in_mins: float | None = _opt(None, "stop (with a checkpoint if --save) after this many minutes")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    # logging (Megatron's logging group; docs/training.md, "The log line and TensorBoard")
    tensorboard_log_interval: int = _opt(1, "iterations between TensorBoard/wandb scalars")
    tensorboard_queue_size: int = _opt(1000, "TensorBoard events queued before a write to disk")
    log_params_norm: bool = _opt(False, "L2 norm of all parameters in the log line and as params-norm (one more "
                                        "pass over the parameters, at logged iterations only)")
    log_num_zeros_in_grad: bool = _opt(False, "number of zero gradient elements (before clipping) in the log line "
                                              "and as num-zeros, at logged iterations only")
    log_throughput: bool = _opt(False, "Megatron's 'throughput per GPU (TFLOP/s/GPU)' field in the log line (and "
                                       "the throughput scalar with --log-timers-to-tensorboard)")
    timing_log_level: int = _opt(0, "timers: 0 the iteration time only (no host synchronisation); 1 also "
                                    "forward-backward, optimizer, all-grads-sync, params-all-gather; 2 also "
                                    "batch-generator. 1 and 2 synchronise the device at each timer (slower)")
    timing_log_option: str = _opt("minmax", "timer values over ranks: max, minmax or all (each rank)",
                                  ("max", "minmax", "all"))
    barrier_with_level_1_timing: bool = _opt(True, "level-1 timers start without a barrier over all ranks (on: "
                                                   "each first waits for every rank)")
    log_timers_to_tensorboard: bool = _opt(False, "write iteration-time and the timers (<name>-time, seconds, max "
                                                  "over ranks) as scalars")
    log_loss_scale_to_tensorboard: bool = _opt(True, "no loss-scale scalar (on: it is written, always 1, since "
                                                     "BF16 needs no loss scaling)")
    log_validation_ppl_to_tensorboard: bool = _opt(False, "write the validation perplexity scalar")
    log_memory_to_tensorboard: bool = _opt(False, "write memory scalars (CUDA: Megatron's mem-*; CPU: max RSS)")
    log_world_size_to_tensorboard: bool = _opt(False, "write the world-size scalar")
    wandb_project: str | None = _opt(None, "also log the scalars to this Weights & Biases project (needs "
                                           "pip install wandb; WANDB_MODE=offline works without network)")
    wandb_exp_name: str | None = _opt(None, "the wandb run name (required with --wandb-project)")
    wandb_save_dir: str | None = _opt(None, "where wandb writes its files (default: --save/wandb)")
    wandb_entity: str | None = _opt(None, "the wandb entity (team or user)")


@dataclass
class DataConfig:
    data_path: list[str] | None = _opt(None, "dataset prefix(es), optionally weighted: [W1] P1 [W2 P2 ...]")
    split: str = _opt("969,30,1", "train,valid,test proportions")
    tokenizer_type: str | None = _opt(None, "Megatron's tokenizer type: GPT2BPETokenizer, HuggingFaceTokenizer, "
                                            "SentencePieceTokenizer, GPTSentencePieceTokenizer (both: the round-trip "
                                            "sentencepiece of tools/train_tokenizer.py), NullTokenizer; default: "
                                            "SentencePieceTokenizer when --tokenizer-model is given (this project's "
                                            "meaning; Megatron has no default)")
    tokenizer_model: str | None = _opt(None, "sentencepiece .model, or with HuggingFaceTokenizer a tokenizer.json "
                                             "or its directory")
    vocab_file: str | None = _opt(None, "GPT2BPETokenizer: GPT-2's vocab.json")
    merge_file: str | None = _opt(None, "GPT2BPETokenizer: GPT-2's merges.txt")
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
    overlap_grad_reduce: bool = _opt(False, "start each gradient bucket's reduce-scatter/all-reduce during backward, "
                                            "as soon as its gradients are ready (Megatron's default: off, all "
                                            "buckets after backward)")
    overlap_param_gather: bool = _opt(False, "with --use-distributed-optimizer: the parameter all-gather after the "
                                             "step runs asynchronously, each bucket waited for just before the next "
                                             "forward first uses it")
    ddp_average_in_collective: bool = _opt(False, "average gradients in the collective (ReduceOp.AVG on NCCL; sum "
                                                  "then divide on gloo) instead of pre-scaling by 1/dp")
    distributed_timeout_minutes: float = _opt(10.0, "timeout of the process group's collectives")
    distributed_backend: str | None = _opt(None, "torch.distributed backend under torchrun (default: nccl on CUDA, "
                                                 "gloo on the CPU; one process creates no process group)",
                                           ("nccl", "gloo"))

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
    # what parsing has to say once at start-up: Megatron flags accepted and what runs instead (not a setting)
    notes: list[str] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        # a saved config may use an alias (layernorm_epsilon, before norm_epsilon existed)
        return cls(**{name: section(**resolve_aliases(d.get(name, {}), "saved config"))
                      for name, section in _SECTIONS.items()})


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
        if message.startswith("unrecognized arguments"):
            message += " (neither a megatron-sr flag nor one of Megatron-LM's GPT pretraining: see --help)"
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: Megatron's --optimizer adam must not be taken for --optimizer-state-dtype
    parser = _Parser(description="Pretrain a GPT with BF16 stochastic-rounding AdamW.", allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file whose keys mirror the flags (the command line wins)")
    for name, (section, f, base) in FLAGS.items():
        help_text = f"{f.metadata['help']} [{section}; default {f.default}]"
        # an alias is its own dest, so resolve_aliases can tell two disagreeing spellings apart
        for dest in (name, *f.metadata.get("aliases", ())):
            flag = "--" + dest.replace("_", "-")
            if dest != name:
                help_text = f"alias of --{name.replace('_', '-')}"
            if base is bool and f.default is True:  # Megatron's spelling of a switch that is on by default
                parser.add_argument("--no-" + flag[2:], dest=dest, action="store_false",
                                    help=help_text.replace("; default True]", "; on unless given]"))
            elif base is bool:
                parser.add_argument(flag, dest=dest, action="store_true", help=help_text)
            elif typing.get_origin(base) is list:
                parser.add_argument(flag, dest=dest, nargs="+", help=help_text)
            else:
                parser.add_argument(flag, dest=dest, type=base, choices=f.metadata["choices"], help=help_text)
    # Megatron's other flags are parsed too, so each one is accepted, translated or refused by name
    # (megatron_flags.py), never "unrecognized"; they stay out of --help
    own = set(parser._option_string_actions)
    for flag in megatron_flags().values():
        if flag.name in own:
            continue
        dest = MEGATRON_DEST + flag.name
        if flag.kind == "switch":
            parser.add_argument(flag.name, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag.name, dest=dest, nargs="*" if flag.kind == "list" else None,
                                help=argparse.SUPPRESS)
    return parser


MEGATRON_DEST = "megatron:"  # argparse dest prefix of the flags megatron_flags.py classifies


def megatron_extras(values: dict, source: str) -> tuple[dict, list[str]]:
    """`values` without the Megatron-only flags, translated ones set on their field, and the log notes of the
    accepted ones; ConfigError (one line naming the flag) for a refused one."""
    out, notes = {}, []
    for key, value in values.items():
        if not key.startswith(MEGATRON_DEST):
            out[key] = value
            continue
        name = key[len(MEGATRON_DEST):]
        if name in TRANSLATED:
            target, setting, why = TRANSLATED[name]
            out[target] = setting
            notes.append(f"{name}: {why}")
            continue
        verdict, line = classify(name, value if isinstance(value, (bool, list)) else [value])
        if verdict == "refused":
            raise ConfigError(line if source == "command line" else f"{source}: {line}")
        notes.append(line)
    return out, notes


# alias -> the field it names (ModelConfig.norm_epsilon is also Megatron's older --layernorm-epsilon)
ALIASES = {alias: name for name, (_, f, _) in FLAGS.items() for alias in f.metadata.get("aliases", ())}


def resolve_aliases(values: dict, source: str) -> dict:
    """`values` with every alias key renamed to its field; ConfigError when both spellings are given with
    different values in one source (across sources the usual precedence applies)."""
    out = dict(values)
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if name in out and out[name] != value:
            raise ConfigError(f"{source}: --{alias.replace('_', '-')} {value} and --{name.replace('_', '-')} "
                              f"{out[name]} disagree (two spellings of one setting)")
        out[name] = value
    return out


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
        megatron = "--" + str(key).replace("_", "-")
        if name not in FLAGS and name not in ALIASES and megatron in megatron_flags():
            if value is not False and value is not None:  # a Megatron switch set false is not given
                out[MEGATRON_DEST + megatron] = value if isinstance(value, (bool, list)) else str(value)
            continue
        if name not in FLAGS and name not in ALIASES:
            raise ConfigError(f"{path}: unknown key '{key}'")
        out[name] = _coerce(ALIASES.get(name, name), value, path)
    return resolve_aliases(out, path)


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags (and an optional YAML file) into a validated Config; ConfigError on any problem."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    args, notes = megatron_extras(resolve_aliases(args, "command line"), "command line")
    path = args.pop("config", None)
    values, yaml_notes = megatron_extras(load_yaml(path), path) if path else ({}, [])
    values.update(args)  # the command line wins
    return config_from_values(values, yaml_notes + notes)


def _resolve_bf16(values: dict, notes: list[str]) -> None:
    """Megatron's --bf16 is BF16 mixed precision (bf16-mp); --precision, when given, wins."""
    if not values.get("bf16"):
        return
    if "precision" not in values:
        values["precision"] = "bf16-mp"
        notes.append("--bf16: Megatron's BF16 mixed precision (--precision bf16-mp: BF16 weights, FP32 master "
                     "weights, grads and states); add --precision bf16-sr for BF16-only weights with stochastic "
                     "rounding")
    else:
        notes.append(f"--bf16 with --precision {values['precision']}: --precision wins")


def config_from_values(values: dict, notes: list[str] = ()) -> Config:
    sections: dict[str, dict] = {s: {} for s in _SECTIONS}
    values, notes = resolve_aliases(values, "settings"), list(notes)
    _resolve_bf16(values, notes)
    for name, value in values.items():
        if name not in FLAGS:
            raise ConfigError(f"unknown setting '{name}'")
        sections[FLAGS[name][0]][name] = value
    cfg = Config(**{s: cls(**sections[s]) for s, cls in _SECTIONS.items()}, notes=notes)
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


def _check_model_options(cfg: Config) -> None:
    """Head size and query groups (Megatron's rules), filling their defaults: --kv-channels hidden / heads,
    --num-query-groups 1 under --group-query-attention. Megatron ignores --num-query-groups without
    --group-query-attention; here that is refused, so a flag never goes silently unused."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    if m.kv_channels is None:
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                              f"{m.num_attention_heads} (or give the head size with --kv-channels)")
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.kv_channels <= 0:
        raise ConfigError(f"--kv-channels must be positive, got {m.kv_channels}")
    if m.position_embedding_type == "rope" and m.kv_channels % 2:
        raise ConfigError(f"--position-embedding-type rope needs an even head size (--kv-channels), "
                          f"got {m.kv_channels}")
    if not m.group_query_attention:
        if m.num_query_groups is not None:
            raise ConfigError("--num-query-groups needs --group-query-attention (Megatron would ignore it)")
        return
    if m.num_query_groups is None:
        m.num_query_groups = 1  # Megatron's default
    if m.num_query_groups <= 0:
        raise ConfigError(f"--num-query-groups must be positive, got {m.num_query_groups}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--num-query-groups {m.num_query_groups}")
    if m.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {m.num_query_groups} is not divisible by "
                          f"--tensor-model-parallel-size {tp} (each tp rank holds whole k/v groups)")


# (flag, lowest, highest, whether the lowest itself is allowed): a value out of range is an error, never clamped
_RANGES = [("lr", 0.0, None, True), ("min_lr", 0.0, None, True), ("weight_decay", 0.0, None, True),
           ("clip_grad", 0.0, None, True), ("adam_beta1", 0.0, 1.0, True), ("adam_beta2", 0.0, 1.0, True),
           ("adam_eps", 0.0, None, False), ("init_method_std", 0.0, None, False),
           ("norm_epsilon", 0.0, None, False), ("hidden_dropout", 0.0, 1.0, True),
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
                      "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear",
                      "normalization", "group_query_attention", "num_query_groups", "kv_channels")


def apply_checkpoint_args(cfg: Config, saved: dict) -> list[str]:
    """--use-checkpoint-args: the model's shape from the config saved in a checkpoint replaces this run's
    (Megatron's load_args_from_checkpoint); returns the settings that changed, as log lines."""
    changed = []
    # the vocabulary is the tokenizer's (the tokenizer flags are not taken from the checkpoint)
    for name in (*(f for f in MODEL_SHAPE_FIELDS if f != "vocab_size"), "seq_length", "rotary_base", "norm_epsilon"):
        old, new = getattr(cfg.model, name), (saved.get("model") or {}).get(name, getattr(cfg.model, name))
        if old != new:
            setattr(cfg.model, name, new)
            changed.append(f"--{name.replace('_', '-')} {old} -> {new}")
    if changed:
        finalize(cfg)
    return changed


def resume_differences(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(model-shape fields that differ: an error, other settings that differ: for the log) between the config
    saved in a checkpoint (Config.to_dict()) and this run's."""
    now = cfg.to_dict()
    shape, other = [], []
    for section, values in now.items():
        for name, value in values.items():
            old = (saved.get(section) or {}).get(name, value)
            if old != value and not (section == "model" and name == "max_position_embeddings"
                                     and cfg.model.position_embedding_type in ("rope", "none")):
                line = f"--{name.replace('_', '-')} {old} -> {value}"
                (shape if section == "model" and name in MODEL_SHAPE_FIELDS else other).append(line)
    return shape, other


_SCALAR_SWITCHES = (("log_timers_to_tensorboard", "--log-timers-to-tensorboard"),
                    ("log_validation_ppl_to_tensorboard", "--log-validation-ppl-to-tensorboard"),
                    ("log_memory_to_tensorboard", "--log-memory-to-tensorboard"),
                    ("log_world_size_to_tensorboard", "--log-world-size-to-tensorboard"))


def _check_logging(cfg: Config) -> None:
    """Intervals positive; a scalar switch needs somewhere to write; timer options need timers; wandb needs its
    run name, a directory and the package (checked here, on every rank, before any training)."""
    t = cfg.training
    for name in ("tensorboard_log_interval", "tensorboard_queue_size"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if t.timing_log_level not in (0, 1, 2):
        raise ConfigError(f"--timing-log-level must be 0, 1 or 2, got {t.timing_log_level}")
    # Megatron accepts these where they have nothing to act on; a script must run unchanged, so the log says it
    if t.timing_log_level == 0 and (t.timing_log_option != "minmax" or not t.barrier_with_level_1_timing):
        cfg.notes.append("--timing-log-option/--no-barrier-with-level-1-timing: --timing-log-level 0 has no timers, "
                         "nothing to change")
    if not (t.tensorboard_dir or t.wandb_project):
        given = [flag for name, flag in _SCALAR_SWITCHES if getattr(t, name)]
        given += [] if t.log_loss_scale_to_tensorboard else ["--no-log-loss-scale-to-tensorboard"]
        given += ["--tensorboard-log-interval"] if t.tensorboard_log_interval != 1 else []
        if given:
            cfg.notes.append(f"{', '.join(given)}: no --tensorboard-dir or --wandb-project, so no scalars are "
                             "written (as in Megatron)")
    if not t.wandb_project:
        for name in ("wandb_exp_name", "wandb_save_dir", "wandb_entity"):
            if getattr(t, name):
                cfg.notes.append(f"--{name.replace('_', '-')}: no --wandb-project, so no wandb run (as in Megatron)")
        return
    if not t.wandb_exp_name:
        raise ConfigError("--wandb-project needs --wandb-exp-name (the run's name, as in Megatron)")
    if not (t.wandb_save_dir or t.save):
        raise ConfigError("--wandb-project needs --wandb-save-dir or --save (wandb writes to --save/wandb)")
    try:
        import wandb  # noqa: F401  (optional: only this flag needs it)
    except ImportError:
        raise ConfigError("--wandb-project needs the wandb package: pip install wandb") from None


def _check_precision(cfg: Config) -> None:
    o = cfg.optimizer
    if o.optimizer != "adam":
        raise ConfigError(f"--optimizer {o.optimizer}: not supported; megatron-sr's optimizer is adam (AdamW with "
                          "stochastic rounding in bf16-sr)")
    if o.accumulate_allreduce_grads_in_fp32 and precision_mode(o.precision).dtypes_settable:
        o.grad_dtype = "fp32"


def _check_parallel(cfg: Config) -> None:
    """Megatron's rules for the overlap switches; a backend that cannot run on the chosen device."""
    p = cfg.parallel
    if p.distributed_timeout_minutes <= 0:
        raise ConfigError("--distributed-timeout-minutes must be positive")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                          "(as in Megatron)")
    if p.distributed_backend == "nccl" and cfg.training.device == "cpu" and p.world_size > 1:
        raise ConfigError("--distributed-backend nccl needs CUDA devices; with --device cpu use gloo")


def _check_checkpoint(cfg: Config) -> None:
    t = cfg.training
    if t.ckpt_format != "torch":
        raise ConfigError(f"--ckpt-format {t.ckpt_format}: not supported; megatron-sr reads and writes "
                          "--ckpt-format torch (Megatron's iter_*/mp_rank_* layout; any tp/pp/dp reshards on load)")
    loading = [f"--{n.replace('_', '-')}" for n in ("no_load_optim", "no_load_rng", "finetune", "use_checkpoint_args",
                                                   "exit_on_missing_checkpoint") if getattr(t, n)]
    if loading and not t.load:
        raise ConfigError(f"{loading[0]} needs --load")


# Megatron's --tokenizer-type values that megatron_sr.data.tokenizers builds, and the flags each reads; a copy of
# its table (this floor cannot import data/), kept equal to it by tests/test_tokenizers.py
TOKENIZER_TYPE_FLAGS = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "HuggingFaceTokenizer": ("tokenizer_model",),
                        "SentencePieceTokenizer": ("tokenizer_model",),
                        "GPTSentencePieceTokenizer": ("tokenizer_model",), "NullTokenizer": ("vocab_size",)}


def _check_tokenizer(cfg: Config) -> None:
    """The tokenizer flags name one tokenizer with its files (refusing flags its type does not read); a
    --data-path run needs a tokenizer or --vocab-size. The files themselves are read by training/setup.py."""
    d, vocab_size = cfg.data, cfg.model.vocab_size
    given = {"tokenizer_model": d.tokenizer_model, "vocab_file": d.vocab_file, "merge_file": d.merge_file,
             "vocab_size": vocab_size}
    kind = d.tokenizer_type
    if kind is None and (d.vocab_file is not None or d.merge_file is not None):
        raise ConfigError("--vocab-file/--merge-file need --tokenizer-type GPT2BPETokenizer")
    if kind == "TikTokenizer":
        raise ConfigError("--tokenizer-type TikTokenizer: needs the tiktoken package, which is not installed")
    if kind is not None and kind not in TOKENIZER_TYPE_FLAGS:
        raise ConfigError(f"--tokenizer-type: unknown type {kind!r} "
                          f"(expected one of {', '.join(TOKENIZER_TYPE_FLAGS)})")
    if kind is not None:
        missing = [f"--{n.replace('_', '-')}" for n in TOKENIZER_TYPE_FLAGS[kind] if given[n] is None]
        if missing:
            raise ConfigError(f"--tokenizer-type {kind} needs {' and '.join(missing)}")
        stray = [f"--{n.replace('_', '-')}" for n in ("tokenizer_model", "vocab_file", "merge_file")
                 if given[n] is not None and n not in TOKENIZER_TYPE_FLAGS[kind]]
        if stray:
            raise ConfigError(f"{'/'.join(stray)} not used by --tokenizer-type {kind}")
    if d.data_path and kind is None and not d.tokenizer_model and vocab_size is None:
        raise ConfigError("--tokenizer-model (or --tokenizer-type with its files, or --vocab-size) is required "
                          "with --data-path")


# Training length, LR schedule and batch-size ramp-up: Megatron's validate_args, get_optimizer_param_scheduler,
# update_train_iters and RampupBatchsizeNumMicroBatchesCalculator (training/lr_schedule.py runs the schedules).

DEFAULT_TRAIN_ITERS = 1000  # this project's length when neither --train-iters nor --train-samples is given


def global_batch_size_at(t: TrainingConfig, consumed_samples: int) -> int:
    """The global batch of the iteration that starts after `consumed_samples`: with --rampup-batch-size START INCR
    SAMPLES, START + INCR x int(consumed / (SAMPLES / increments)) while consumed <= SAMPLES (Megatron's float
    arithmetic, for the same batches), then --global-batch-size."""
    if t.rampup_batch_size is None or consumed_samples > t.rampup_batch_size[2]:
        return t.global_batch_size
    start, increment, samples = t.rampup_batch_size
    samples_per_increment = samples / ((t.global_batch_size - start) // increment)
    return start + int(consumed_samples / samples_per_increment) * increment


def rampup_batches(t: TrainingConfig) -> list[int]:
    """The global batch of each iteration that starts inside the ramp-up (consumed samples <= SAMPLES), in
    order; empty without --rampup-batch-size."""
    batches, consumed = [], 0
    while t.rampup_batch_size is not None and consumed <= t.rampup_batch_size[2]:
        batches.append(global_batch_size_at(t, consumed))
        consumed += batches[-1]
    return batches


def _iterations_for_samples(t: TrainingConfig) -> int:
    """Megatron's update_train_iters: the ramp-up iterations that start within --train-samples, then the whole
    global batches the rest holds (a partial last batch is dropped)."""
    iterations = consumed = 0
    for batch in rampup_batches(t):
        if consumed > t.train_samples:
            break
        consumed, iterations = consumed + batch, iterations + 1
    return iterations + max(0, t.train_samples - consumed) // t.global_batch_size


def schedule_samples(cfg: Config) -> tuple[float, int, int | None]:
    """(warm-up, decay, WSD annealing) lengths in samples, as Megatron's scheduler counts its steps: the -iters
    flags times --global-batch-size, the -samples flags as they are, --lr-warmup-fraction x the decay length."""
    o, t = cfg.optimizer, cfg.training
    if t.train_samples is None:
        gbs = t.global_batch_size
        decay, warmup = o.lr_decay_iters * gbs, o.lr_warmup_iters * gbs
        wsd = None if o.lr_wsd_decay_iters is None else o.lr_wsd_decay_iters * gbs
    else:
        decay, warmup, wsd = o.lr_decay_samples, o.lr_warmup_samples, o.lr_wsd_decay_samples
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    return warmup, decay, wsd


def _first_given(flags: list[tuple[str, bool]]) -> str | None:
    return next((flag for flag, given in flags if given), None)


def _check_rampup(cfg: Config) -> None:
    """--rampup-batch-size START INCR SAMPLES (ints from here on): Megatron's calculator asserts as one-line
    errors, and its per-iteration divisibility check for every batch reached before --train-samples runs out."""
    t, dp = cfg.training, cfg.parallel.data_parallel_size
    if t.rampup_batch_size is None:
        return
    given = " ".join(str(v) for v in t.rampup_batch_size)
    try:
        start, increment, samples = (int(v) for v in t.rampup_batch_size)  # strings from the command line / YAML
    except (TypeError, ValueError):
        raise ConfigError(f"--rampup-batch-size expects three integers START INCR SAMPLES, got {given}") from None
    t.rampup_batch_size = [start, increment, samples]
    if t.train_samples is None:
        raise ConfigError("--rampup-batch-size needs --train-samples (Megatron ramps up sample-based training only)")
    if min(start, increment, samples) <= 0:
        raise ConfigError(f"--rampup-batch-size {given}: START, INCR and SAMPLES must be positive")
    if start >= t.global_batch_size or (t.global_batch_size - start) % increment:
        raise ConfigError(f"--rampup-batch-size {given}: --global-batch-size {t.global_batch_size} must be START "
                          "plus a positive multiple of INCR")
    group, consumed = t.micro_batch_size * dp, 0
    for batch in rampup_batches(t):
        if consumed > t.train_samples:
            break
        if batch % group:
            raise ConfigError(f"--rampup-batch-size {given}: the global batch {batch} (after {consumed} samples) is "
                              f"not divisible by --micro-batch-size {t.micro_batch_size} x data-parallel size {dp}")
        consumed += batch


def _check_iteration_based(o: OptimizerConfig, t: TrainingConfig) -> None:
    """--train-iters: Megatron refuses the sample-based flags; the decay length defaults to --train-iters."""
    if t.train_iters is None:
        t.train_iters = DEFAULT_TRAIN_ITERS
    if t.train_iters <= 0:
        raise ConfigError("--train-iters must be positive")
    flag = _first_given([("--lr-decay-samples", o.lr_decay_samples is not None),
                         ("--lr-warmup-samples", o.lr_warmup_samples != 0),
                         ("--lr-wsd-decay-samples", o.lr_wsd_decay_samples is not None)])
    if flag:
        raise ConfigError(f"{flag} needs --train-samples (with --train-iters use {flag.replace('samples', 'iters')})")
    if o.lr_warmup_fraction is not None and o.lr_warmup_iters != 0:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are exclusive: give one warm-up length")
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters


def _check_sample_based(o: OptimizerConfig, t: TrainingConfig) -> None:
    """--train-samples: Megatron refuses the iteration-based flags; the decay length defaults to --train-samples
    and --train-iters becomes the iterations those samples make (update_train_iters)."""
    if t.train_samples <= 0:
        raise ConfigError("--train-samples must be positive")
    flag = _first_given([("--lr-decay-iters", o.lr_decay_iters is not None),
                         ("--lr-warmup-iters", o.lr_warmup_iters != 0),
                         ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters is not None)])
    if flag:
        raise ConfigError(f"{flag} needs --train-iters (with --train-samples use {flag.replace('iters', 'samples')})")
    if o.lr_warmup_fraction is not None and o.lr_warmup_samples != 0:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-samples are exclusive: give one warm-up length")
    if o.lr_decay_samples is None:
        o.lr_decay_samples = t.train_samples
    iterations = _iterations_for_samples(t)
    if iterations <= 0:
        raise ConfigError(f"--train-samples {t.train_samples} holds no whole global batch of {t.global_batch_size}")
    t.train_iters = t._train_iters_from_samples = iterations


def _check_lr_lengths(cfg: Config) -> None:
    """The values Megatron's OptimizerParamScheduler asserts: init <= lr, decay > 0, warm-up within the decay
    (Megatron asserts warm-up < decay; a warm-up as long as the decay, which this project always accepted, is
    kept: its LR is defined, the peak at the end); WSD's annealing length with WSD only."""
    o, unit = cfg.optimizer, "iters" if cfg.training.train_samples is None else "samples"
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is larger than --lr {o.lr}")
    if not 0.0 <= o.lr_warmup_init <= o.lr:
        raise ConfigError(f"--lr-warmup-init {o.lr_warmup_init} must be in [0, --lr {o.lr}]")
    if o.lr_warmup_fraction is not None and not 0.0 <= o.lr_warmup_fraction < 1.0:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {o.lr_warmup_fraction}")
    decay_flag, warmup_name = f"--lr-decay-{unit}", f"lr_warmup_{unit}"
    decay_value = getattr(o, f"lr_decay_{unit}")
    if getattr(o, warmup_name) < 0:
        raise ConfigError(f"--lr-warmup-{unit} must be >= 0, got {getattr(o, warmup_name)}")
    warmup, decay, wsd = schedule_samples(cfg)
    if decay <= 0:
        raise ConfigError(f"{decay_flag} must be positive, got {decay_value}")
    if warmup > decay:
        given = (f"--lr-warmup-fraction {o.lr_warmup_fraction}" if o.lr_warmup_fraction is not None
                 else f"--lr-warmup-{unit} {getattr(o, warmup_name)}")
        raise ConfigError(f"the warm-up ({given}) must not be longer than the decay ({decay_flag} {decay_value})")
    wsd_flag = f"--lr-wsd-decay-{unit}"
    if o.lr_decay_style == "WSD" and wsd is None:
        raise ConfigError(f"--lr-decay-style WSD needs {wsd_flag} (the length of its annealing phase)")
    if o.lr_decay_style != "WSD" and (wsd is not None or o.lr_wsd_decay_style != "exponential"):
        flag = wsd_flag if wsd is not None else "--lr-wsd-decay-style"
        raise ConfigError(f"{flag} applies to --lr-decay-style WSD only")
    if wsd is not None and not 0 <= wsd <= decay:
        wsd_value = getattr(o, f"lr_wsd_decay_{unit}")
        raise ConfigError(f"{wsd_flag} must be in [0, {decay_flag} {decay_value}], got {wsd_value}")


def _check_schedule(cfg: Config) -> None:
    """Train by iterations or by samples (exactly one, as Megatron; 1000 iterations when neither is given),
    with that kind's LR flags only; the schedule's lengths; the batch-size ramp-up. Fills --train-iters from
    --train-samples and the decay length's default. Idempotent: a finalized config may be finalized again."""
    o, t = cfg.optimizer, cfg.training
    derived = getattr(t, "_train_iters_from_samples", None)
    if t.train_samples is not None and t.train_iters is not None and t.train_iters != derived:
        raise ConfigError("--train-iters and --train-samples are exclusive: train by iterations or by samples")
    _check_rampup(cfg)
    if t.train_samples is None:
        _check_iteration_based(o, t)
    else:
        _check_sample_based(o, t)
    _check_lr_lengths(cfg)


def finalize(cfg: Config) -> Config:
    """Fill derived defaults and check consistency (one-line ConfigError naming the flags)."""
    m, o, t, d, p = cfg.model, cfg.optimizer, cfg.training, cfg.data, cfg.parallel
    _check_values(cfg)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        section = FLAGS[name][0]
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    _check_model_options(cfg)
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
    _check_parallel(cfg)
    _check_checkpoint(cfg)
    _check_precision(cfg)
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
    _check_schedule(cfg)
    settable = precision_mode(o.precision).dtypes_settable
    if not settable and (o.grad_dtype != "bf16" or o.optimizer_state_dtype != "fp32"):
        raise ConfigError(f"--grad-dtype/--optimizer-state-dtype apply to bf16-sr and bf16 only "
                          f"(--precision {o.precision} keeps FP32 grads and states)")
    if not d.mock_data and not d.data_path:
        raise ConfigError("--data-path is required (or --mock-data for synthetic tokens)")
    _check_tokenizer(cfg)
    if d.mock_data and m.vocab_size is None:
        m.vocab_size = 1024
    if t.save_interval is not None and t.save_interval <= 0:
        raise ConfigError("--save-interval must be positive")
    if t.max_consecutive_skips < 0:
        raise ConfigError("--max-consecutive-skips must be >= 0 (0: never stop)")
    if t.log_interval <= 0:
        raise ConfigError("--log-interval must be positive")
    _check_logging(cfg)
    return cfg
