"""finalize(cfg): derived defaults and consistency checks, each a one-line ConfigError naming the flags.

One `_check_<topic>` per topic (model, values, logging, precision, parallel, checkpoint, tokenizer,
schedule); also what a resume compares (MODEL_SHAPE_FIELDS) and --use-checkpoint-args.
"""

from __future__ import annotations

import math

from ..numerics.quant import parse_format
from ..parallel.quantized_linear import POINT_TENSOR, POINTS
from ..precision import precision_mode
from .batch import DEFAULT_TRAIN_ITERS, iterations_for_samples, rampup_batches, schedule_samples
from .sections import FLAGS, Config, ConfigError, ModelConfig, OptimizerConfig, TrainingConfig


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


def _linear_widths(m: ModelConfig, tp: int) -> dict[str, dict[str, int]]:
    """Per linear of a layer, the local last dimension of its input, weight and output gradient: a column-
    parallel layer's input and weight rows are whole and its output split; a row-parallel layer's input and
    weight rows split over tp and its output whole."""
    qkv_out, attn = (m.num_attention_heads + 2 * m.query_groups) * m.head_dim, m.num_attention_heads * m.head_dim
    column = lambda i, o: {"input": i, "weight": i, "grad": o // tp}  # noqa: E731
    row = lambda i, o: {"input": i // tp, "weight": i // tp, "grad": o}  # noqa: E731
    widths = {"linear_qkv": column(m.hidden_size, qkv_out), "linear_proj": row(attn, m.hidden_size),
              "linear_fc1": column(m.hidden_size, m.ffn_hidden_size),
              "linear_fc2": row(m.ffn_hidden_size, m.hidden_size)}
    return widths


def _check_quant(cfg: Config) -> None:
    """Each --quant-* a known format (one line naming the flag); a block never crosses a tp shard or a row;
    full recompute would replay the forward at another micro-batch's position, so it is refused."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    formats = {}
    for point in POINTS:
        flag, spec = f"--quant-{point.replace('_', '-')}", getattr(m, f"quant_{point}")
        try:
            fmt = parse_format(spec)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
        if fmt is not None:
            formats[point] = fmt
    if not formats:
        return
    if m.recompute_granularity == "full":
        raise ConfigError("--recompute-granularity full with --quant-* points is not supported (the recomputed "
                          "forward would draw another micro-batch's rounding bits); use selective or none")
    for point, fmt in formats.items():
        block = fmt.block_size()
        if block is None:
            continue
        for linear, widths in _linear_widths(m, tp).items():
            width = widths[POINT_TENSOR[point]]
            if width % block:
                raise ConfigError(f"--quant-{point.replace('_', '-')} {fmt.spec}: blocks of {block} do not tile "
                                  f"{linear}'s {POINT_TENSOR[point]} width {width} on each of {tp} tp rank(s)")


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


def _check_update_stall(cfg: Config) -> None:
    if cfg.training.log_update_stall_interval < 0:
        raise ConfigError("--log-update-stall-interval must be >= 0 (0: off), got "
                          f"{cfg.training.log_update_stall_interval}")


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
    iterations = iterations_for_samples(t)
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
    _check_quant(cfg)
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
    _check_update_stall(cfg)
    return cfg
