"""What the training loop reports to: log lines and a few points of an iteration.

The default observer prints rank 0's log lines and does nothing else. Subclass it to record a run
or act at those points (the tests record grad norms and poison gradients here; a profiler or another
logger would plug in the same way) instead of patching the loop.
"""

from __future__ import annotations

import torch


class Observer:
    def log(self, message: str) -> None:
        """Rank 0's log lines go through here."""
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(message, flush=True)

    def on_train_start(self, trainer) -> None:
        """Before the first iteration (the checkpoint, if any, is loaded)."""

    def on_gradients(self, iteration: int, trainer) -> None:
        """After the forward and backward of `iteration` (1-based), before the optimizer step. Under DDP the last
        gradient collectives may still be in flight: `trainer.optimizer.model.finish_grad_sync()` completes them
        (the step would next; it is idempotent)."""

    def on_step(self, iteration: int, loss, result) -> None:
        """After the optimizer step of `iteration`. `loss` (a 0-d tensor) and `result` (its StepResult) are
        still on the device: reading their values synchronises, which the loop itself does at log intervals."""

    def on_train_end(self, trainer, result) -> None:
        """After the last iteration, the final validation and save; `result` is the LoopResult."""
