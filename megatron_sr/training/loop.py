"""The training loop: iterations of forward/backward over the global batch, LR, optimizer step, logging,
validation, checkpoints, and a checkpoint on SIGTERM.

The loop knows nothing about parallelism: it runs a Trainer (training/setup.py: model chunks, an
optimizer with the step()/zero_grad() interface, an LR scheduler, a forward_backward and save) and
reports to an Observer (training/observer.py).

Logging follows Megatron's training_log: a line every --log-interval iterations (loss averaged over the
interval, the last iteration's grad norm and, with --log-params-norm / --log-num-zeros-in-grad, its params
norm and zero count; with --log-update-stall-interval the latest update stall fraction), scalars every
--tensorboard-log-interval iterations (training/loggers.py), and the timers of --timing-log-level
(training/timers.py) after the line. Every per-iteration value stays on the
device until the log line reads them all in one transfer (`_Records`).
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
from ..config import TrainingConfig
from ..distributed import DistributedOptimizer
from ..parallel.parallel_state import any_rank
from .forward_backward import average_losses, mean_loss
from .loggers import memory_scalars
from .model_stats import UpdateStallProbe, num_zeros_in_grad, params_norm
from .observer import Observer
from .setup import TrainingDiverged
from .throughput import flops_per_iteration, memory_report, model_shape, peak_bf16_tflops, recomputed_fraction
from .timers import TimedIterator, Timers, instrument

STALL = "update-stall-fraction"  # --log-update-stall-interval's scalar (training/model_stats.py)


class SigtermHandler:
    """Remembers a SIGINT (Ctrl-C) and, with --exit-signal-handler, a SIGTERM, so the loop can checkpoint at the
    end of the iteration and exit cleanly; a second Ctrl-C interrupts at once. Without --exit-signal-handler
    SIGTERM keeps its default action (the process ends; checkpoints are atomic, so the last one stays whole)."""

    def __init__(self, handle_sigterm: bool = True):
        self.received = None
        signals = (signal.SIGTERM, signal.SIGINT) if handle_sigterm else (signal.SIGINT,)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

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
             num_microbatches: int, iteration: int = 0) -> float:
    for m in model_chunks:
        m.eval()
    losses = []
    with torch.no_grad():
        for k in range(eval_iters):
            losses.extend(forward_backward_func(model_chunks, data_iterator, num_microbatches, True, step=iteration,
                                                batch_in_step=k))
    for m in model_chunks:
        m.train()
    return average_losses(losses)


def log_validation(observer: Observer, tag: str, iteration: int, loss: float, writer, log_ppl: bool = False,
                   samples: int | None = None) -> None:
    """The validation line; Megatron's scalars `lm loss <tag>` and, with --log-validation-ppl-to-tensorboard,
    `lm loss <tag> ppl` (each also over `samples`, the consumed training samples)."""
    ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    line = f" {tag} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    observer.log("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1))
    if writer is not None:
        writer.add_scalar(f"lm loss {tag}", loss, iteration, samples)
        if log_ppl:
            writer.add_scalar(f"lm loss {tag} ppl", ppl, iteration, samples)


@dataclass
class _Row:
    iteration: int
    lr: float
    samples: int  # consumed training samples after the iteration
    batch_size: int
    on_device: dict[str, torch.Tensor]  # "lm loss", "grad-norm", "skipped", optionally "params-norm", "num-zeros"
    memory: dict[str, float] | None  # --log-memory-to-tensorboard, read on the host at the iteration


class _Records:
    """Each iteration's loss, grad norm, skip flag (and params norm, zero count where asked for) stay on the
    device until a log line, a checkpoint or the end of training needs them: then one transfer brings them
    all (no host synchronisation in between), and the scalars of every --tensorboard-log-interval-th
    iteration are written."""

    def __init__(self, state: TrainState, writer, t: TrainingConfig, world_size: int):
        self.state, self.writer, self.t, self.world_size, self.rows = state, writer, t, world_size, []
        self.max_consecutive_skips, self.consecutive_skips = t.max_consecutive_skips, 0
        self.samples = state.consumed_train_samples  # before the first row: its batch size is the difference
        self.losses: list[float] = []  # every iteration's loss, for LoopResult
        self.window: list[float] = []  # losses since the last log line
        self.last: dict[str, float] = {"grad-norm": float("nan")}  # the last row's device values
        self.last_stall: float | None = None  # the latest --log-update-stall-interval value

    def writes_scalars(self, iteration: int) -> bool:
        return self.writer is not None and self._scalar_iteration(iteration)

    def _scalar_iteration(self, iteration: int) -> bool:
        """The same on every rank (only the last one has the writer)."""
        return bool(self.t.tensorboard_dir or self.t.wandb_project) and iteration % self.t.tensorboard_log_interval == 0

    def reports(self, iteration: int) -> bool:
        """Whether the log line or the scalars show this iteration: the params norm and zeros, collectives, are
        computed then, on every rank alike."""
        return iteration % self.t.log_interval == 0 or self._scalar_iteration(iteration)

    def add(self, iteration: int, lr: float, loss: torch.Tensor, result, stats: dict[str, torch.Tensor],
            device: torch.device) -> None:
        on_device = {"lm loss": loss, "grad-norm": result.grad_norm_tensor, "skipped": result.skipped_tensor, **stats}
        batch_size, self.samples = self.state.consumed_train_samples - self.samples, self.state.consumed_train_samples
        memory = memory_scalars(device) if self.t.log_memory_to_tensorboard and self.writes_scalars(iteration) else None
        self.rows.append(_Row(iteration, lr, self.samples, batch_size, on_device, memory))

    def flush(self) -> None:
        if not self.rows:
            return
        flat = [v for row in self.rows for v in row.on_device.values()]
        values = iter(torch.stack([v.to(flat[0].device).double() for v in flat]).tolist())  # FP64: counts exact
        for row in self.rows:
            got = {name: next(values) for name in row.on_device}
            skipped = bool(got.pop("skipped"))
            self.state.skipped_iters += int(skipped)
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            self.losses.append(got["lm loss"])
            self.window.append(got["lm loss"])
            self.last = got
            if STALL in got:
                self.last_stall = got[STALL]
            if self.writes_scalars(row.iteration):
                self._write(row, got)
            elif self.writer is not None and STALL in got:  # sampled at its own interval
                self.writer.add_scalar(STALL, got[STALL], row.iteration, row.samples)
        self.rows = []
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(f"{self.consecutive_skips} iterations in a row had NaN/Inf gradients (up to "
                                   f"iteration {self.state.iteration}); stopping without a checkpoint "
                                   "(--max-consecutive-skips)")

    def _write(self, row: _Row, got: dict[str, float]) -> None:
        """Megatron's scalars of one iteration, in its order."""
        add, it, samples = self.writer.add_scalar, row.iteration, row.samples
        add("learning-rate", row.lr, it, samples)
        add("batch-size", row.batch_size, it, samples)
        add("lm loss", got["lm loss"], it, samples)
        if self.t.log_loss_scale_to_tensorboard:
            add("loss-scale", 1.0, it, samples)  # BF16 and FP32 train without loss scaling
        if self.t.log_world_size_to_tensorboard:
            add("world-size", self.world_size, it, samples)
        add("grad-norm", got["grad-norm"], it, samples)
        for name in ("num-zeros", "params-norm", STALL):
            if name in got:
                add(name, got[name], it, samples)
        for name, value in (row.memory or {}).items():
            add(name, value, it)


