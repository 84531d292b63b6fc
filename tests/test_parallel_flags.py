"""Megatron's data-parallel switches change when the collectives run, never what they compute.

On 2 gloo ranks (dp 2, distributed optimizer, bf16-sr), through pretrain() as torchrun would run it:
- --overlap-grad-reduce (buckets reduced during backward) and --overlap-param-gather (the all-gather
  left in flight after the step, each bucket waited for by the forward that uses it) give bitwise the
  losses and final parameters of Megatron's default (every collective after backward / in the step);
- --ddp-average-in-collective (sum, then divide by dp) equals pre-scaling by 1/dp bitwise at dp 2 (halving
  is exact in binary floating point, so both orders round the same sum).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from multiproc import run_ranks, sub_world

from megatron_sr.config import ConfigError, parse_config
from megatron_sr.training.observer import Observer

ARGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 128 "
        "--make-vocab-size-divisible-by 32 --micro-batch-size 1 --global-batch-size 4 --train-iters 4 "
        "--mock-data --hidden-dropout 0 --attention-dropout 0 --lr 1e-3 --log-interval 2 --eval-interval 0 "
        "--eval-iters 1 --device cpu --use-distributed-optimizer --precision bf16-sr "
        "--ddp-bucket-size 2000").split()

VARIANTS = {"default": [], "overlap": ["--overlap-grad-reduce", "--overlap-param-gather"],
            "average-in-collective": ["--ddp-average-in-collective"]}


class _Quiet(Observer):
    def __init__(self):
        self.in_flight = []  # all-gathers still pending after each step, waited for before each backward

    def log(self, message: str) -> None:
        pass

    def on_train_start(self, trainer) -> None:
        self.ddp = trainer.optimizer.model

    def on_gradients(self, iteration, trainer) -> None:
        self.in_flight.append(len(self.ddp._param_gathers))

    def on_step(self, iteration, loss, result) -> None:
        self.in_flight.append(len(self.ddp._param_gathers))

    def on_train_end(self, trainer, result) -> None:
        h = hashlib.sha256()
        for p in trainer.model_chunks[0].parameters():
            h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.digest = h.hexdigest()


def _runs() -> dict:
    from megatron_sr.training.pretrain import pretrain

    out = {}
    for name, extra in VARIANTS.items():
        with sub_world(2, name) as active:
            if active:
                observer = _Quiet()
                result = pretrain(parse_config(ARGS + extra), observer)
                out[name] = (result.train_losses, observer.digest)
                out[name + ":in-flight"] = observer.in_flight
    return out


@pytest.mark.slow
def test_overlap_and_averaging_switches_change_nothing_computed():
    results = run_ranks(2, _runs)
    for rank in results:
        reference = rank["default"]
        assert len(reference[0]) == 4
        for name in VARIANTS:
            assert rank[name] == reference, name
    assert results[0]["default"][1] == results[1]["default"][1]  # replicas identical
    buckets = results[0]["overlap:in-flight"][1]
    assert buckets >= 2 and results[0]["overlap:in-flight"] == [0] + [buckets, 0] * 3 + [buckets]
    assert not any(results[0]["default:in-flight"])


def test_overlap_param_gather_needs_its_prerequisites():
    base = ARGS[:ARGS.index("--use-distributed-optimizer")]
    with pytest.raises(ConfigError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        parse_config(base + ["--overlap-param-gather", "--overlap-grad-reduce"])
    import os

    os.environ["WORLD_SIZE"] = "2"  # as torchrun sets it
    try:
        with pytest.raises(ConfigError, match="--distributed-backend nccl needs CUDA"):
            parse_config(ARGS + ["--distributed-backend", "nccl"])
    finally:
        del os.environ["WORLD_SIZE"]
