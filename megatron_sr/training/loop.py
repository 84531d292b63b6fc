"""The training loop: iterations of forward/backward over the global batch, LR, optimizer step, logging,
validation, checkpoints, and a checkpoint on SIGTERM.

The loop knows nothing about parallelism: it runs a Trainer (training/setup.py: model chunks, an
optimizer with the step()/zero_grad() interface, an LR scheduler, a forward_backward and save) and
reports to an Observer (training/observer.py).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

import torch
from torch import nn

from ..checkpoint import TrainState
from ..parallel.parallel_state import any_rank
from .forward_backward import average_losses, mean_loss
from .observer import Observer
from .setup import TrainingDiverged
from .throughput import flops_per_iteration, memory_report, peak_bf16_tflops, recomputed_fraction


class SigtermHandler:
    """Remembers a SIGTERM or SIGINT (Ctrl-C) so the loop can checkpoint at the end of the iteration and exit
    cleanly; a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


@dataclass
class LoopResult:
    state: TrainState
    train_losses: list[float]  # the loss of every iteration
    valid_losses: list[tuple[int, float]]  # (iteration, loss) of every validation
    reason: str  # "done", "sigterm", "sigint", "exit-interval" or "exit-duration"


def evaluate(model_chunks: list[nn.Module], forward_backward_func, data_iterator, eval_iters: int,
             num_microbatches: int) -> float:
    for m in model_chunks:
        m.eval()
    losses = []
    with torch.no_grad():
        for _ in range(eval_iters):
            losses.extend(forward_backward_func(model_chunks, data_iterator, num_microbatches, True))
    for m in model_chunks:
        m.train()
    return average_losses(losses)


def log_validation(observer: Observer, tag: str, iteration: int, loss: float, writer) -> None:
    ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    line = f" {tag} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    observer.log("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1))
    if writer is not None:
        writer.add_scalar(f"{tag} lm loss", loss, iteration)
        writer.add_scalar(f"{tag} lm loss ppl", ppl, iteration)


class _Records:
    """Each iteration's loss, grad norm and skip flag stay on the device until a log line, a checkpoint or the
    end of training needs them: then one transfer brings them all (no host synchronisation in between)."""

    def __init__(self, state: TrainState, writer, max_consecutive_skips: int):
        self.state, self.writer, self.rows = state, writer, []
        self.max_consecutive_skips, self.consecutive_skips = max_consecutive_skips, 0
        self.losses: list[float] = []  # every iteration's loss, for LoopResult
        self.window: list[float] = []  # losses since the last log line
        self.last_norm = float("nan")

    def add(self, iteration: int, lr: float, loss: torch.Tensor, result) -> None:
        self.rows.append((iteration, lr, loss, result.grad_norm_tensor, result.skipped_tensor))

    def flush(self) -> None:
        if not self.rows:
            return
        values = torch.stack([torch.stack((loss.float(), norm.float(), skip.float()))
                              for _, _, loss, norm, skip in self.rows]).tolist()
        for (iteration, lr, *_), (loss, norm, skipped) in zip(self.rows, values):
            self.state.skipped_iters += int(skipped)
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            self.losses.append(loss)
            self.window.append(loss)
            self.last_norm = norm
            if self.writer is not None:
                self.writer.add_scalar("lm loss", loss, iteration)
                self.writer.add_scalar("learning rate", lr, iteration)
                self.writer.add_scalar("grad norm", norm, iteration)
        self.rows = []
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(f"{self.consecutive_skips} iterations in a row had NaN/Inf gradients (up to "
                                   f"iteration {self.state.iteration}); stopping without a checkpoint "
                                   "(--max-consecutive-skips)")


