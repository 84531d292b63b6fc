"""The configuration's sections: one typed dataclass per component, each field a flag with Megatron's name.

Every field is a flag: `num_layers` is `--num-layers`; the YAML key is either spelling (`num-layers:` or
`num_layers:`). A bool field is off by default and switched on by its flag; one whose default is True is
spelled, as in Megatron, `--no-<flag>` and switches it off (`log_loss_scale_to_tensorboard` is
`--no-log-loss-scale-to-tensorboard`; its YAML key keeps the field's name). A field may have aliases
(`_opt(..., aliases=...)`): `--layernorm-epsilon` is `--norm-epsilon`; both spellings with different values
in one source are a ConfigError.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from ..precision import PRECISIONS


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
    # Simulated low-bit training (docs/quantization.md): each quantization point of the tp linear layers is
    # off or FORMAT:ROUNDING (fp:e4m3:sr, fixed:w8f6:rn, bfp:m7:b16:sr, int:b8:row:sr, ...).
    quant_fwd_input: str = _opt("off", "quantization point: the linear layers' input in forward")
    quant_fwd_weight: str = _opt("off", "quantization point: the linear layers' weight in forward")
    quant_bwd_input: str = _opt("off", "quantization point: the input in backward, for the weight gradient")
    quant_bwd_weight: str = _opt("off", "quantization point: the weight in backward, for the input gradient")
    quant_bwd_grad_dgrad: str = _opt("off", "quantization point: the output gradient, for the input gradient")
    quant_bwd_grad_wgrad: str = _opt("off", "quantization point: the output gradient, for the weight gradient")
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
    log_update_stall_interval: int = _opt(
        0, "every N iterations, the fraction of weight updates that round to no change (elements with a nonzero "
        "gradient whose stored weight, the FP32 master in bf16-mp, keeps its bits through the step), in the log "
        "line and as update-stall-fraction (0: off; one copy of the weights at those iterations)")
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
