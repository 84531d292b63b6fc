"""pretrain(cfg): build the trainer (setup.py) -> load -> data iterators -> loop -> final validation and save.

The same path runs in one process and under torchrun at any tp x pp x dp layout.
"""

from __future__ import annotations

import math

from ..checkpoint import TrainState
from ..config import Config
from .iterators import build_iterators
from .loop import LoopResult, evaluate, log_validation, save, train
from .observer import Observer
from .setup import build


def tensorboard_writer(cfg: Config):
    if not cfg.training.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=cfg.training.tensorboard_dir)


def pretrain(cfg: Config, observer: Observer | None = None) -> LoopResult:
    observer = observer or Observer()
    trainer = build(cfg)
    state = TrainState()
    if cfg.training.load:
        loaded = trainer.load()
        if loaded is None:
            observer.log(f" WARNING: no checkpoint in {cfg.training.load}; training from scratch")
        else:
            state = loaded[0]
            observer.log(f" loaded checkpoint from {cfg.training.load} at iteration {state.iteration}")
    n_params = sum(p.numel() for m in trainer.model_chunks for p in m.parameters())
    observer.log(f" > {n_params / 1e6:.2f}M parameters, precision {cfg.optimizer.precision}, device {trainer.device}")
    train_it, valid_it, _ = build_iterators(cfg, state.consumed_train_samples)
    writer = tensorboard_writer(cfg)
    observer.on_train_start(trainer)
    result = train(trainer, train_it, valid_it, state, observer, writer)
    t = cfg.training
    if result.reason in ("done", "exit-duration"):
        if valid_it is not None and (not result.valid_losses or result.valid_losses[-1][0] != state.iteration):
            vloss = evaluate(trainer.model_chunks, trainer.forward_backward, valid_it, t.eval_iters,
                             trainer.num_microbatches)
            result.valid_losses.append((state.iteration, vloss))
            log_validation(observer, "validation", state.iteration, vloss, writer)
        if result.reason == "done" and t.save and not (t.save_interval and state.iteration % t.save_interval == 0):
            save(trainer, state, observer)
    if writer is not None:
        writer.close()
    if result.valid_losses:
        _, vloss = result.valid_losses[-1]
        observer.log(f" final validation loss {vloss:.4f}, perplexity {math.exp(min(vloss, 20.0)):.2f}")
    observer.on_train_end(trainer, result)
    return result
