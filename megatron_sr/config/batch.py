"""Training length and batch-size ramp-up in Megatron's arithmetic (validate_args, update_train_iters,
RampupBatchsizeNumMicroBatchesCalculator); training/lr_schedule.py runs the schedules from these.
"""

from __future__ import annotations

from .sections import Config, TrainingConfig

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


def iterations_for_samples(t: TrainingConfig) -> int:
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