def attach_timers(trainer, timers: Timers) -> None:
    """Time the gradient sync and the parameter all-gather, which run inside DDP and the distributed
    optimizer (Megatron's all-grads-sync and params-all-gather); nothing is touched below level 1."""
    if not timers.enabled or not isinstance(trainer.optimizer, DistributedOptimizer):
        return
    instrument(trainer.optimizer.model, "finish_grad_sync", timers("all-grads-sync", 1))
    instrument(trainer.optimizer, "_all_gather_params", timers("params-all-gather", 1))


def gradient_stats(optimizer, t: TrainingConfig) -> dict[str, torch.Tensor]:
    """--log-num-zeros-in-grad: the zero count of the gradients the step is about to use (on the device)."""
    return {"num-zeros": num_zeros_in_grad(optimizer)} if t.log_num_zeros_in_grad else {}


def line_stats(records: _Records, t: TrainingConfig) -> str:
    """Megatron's fields after the loss: loss scale, grad norm, num zeros, params norm."""
    last = records.last
    out = f" loss scale: 1.0 | grad norm: {last['grad-norm']:.3f} |"
    if t.log_num_zeros_in_grad and "num-zeros" in last:
        out += f" num zeros: {int(last['num-zeros'])} |"
    if t.log_params_norm and "params-norm" in last:
        out += f" params norm: {last['params-norm']:.3f} |"
    if records.last_stall is not None:
        out += f" update stall: {records.last_stall:.4f} |"
    return out


def log_interval_scalars(writer, t: TrainingConfig, iteration: int, elapsed: float, tokens_per_s: float,
                         tflops: float, timer_seconds: dict[str, float]) -> None:
    """The scalars of a log line: tokens-per-second; with --log-timers-to-tensorboard Megatron's
    iteration-time, throughput (with --log-throughput) and <timer>-time (seconds, max over ranks)."""
    if writer is None:
        return
    writer.add_scalar("tokens-per-second", tokens_per_s, iteration)
    if not t.log_timers_to_tensorboard:
        return
    writer.add_scalar("iteration-time", elapsed, iteration)
    if t.log_throughput:
        writer.add_scalar("throughput", tflops, iteration)
    for name, seconds in timer_seconds.items():
        writer.add_scalar(f"{name}-time", seconds, iteration)


