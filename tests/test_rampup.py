"""--rampup-batch-size START INCR SAMPLES (Megatron's RampupBatchsizeNumMicroBatchesCalculator): each iteration's
global batch, micro-batch count and consumed samples against a table worked out by hand, the training length and
dataset size it implies, its consistency errors, and real runs: one process, two gloo ranks, and a resume in the
middle of the ramp-up."""

import re

import pytest
from multiproc import run_ranks

from megatron_sr.config import ConfigError, global_batch_size_at, parse_config
from megatron_sr.training.iterators import num_samples
from megatron_sr.training.lr_schedule import BatchSchedule, build_lr_scheduler
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

BASE = ("--mock-data --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --vocab-size 64 "
        "--micro-batch-size 1 --global-batch-size 8 --device cpu --eval-interval 0 --eval-iters 1 "
        "--log-interval 1").split()
TINY = BASE + "--rampup-batch-size 2 2 24".split()

# GBS 8 from 2 in steps of 2: (8 - 2) / 2 = 3 increments, one every 24 / 3 = 8 consumed samples while the
# consumed samples are <= 24. Iteration i starts after CONSUMED[i - 1] samples and takes BATCH[i - 1].
BATCH = [2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 8]
CONSUMED = [0, 2, 4, 6, 8, 12, 16, 22, 28, 36, 44]
# --train-samples 40: the 8 ramp-up iterations that start at <= 24 samples consume 28; one whole batch of 8
# fits in the remaining 12 (Megatron's update_train_iters): 9 iterations, 36 samples.
TRAIN_SAMPLES, ITERS = 40, 9


def test_batch_sizes_and_consumed_samples_follow_the_table():
    cfg = parse_config(TINY + ["--train-samples", "100"])
    batches = BatchSchedule(cfg.training)
    assert [batches.global_batch_size_of(i) for i in range(1, 12)] == BATCH
    assert [batches.consumed_before(i) for i in range(1, 12)] == CONSUMED
    assert batches.consumed_before(20) == 28 + (20 - 9) * 8  # after the ramp-up: whole global batches


