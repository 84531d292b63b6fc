"""Megatron's LR schedules: each decay style against its closed form, warm-up by iterations / samples / fraction
from --lr-warmup-init, WSD's annealing styles, sample-based lengths, and the flag conflicts Megatron refuses."""

import math

import pytest

from megatron_sr.config import ConfigError, finalize, parse_config, schedule_samples
from megatron_sr.training.lr_schedule import LRScheduler, build_lr_scheduler

BASE = "--mock-data --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 16".split()
MAX, MIN = 1.0, 0.1


class _Opt:
    lr = None


def sched(style: str, warmup=10, decay=110, **kw) -> LRScheduler:
    return LRScheduler(_Opt(), max_lr=MAX, min_lr=MIN, warmup_steps=warmup, decay_steps=decay, decay_style=style,
                       **kw)


def from_flags(flags: str) -> LRScheduler:
    return build_lr_scheduler(_Opt(), parse_config(BASE + flags.split()))


def test_linear_and_cosine_decay_closed_form():
    # 25 of the 100 decay steps after a warm-up of 10: ratio 0.25
    assert sched("linear").lr_at(35) == pytest.approx(MIN + (1 - 0.25) * (MAX - MIN))
    assert sched("cosine").lr_at(35) == pytest.approx(MIN + 0.5 * (math.cos(math.pi * 0.25) + 1) * (MAX - MIN))
    for style in ("linear", "cosine"):
        s = sched(style)
        assert s.lr_at(10) == pytest.approx(MAX)  # the end of warm-up is the peak
        assert s.lr_at(110) == pytest.approx(MIN) and s.lr_at(111) == MIN and s.lr_at(10**6) == MIN


def test_constant_stays_at_the_peak_after_warmup_and_after_decay():
    s = sched("constant")
    assert s.lr_at(5) == pytest.approx(0.5) and s.lr_at(35) == MAX and s.lr_at(10**6) == MAX


def test_inverse_square_root_closed_form():
    s = sched("inverse-square-root")
    assert s.lr_at(40) == pytest.approx(MAX * math.sqrt(10) / math.sqrt(40))  # 0.5
    assert s.lr_at(100) == pytest.approx(MAX * math.sqrt(10 / 100))
    assert s.lr_at(111) == MIN  # past the decay length: min_lr, as for every decaying style
    floor = LRScheduler(_Opt(), max_lr=MAX, min_lr=0.4, warmup_steps=10, decay_steps=110,
                        decay_style="inverse-square-root")
    assert floor.lr_at(90) == 0.4  # sqrt(10/90) = 0.33 is clamped to min_lr
    # no warm-up: Megatron takes max(warmup, 1) and max(steps, 1)
    cold = sched("inverse-square-root", warmup=0)
    assert cold.lr_at(0) == MAX and cold.lr_at(4) == pytest.approx(MAX / 2)