def train(trainer, train_iterator: Iterator, valid_iterator: Iterator | None, state: TrainState,
          observer: Observer, writer=None) -> LoopResult:
    """Iterations from `state` to --train-iters (or a stop); checkpoints to --save when it is set."""
    cfg, model_chunks, optimizer, scheduler = trainer.cfg, trainer.model_chunks, trainer.optimizer, trainer.scheduler
    forward_backward_func, log = trainer.forward_backward, observer.log
    t, m = cfg.training, cfg.model
    num_microbatches = trainer.num_microbatches
    device = trainer.device
    # per sample: the iteration's batch changes under --rampup-batch-size
    shape = (1, m.seq_length, m.num_layers, m.hidden_size, model_chunks[0].vocab_size)
    flops_per_sample = flops_per_iteration(*shape, recomputed_fraction(m, cfg.parallel.pipeline_model_parallel_size),
                                           selective=m.recompute_granularity == "selective", **model_shape(m))
    model_flops_per_sample = flops_per_iteration(*shape, **model_shape(m))
    world = cfg.parallel.world_size
    peak = peak_bf16_tflops(device)
    sigterm = SigtermHandler(t.exit_signal_handler)
    records = _Records(state, writer, t, world)
    timers = Timers(t.timing_log_level, t.timing_log_option, device)  # level 0: no timers, no synchronisation
    attach_timers(trainer, timers)
    if t.timing_log_level >= 2:
        train_iterator = TimedIterator(train_iterator, timers("batch-generator", 2))
    fb_timer, step_timer = timers("forward-backward", 1), timers("optimizer", 1)
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
            fb_timer.start(barrier=t.barrier_with_level_1_timing)
            losses = forward_backward_func(model_chunks, train_iterator,
                                           trainer.num_microbatches_at(state.consumed_train_samples), False,
                                           step=state.iteration + 1)
            fb_timer.stop()
            observer.on_gradients(state.iteration + 1, trainer)
            reported = records.reports(state.iteration + 1)
            stats = gradient_stats(optimizer, t) if reported else {}
            interval = t.log_update_stall_interval  # the same iterations on every rank: it all-reduces
            stall = UpdateStallProbe(optimizer) if interval and (state.iteration + 1) % interval == 0 else None
            step_timer.start(barrier=t.barrier_with_level_1_timing)
            result = optimizer.step()
            step_timer.stop()
            if reported and t.log_params_norm:
                stats["params-norm"] = params_norm(optimizer)
            if stall is not None:
                stats[STALL] = stall.fraction(result.skipped_tensor)
            state.iteration += 1
            state.consumed_train_samples += trainer.global_batch_size_at(state.consumed_train_samples)
            loss = mean_loss(losses)
            observer.on_step(state.iteration, loss, result)
            records.add(state.iteration, lr, loss, result, stats, device)
            iters_in_window += 1
            if state.iteration % t.log_interval == 0:
                records.flush()  # the iteration's one host synchronisation, at log intervals only
                if not trainer.params_finite():
                    raise TrainingDiverged(f"iteration {state.iteration}: the weights hold NaN/Inf; stopping without "
                                           "a checkpoint")
                elapsed = (time.perf_counter() - timer) / iters_in_window
                batch = trainer.global_batch_size_of(state.iteration)
                tokens_per_s = batch * m.seq_length / elapsed
                tflops = batch * flops_per_sample / elapsed / 1e12 / world
                mfu = f"{100 * batch * model_flops_per_sample / elapsed / 1e12 / world / peak:.1f}%" if peak else "n/a"
                report = timers.collect(iters_in_window)  # a collective at level >= 1; empty at level 0
                throughput = (f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |" if t.log_throughput
                              else f" TFLOP/s per GPU: {tflops:.2f} |")
                log(f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {state.iteration:8d}/{t.train_iters:8d} |"
                    f" consumed samples: {state.consumed_train_samples:12d} |"
                    f" elapsed time per iteration (ms): {elapsed * 1000:.1f} |"
                    f" tokens per second: {tokens_per_s:.1f} |{throughput} MFU: {mfu} |"
                    f" learning rate: {lr:.6E} |"
                    f" global batch size: {trainer.global_batch_size_of(state.iteration):5d} |"
                    f" lm loss: {sum(records.window) / len(records.window):.6E} |{line_stats(records, t)}"
                    f" skipped iterations: {state.skipped_iters:3d} | {memory_report(device)} |"
                    + "".join("\n" + ln for ln in report.lines()))  # Megatron's timer report, after the line
                log_interval_scalars(writer, t, state.iteration, elapsed, tokens_per_s, tflops, report.max_seconds())
                records.window, iters_in_window = [], 0
                timer = time.perf_counter()
            if valid_iterator is not None and t.eval_interval and state.iteration % t.eval_interval == 0:
                vloss = evaluate(model_chunks, forward_backward_func, valid_iterator, t.eval_iters, num_microbatches,
                                 state.iteration)
                valid_losses.append((state.iteration, vloss))
                log_validation(observer, "validation", state.iteration, vloss, writer,
                               t.log_validation_ppl_to_tensorboard, state.consumed_train_samples)
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
    trainer.finish_param_sync()
    records.flush()
    return LoopResult(state, records.losses, valid_losses, reason)


def save(trainer, state: TrainState, observer: Observer) -> None:
    path = trainer.save(state)
    observer.log(f" saved checkpoint at iteration {state.iteration} to {path}")