@pytest.mark.parametrize("micro_batch, dp", [(1, 1), (2, 1), (1, 2)])
def test_microbatches_per_iteration_are_the_batch_over_micro_batch_times_dp(micro_batch, dp, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(dp))

    from megatron_sr.training.setup import Trainer

    cfg = parse_config(TINY + ["--train-samples", "100", "--micro-batch-size", str(micro_batch)])
    trainer = Trainer(cfg, None, [], None, build_lr_scheduler(None, cfg), None)  # all num_microbatches_at reads
    counts = [trainer.num_microbatches_at(c) for c in CONSUMED]
    assert counts == [b // (micro_batch * dp) for b in BATCH]
    assert trainer.num_microbatches == 8 // (micro_batch * dp)  # validation: the full global batch, as Megatron


def test_training_length_and_dataset_size_cover_the_rampup():
    cfg = parse_config(TINY + ["--train-samples", str(TRAIN_SAMPLES)])
    assert cfg.training.train_iters == ITERS and num_samples(cfg)[0] == TRAIN_SAMPLES
    # 10 samples: iterations start at 0, 2, 4, 6, 8 (all <= 10) and end at 12 > 10: the dataset must hold 12
    short = parse_config(TINY + ["--train-samples", "10"])
    assert short.training.train_iters == 5 and num_samples(short)[0] == 12


def test_megatron_float_arithmetic():
    """START 1, INCR 1, GBS 15, SAMPLES 18: 14 increments of 18/14 samples; after 9 samples Megatron's
    int(9 / (18 / 14)) is 6 (the exact quotient is 7), so the batch is 7."""
    cfg = parse_config(TINY + "--train-samples 100 --global-batch-size 15 --rampup-batch-size 1 1 18".split())
    assert global_batch_size_at(cfg.training, 9) == 7 and global_batch_size_at(cfg.training, 19) == 15


@pytest.mark.parametrize("flags, message", [
    ("--train-iters 10 --rampup-batch-size 2 2 24", "--rampup-batch-size needs --train-samples"),
    ("--train-samples 40 --rampup-batch-size 2 2", "expects three integers START INCR SAMPLES, got 2 2"),
    ("--train-samples 40 --rampup-batch-size 2 x 24", "expects three integers"),
    ("--train-samples 40 --rampup-batch-size 0 2 24", "must be positive"),
    ("--train-samples 40 --rampup-batch-size 2 2 0", "must be positive"),
    ("--train-samples 40 --rampup-batch-size 8 2 24", "--global-batch-size 8 must be START plus a positive multiple"),
    ("--train-samples 40 --rampup-batch-size 2 4 24", "--global-batch-size 8 must be START plus a positive multiple"),
    ("--train-samples 40 --micro-batch-size 2 --rampup-batch-size 2 1 24",
     r"the global batch 3 \(after 4 samples\) is not divisible by --micro-batch-size 2"),
])
def test_rampup_consistency_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(BASE + flags.split())
    assert "\n" not in str(err.value)


def test_an_unreached_batch_need_not_divide():
    """Megatron checks the batch of each iteration it runs: one the training never reaches is no error."""
    cfg = parse_config(TINY + "--train-samples 2 --micro-batch-size 2 --global-batch-size 4 "
                              "--rampup-batch-size 2 1 100".split())
    assert cfg.training.train_iters == 2  # both iterations (at 0 and at 2 <= 2 samples) take batch 2


class _Record(Observer):
    """The log lines' fields and each forward_backward's micro-batch count."""

    def __init__(self):
        self.lines, self.microbatches = [], []

    def log(self, message):
        self.lines.append(message)

    def on_train_start(self, trainer):
        run = trainer.forward_backward

        def counting(model_chunks, data_iterator, num_microbatches, forward_only, **position):
            if not forward_only:
                self.microbatches.append(num_microbatches)
            return run(model_chunks, data_iterator, num_microbatches, forward_only, **position)

        trainer.forward_backward = counting

    def field(self, name, kind=int):
        return [kind(m.group(1)) for line in self.lines if (m := re.search(rf"{name}:\s+([\d.E+-]+)", line))]


def _lr(consumed: int) -> float:
    """--lr 1e-3 --min-lr 1e-4, warm-up over 8 samples, linear decay to 40 samples (closed form)."""
    return 1e-3 * consumed / 8 if consumed <= 8 else 1e-4 + (1 - (consumed - 8) / 32) * 9e-4


RUN = TINY + f"--train-samples {TRAIN_SAMPLES} --lr 1e-3 --min-lr 1e-4 --lr-warmup-samples 8".split()


def test_pretrain_ramps_up_the_batch():
    record = _Record()
    result = pretrain(parse_config(RUN + ["--hidden-dropout", "0", "--attention-dropout", "0"]), record)
    assert result.state.iteration == ITERS and result.state.consumed_train_samples == CONSUMED[ITERS] == 36
    assert record.field("consumed samples") == CONSUMED[1:ITERS + 1]
    assert record.field("global batch size") == BATCH[:ITERS]
    assert record.microbatches == BATCH[:ITERS]  # micro-batch 1, one rank
    assert record.field("learning rate", float) == pytest.approx([_lr(c) for c in CONSUMED[:ITERS]], rel=1e-5)


def _two_rank_run(argv):
    from megatron_sr.training.pretrain import pretrain as run

    record = _Record()
    result = run(parse_config(argv), record)
    return result.train_losses, result.state.consumed_train_samples, record.microbatches


def test_two_data_parallel_ranks_split_each_rampup_batch():
    argv = RUN + ["--precision", "fp32", "--hidden-dropout", "0", "--attention-dropout", "0"]
    one_losses, one_consumed, _ = _two_rank_run(argv)
    results = run_ranks(2, _two_rank_run, argv)
    for losses, consumed, microbatches in results:
        assert consumed == one_consumed == 36
        assert microbatches == [b // 2 for b in BATCH[:ITERS]]
        assert losses == pytest.approx(one_losses, rel=1e-4)


def test_resume_in_the_middle_of_the_rampup_gives_the_same_losses(tmp_path):
    """Iteration 5 ends at 12 samples, inside the ramp-up: the resumed run goes on with batches 4, 6, 6, 8."""
    straight = pretrain(parse_config(RUN), _Record())
    first = pretrain(parse_config(RUN + ["--exit-interval", "5", "--save", str(tmp_path)]), _Record())
    assert first.reason == "exit-interval" and first.state.consumed_train_samples == 12
    record = _Record()
    second = pretrain(parse_config(RUN + ["--load", str(tmp_path), "--save", str(tmp_path)]), record)
    assert record.microbatches == BATCH[5:ITERS]
    assert second.state.consumed_train_samples == 36
    assert straight.train_losses == first.train_losses + second.train_losses