@pytest.mark.parametrize("wsd_style, coeff", [("exponential", 2 * 0.5 ** 0.5 - 1), ("linear", 0.5),
                                              ("cosine", 0.5 * (math.cos(math.pi * 0.5) + 1)),
                                              ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd_warmup_stable_then_each_annealing_style(wsd_style, coeff):
    # decay 110 steps, warm-up 10, annealing the last 40: stable up to step 70, half-way through at 90
    s = sched("WSD", wsd_decay_steps=40, wsd_decay_style=wsd_style)
    assert s.lr_at(5) == pytest.approx(0.5) and s.lr_at(40) == MAX and s.lr_at(70) == MAX
    assert s.lr_at(90) == pytest.approx(MIN + coeff * (MAX - MIN))
    assert s.lr_at(110) == pytest.approx(MIN) and s.lr_at(200) == MIN


def test_warmup_starts_at_lr_warmup_init():
    s = sched("linear", init_lr=0.2)
    assert s.lr_at(0) == 0.2 and s.lr_at(5) == pytest.approx(0.2 + (MAX - 0.2) * 5 / 10) and s.lr_at(10) == MAX


def test_first_iteration_uses_the_lr_before_any_step_as_megatron():
    """Megatron's scheduler is stepped after each update: iteration i uses the LR at the samples consumed before it."""
    s = from_flags("--lr 1.0 --train-iters 10 --global-batch-size 4 --lr-warmup-iters 2 --lr-warmup-init 0.1")
    assert [s.lr_of_iteration(i) for i in (1, 2, 3)] == pytest.approx([0.1, 0.55, 1.0])
    opt = _Opt()
    s.optimizer = opt
    assert s.step(2) == pytest.approx(0.55) and opt.lr == pytest.approx(0.55)


@pytest.mark.parametrize("warmup", ["--lr-warmup-iters 5", "--lr-warmup-fraction 0.125"])
def test_warmup_by_iterations_counts_global_batches(warmup):
    """5 warm-up iterations of 4 samples = 20 samples = 1/8 of the 40 decay iterations."""
    s = from_flags(f"--lr 1.0 --train-iters 50 --lr-decay-iters 40 --global-batch-size 4 {warmup}")
    assert s.warmup_steps == 20 and s.decay_steps == 160
    assert [s.lr_of_iteration(i) for i in range(1, 7)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root", "constant"])
def test_sample_based_schedule_equals_iteration_based_at_constant_batch(style):
    by_iters = from_flags(f"--lr-decay-style {style} --train-iters 50 --global-batch-size 4 --lr-warmup-iters 5 "
                          "--lr-decay-iters 40 --min-lr 1e-5")
    by_samples = from_flags(f"--lr-decay-style {style} --train-samples 200 --global-batch-size 4 "
                            "--lr-warmup-samples 20 --lr-decay-samples 160 --min-lr 1e-5")
    assert [by_iters.lr_of_iteration(i) for i in range(1, 51)] == [by_samples.lr_of_iteration(i) for i in range(1, 51)]
    wsd_iters = from_flags("--lr-decay-style WSD --lr-wsd-decay-iters 10 --train-iters 50 --global-batch-size 4")
    wsd_samples = from_flags("--lr-decay-style WSD --lr-wsd-decay-samples 40 --train-samples 200 "
                             "--global-batch-size 4")
    assert [wsd_iters.lr_of_iteration(i) for i in range(1, 51)] == [wsd_samples.lr_of_iteration(i)
                                                                     for i in range(1, 51)]


def test_sample_based_lengths_and_derived_iterations():
    cfg = parse_config(BASE + "--train-samples 103 --global-batch-size 4 --lr-warmup-fraction 0.1".split())
    assert cfg.training.train_iters == 25  # the partial last batch is dropped, as Megatron
    assert cfg.optimizer.lr_decay_samples == 103 and cfg.optimizer.lr_decay_iters is None
    assert schedule_samples(cfg) == (pytest.approx(10.3), 103, None)
    assert finalize(cfg).training.train_iters == 25  # a finalized config finalizes again unchanged


def test_warmup_as_long_as_the_decay_is_kept():
    """Megatron asserts warm-up < decay; this project has always allowed equality (the LR is defined: the peak)."""
    s = from_flags("--lr 1.0 --train-iters 2 --global-batch-size 4 --lr-warmup-iters 2")
    assert [s.lr_of_iteration(i) for i in (1, 2, 3)] == pytest.approx([0.0, 0.5, 1.0])


def test_default_length_is_iterations():
    cfg = parse_config(BASE)
    assert cfg.training.train_iters == 1000 and cfg.training.train_samples is None
    assert cfg.optimizer.lr_decay_iters == 1000


@pytest.mark.parametrize("flags, message", [
    ("--train-iters 10 --train-samples 40", "--train-iters and --train-samples are exclusive"),
    ("--train-iters 10 --lr-warmup-fraction 0.1 --lr-warmup-iters 2", "--lr-warmup-fraction and --lr-warmup-iters"),
    ("--train-samples 40 --lr-warmup-fraction 0.1 --lr-warmup-samples 2",
     "--lr-warmup-fraction and --lr-warmup-samples"),
    ("--train-iters 10 --lr-decay-samples 40", "--lr-decay-samples needs --train-samples"),
    ("--train-iters 10 --lr-warmup-samples 4", "--lr-warmup-samples needs --train-samples"),
    ("--train-samples 40 --lr-decay-iters 10", "--lr-decay-iters needs --train-iters"),
    ("--train-samples 40 --lr-warmup-iters 1", "--lr-warmup-iters needs --train-iters"),
    ("--train-samples 40 --lr-wsd-decay-iters 1 --lr-decay-style WSD", "--lr-wsd-decay-iters needs --train-iters"),
    ("--train-iters 10 --lr-decay-style WSD", "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    ("--train-samples 40 --lr-decay-style WSD", "--lr-decay-style WSD needs --lr-wsd-decay-samples"),
    ("--train-iters 10 --lr-wsd-decay-iters 2", "--lr-wsd-decay-iters applies to --lr-decay-style WSD only"),
    ("--train-iters 10 --lr-wsd-decay-style cosine", "--lr-wsd-decay-style applies to --lr-decay-style WSD only"),
    ("--train-iters 10 --lr-decay-style WSD --lr-wsd-decay-iters 11", "--lr-wsd-decay-iters must be in"),
    ("--train-iters 10 --lr-warmup-iters 11", r"warm-up \(--lr-warmup-iters 11\) must not be longer"),
    ("--train-iters 10 --lr-warmup-fraction 1.0", "--lr-warmup-fraction must be in"),
    ("--train-iters 10 --lr 1e-3 --lr-warmup-init 2e-3", "--lr-warmup-init 0.002 must be in"),
    ("--train-iters 0", "--train-iters must be positive"),
    ("--train-samples 3 --global-batch-size 4", "--train-samples 3 holds no whole global batch"),
    ("--train-iters 10 --lr-decay-style step", "lr-decay-style"),
])
def test_conflicting_or_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(BASE + flags.split())
    assert "\n" not in str(err.value)