def train(trainer, train_iterator: Iterator, valid_iterator: Iterator | None, state: TrainState,
          observer: Observer, writer=None) -> LoopResult:
    """Iterations from `state` to --train-iters (or a stop); checkpoints to --save when it is set."""
    cfg, model_chunks, optimizer, scheduler = trainer.cfg, trainer.model_chunks, trainer.optimizer, trainer.scheduler
    forward_backward_func, log = trainer.forward_backward, observer.log
    t, m = cfg.training, cfg.model
    num_microbatches = trainer.num_microbatches
    device = trainer.device
    shape = (t.global_batch_size, m.seq_length, m.num_layers, m.hidden_size, model_chunks[0].vocab_size)
    flops = flops_per_iteration(*shape, recomputed_fraction(m, cfg.parallel.pipeline_model_parallel_size),
                                selective=m.recompute_granularity == "selective")
    model_flops = flops_per_iteration(*shape)
    world = cfg.parallel.world_size
    peak = peak_bf16_tflops(device)
    sigterm = SigtermHandler()
    records = _Records(state, writer, t.max_consecutive_skips)
    valid_losses = []
    reason = "done"
    for mc in model_chunks:
        mc.train()
    timer = start = time.perf_counter()
    iters_in_window = 0
    try:
        while state.iteration < t.train_iters:
            lr = scheduler.step(state.iteration + 1)
            optimizer.zero_grad()
            losses = forward_backward_func(model_chunks, train_iterator, num_microbatches, False)
            observer.on_gradients(state.iteration + 1, trainer)
            result = optimizer.step()
            state.iteration += 1
            state.consumed_train_samples += t.global_batch_size
            loss = mean_loss(losses)
            observer.on_step(state.iteration, loss, result)
            records.add(state.iteration, lr, loss, result)
            iters_in_window += 1
            if state.iteration % t.log_interval == 0:
                records.flush()  # the iteration's one host synchronisation, at log intervals only
                if not trainer.params_finite():
                    raise TrainingDiverged(f"iteration {state.iteration}: the weights hold NaN/Inf; stopping without "
                                           "a checkpoint")
                elapsed = (time.perf_counter() - timer) / iters_in_window
                tokens_per_s = t.global_batch_size * m.seq_length / elapsed
                tflops = flops / elapsed / 1e12 / world
                mfu = f"{100 * model_flops / elapsed / 1e12 / world / peak:.1f}%" if peak else "n/a"
                log(f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {state.iteration:8d}/{t.train_iters:8d} |"
                    f" consumed samples: {state.consumed_train_samples:12d} |"
                    f" elapsed time per iteration (ms): {elapsed * 1000:.1f} |"
                    f" tokens per second: {tokens_per_s:.1f} |"
                    f" TFLOP/s per GPU: {tflops:.2f} | MFU: {mfu} |"
                    f" learning rate: {lr:.6E} | global batch size: {t.global_batch_size:5d} |"
                    f" lm loss: {sum(records.window) / len(records.window):.6E} | grad norm: {records.last_norm:.3f} |"
                    f" skipped iterations: {state.skipped_iters:3d} | {memory_report(device)} |")
                if writer is not None:
                    writer.add_scalar("tokens per second", tokens_per_s, state.iteration)
                records.window, iters_in_window = [], 0
                timer = time.perf_counter()
            if valid_iterator is not None and t.eval_interval and state.iteration % t.eval_interval == 0:
                vloss = evaluate(model_chunks, forward_backward_func, valid_iterator, t.eval_iters, num_microbatches)
                valid_losses.append((state.iteration, vloss))
                log_validation(observer, "validation", state.iteration, vloss, writer)
                timer = time.perf_counter()
            # Stop decisions are collective (any_rank): a rank that left the loop alone would leave the
            # others waiting in the next iteration's collectives. The interval test is the same everywhere.
            stop = None
            if any_rank(sigterm.received is not None):
                stop = "sigint" if sigterm.received == signal.SIGINT else "sigterm"
            elif t.exit_interval and state.iteration % t.exit_interval == 0:
                stop = "exit-interval"
            elif t.exit_duration_in_mins and any_rank(time.perf_counter() - start > 60 * t.exit_duration_in_mins):
                stop = "exit-duration"
            if t.save and (stop or (t.save_interval and state.iteration % t.save_interval == 0)):
                records.flush()  # the skipped count goes into the checkpoint
                save(trainer, state, observer)
                timer = time.perf_counter()
            if stop:
                reason = stop
                log(f" exiting at iteration {state.iteration} ({stop}), checkpoint written" if t.save
                    else f" exiting at iteration {state.iteration} ({stop})")
                break
    finally:
        sigterm.restore()
    records.flush()
    return LoopResult(state, records.losses, valid_losses, reason)


def save(trainer, state: TrainState, observer: Observer) -> None:
    path = trainer.save(state)
    observer.log(f" saved checkpoint at iteration {state.iteration} to {path}")
