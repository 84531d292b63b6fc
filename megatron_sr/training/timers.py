"""Megatron's timers: named, levelled wall-clock timers, summed over a log interval and reported over ranks.

    timers = Timers(level=cfg.training.timing_log_level, option="minmax", device=device)
    with timers("forward-backward", 1):
        ...
    report = timers.collect()          # at a log line, on every rank (one small all-gather)
    report.lines()                     # "(min, max) time across ranks (ms):" and one line per timer
    report.max_seconds()               # {name: max over ranks, seconds per iteration}: the "<name>-time" scalars

A timer whose level is above --timing-log-level is a no-op that never touches the device: with the default
level 0 there are no timers at all, and the loop keeps its one host synchronisation per log interval. A
live timer synchronises the device when it starts and stops (on CUDA: torch.cuda.synchronize), so that it
measures the work, not its launch; `barrier=True` also waits for every rank first (Megatron's
--no-barrier-with-level-1-timing turns that off).

`instrument(obj, "method", timer)` times every call of a method of one object (the data-parallel gradient
sync and the distributed optimizer's parameter all-gather, which the loop does not call itself).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Megatron's names and levels; the order is the order of the report.
TIMER_LEVELS = {"forward-backward": 1, "all-grads-sync": 1, "params-all-gather": 1, "optimizer": 1,
                "batch-generator": 2}


class _NullTimer:
    """A timer below the timing level: costs nothing."""

    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_NULL = _NullTimer()


class Timer:
    """Sums the time between start() and stop() (seconds) until `take()` reads and resets it."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.elapsed, self._started = 0.0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, barrier: bool = False) -> None:
        if self._started is not None:
            raise RuntimeError(f"timer {self.name} started twice")
        if barrier and dist.is_initialized():
            dist.barrier()
        self._sync()
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is None:
            raise RuntimeError(f"timer {self.name} stopped without a start")
        self._sync()
        self.elapsed += time.perf_counter() - self._started
        self._started = None

    def take(self) -> float:
        value, self.elapsed = self.elapsed, 0.0
        return value

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class TimerReport:
    """Seconds per iteration of each timer on each rank (ranks where a timer never ran hold 0)."""

    option: str  # max, minmax or all
    per_rank: dict[str, list[float]]

    def max_seconds(self) -> dict[str, float]:
        return {name: max(values) for name, values in self.per_rank.items()}

    def lines(self) -> list[str]:
        """Megatron's report, in milliseconds per iteration."""
        if not self.per_rank:
            return []
        if self.option == "all":
            out = ["times across ranks (ms):"]
            for name, values in self.per_rank.items():
                out.append(f"  {name}:")
                out += [f"     rank {rank:2d}: {1000 * v:.2f}" for rank, v in enumerate(values) if v > 0]
            return out
        out = ["max time across ranks (ms):" if self.option == "max" else "(min, max) time across ranks (ms):"]
        for name, values in self.per_rank.items():
            ran = [1000 * v for v in values if v > 0]
            shown = f"{max(ran):.2f}" if self.option == "max" else f"({min(ran):.2f}, {max(ran):.2f})"
            out.append(f"    {(name + ' ').ljust(48, '.')}: {shown}")
        return out


class Timers:
    def __init__(self, level: int, option: str, device: torch.device):
        self.level, self.option, self.device = level, option, device
        self._timers: dict[str, Timer] = {}

    @property
    def enabled(self) -> bool:
        return self.level > 0

    def __call__(self, name: str, level: int) -> Timer | _NullTimer:
        if level > self.level:
            return _NULL
        if name not in self._timers:
            self._timers[name] = Timer(name, self.device)
        return self._timers[name]

    def collect(self, iterations: int) -> TimerReport:
        """Every rank's timers, divided by `iterations`, then reset. A collective: all ranks call it, at the
        same log line (the names gathered are the fixed list of the level, so every rank sends as many)."""
        names = [n for n, level in TIMER_LEVELS.items() if level <= self.level]
        mine = [self._timers[n].take() / iterations if n in self._timers else 0.0 for n in names]
        rows = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            local = torch.tensor(mine, dtype=torch.float64, device=self._gather_device())
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            rows = torch.stack(gathered).tolist()
        per_rank = {n: [row[i] for row in rows] for i, n in enumerate(names)}
        return TimerReport(self.option, {n: v for n, v in per_rank.items() if any(x > 0 for x in v)})

    def _gather_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def instrument(obj, method: str, timer: Timer | _NullTimer) -> None:
    """Time every call of `obj.method` (this object only). The method must exist: a renamed method would
    otherwise drop out of the report unnoticed."""
    original = getattr(obj, method)  # AttributeError names the method

    @functools.wraps(original)
    def timed(*args, **kwargs):
        timer.start()
        try:
            return original(*args, **kwargs)
        finally:
            timer.stop()

    setattr(obj, method, timed)


class TimedIterator:
    """Times each next() of a data iterator (Megatron's batch-generator, level 2)."""

    def __init__(self, iterator, timer: Timer | _NullTimer):
        self.iterator, self.timer = iterator, timer

    def __iter__(self):
        return self

    def __next__(self):
        self.timer.start()
        try:
            return next(self.iterator)
        finally:
            self.timer.stop()
