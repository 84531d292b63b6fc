"""Linear warm-up, then cosine or linear decay to min_lr (Megatron's OptimizerParamScheduler, iteration-based)."""

from __future__ import annotations

import math


class LRScheduler:
    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "cosine"):
        if decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr decay style must be cosine, linear or constant, got {decay_style!r}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, max(decay_iters, 1), decay_style

    def lr_at(self, iteration: int) -> float:
        """LR of iteration `iteration` (1-based: the first update uses lr_at(1), so warm-up never wastes a step)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        ratio = (iteration - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            coeff = 1.0 - ratio
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, iteration: int) -> float:
        lr = self.lr_at(iteration)
        self.optimizer.lr = lr
        return lr
