"""Megatron's learning-rate schedule (the LR part of its OptimizerParamScheduler) and batch-size ramp-up.

Megatron counts the scheduler's steps in samples: after each update it steps by the iteration's global batch,
so the update of an iteration uses the LR at the samples consumed *before* it (0 for the first iteration:
warm-up starts at --lr-warmup-init). Iteration flags become samples by x --global-batch-size
(config.schedule_samples). Here the LR of iteration i (1-based) is `lr_at(consumed_before(i))`: a function of
the iteration and the config, so a resumed run gets the same LR as an uninterrupted one without saving any
scheduler state.
"""

from __future__ import annotations

import itertools
import math

from ..config import Config, TrainingConfig, global_batch_size_at, rampup_batches, schedule_samples

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


def decay_coefficient(style: str, ratio: float) -> float:
    """How much of (max_lr - min_lr) is left at `ratio` (0 to 1) of a decay of this style."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":  # WSD's: 1 at the start, 0 at the end, halving the distance to -1 each unit
        return 2.0 * math.pow(0.5, ratio) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"unknown decay style {style!r}")


class BatchSchedule:
    """The global batch of every iteration under --rampup-batch-size and the samples consumed before it (the
    ramp-up's iterations are tabulated once; after it every iteration takes --global-batch-size)."""

    def __init__(self, t: TrainingConfig):
        self.training = t
        self._ramp_consumed = list(itertools.accumulate(rampup_batches(t), initial=0))

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The batch of the iteration that starts after `consumed_samples` (Megatron's ramp-up formula)."""
        return global_batch_size_at(self.training, consumed_samples)

    def consumed_before(self, iteration: int) -> int:
        """Samples consumed by iterations 1 .. iteration-1 of a run that starts from nothing."""
        done, ramp_iterations = iteration - 1, len(self._ramp_consumed) - 1
        if done <= ramp_iterations:
            return self._ramp_consumed[done]
        return self._ramp_consumed[-1] + (done - ramp_iterations) * self.training.global_batch_size

    def global_batch_size_of(self, iteration: int) -> int:
        """The global batch of iteration `iteration` (1-based)."""
        return self.global_batch_size_at(self.consumed_before(iteration))


class LRScheduler:
    """lr_at(num_steps) is Megatron's get_lr; step(iteration) sets the optimizer's LR for that iteration's update.

    The steps taken before an iteration (1-based) are the samples `batches` consumed before it (training); without
    `batches` they are `iteration - 1`: the steps are then iterations.
    """

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_steps: float, decay_steps: int,
                 decay_style: str = "linear", init_lr: float = 0.0, wsd_decay_steps: int | None = None,
                 wsd_decay_style: str = "exponential", batches: BatchSchedule | None = None):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr decay style must be one of {', '.join(DECAY_STYLES)}, got {decay_style!r}")
        if wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"WSD decay style must be one of {', '.join(WSD_DECAY_STYLES)}, got {wsd_decay_style!r}")
        if not 0.0 <= min_lr <= max_lr or not init_lr <= max_lr:
            raise ValueError(f"expected 0 <= min_lr ({min_lr}) <= max_lr ({max_lr}) and init_lr ({init_lr}) <= max_lr")
        if decay_steps <= 0 or not 0 <= warmup_steps <= decay_steps:
            raise ValueError(f"expected 0 <= warmup steps ({warmup_steps}) <= decay steps ({decay_steps})")
        if decay_style == "WSD" and wsd_decay_steps is None:
            raise ValueError("the WSD decay style needs wsd_decay_steps")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), min_lr, init_lr
        self.warmup_steps, self.decay_steps, self.decay_style = warmup_steps, decay_steps, decay_style
        self.wsd_decay_steps, self.wsd_decay_style = wsd_decay_steps, wsd_decay_style
        self.batches = batches

    def lr_at(self, num_steps: float) -> float:
        """The LR after `num_steps` scheduler steps: linear warm-up from init_lr, then the decay style to min_lr
        at decay_steps (warm-up included), min_lr after it."""
        if self.warmup_steps > 0 and num_steps <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * float(num_steps) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return self.max_lr
        if num_steps > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            lr = self.max_lr * max(self.warmup_steps, 1) ** 0.5 / max(num_steps, 1) ** 0.5
            return max(self.min_lr, lr)
        if self.decay_style == "WSD":
            coeff = self._wsd_coefficient(num_steps)
        else:
            ratio = float(num_steps - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
            coeff = decay_coefficient(self.decay_style, ratio)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _wsd_coefficient(self, num_steps: float) -> float:
        """Warm-up, stable at max_lr, then anneal over the last wsd_decay_steps of the decay."""
        anneal_start = self.decay_steps - self.wsd_decay_steps
        if num_steps <= anneal_start:
            return 1.0
        return decay_coefficient(self.wsd_decay_style, float(num_steps - anneal_start) / float(self.wsd_decay_steps))

    def steps_before(self, iteration: int) -> int:
        return self.batches.consumed_before(iteration) if self.batches is not None else iteration - 1

    def lr_of_iteration(self, iteration: int) -> float:
        return self.lr_at(self.steps_before(iteration))

    def step(self, iteration: int) -> float:
        """Set and return the LR of iteration `iteration`'s update (1-based)."""
        lr = self.lr_of_iteration(iteration)
        self.optimizer.lr = lr
        return lr


def build_lr_scheduler(optimizer, cfg: Config) -> LRScheduler:
    """The run's scheduler: the config's lengths in samples, stepped by the consumed samples of each iteration."""
    o = cfg.optimizer
    warmup, decay, wsd = schedule_samples(cfg)
    return LRScheduler(optimizer, max_lr=o.lr, min_lr=o.min_lr, init_lr=o.lr_warmup_init, warmup_steps=warmup,
                       decay_steps=decay, decay_style=o.lr_decay_style, wsd_decay_steps=wsd,
                       wsd_decay_style=o.lr_wsd_decay_style, batches=BatchSchedule(cfg.training))
