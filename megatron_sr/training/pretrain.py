"""pretrain(cfg): build the trainer (setup.py) -> load -> data iterators -> loop -> final validation and save.

The same path runs in one process and under torchrun at any tp x pp x dp layout.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import TrainState, saved_config
from ..checkpoint.layout import describe, recover_directory
from ..config import Config, apply_checkpoint_args, resume_differences
from ..model.transformer import quant_scheme
from .iterators import build_iterators
from .loggers import ScalarWriter, build_writer
from .loop import LoopResult, evaluate, log_validation, save, train
from .observer import Observer
from .setup import build


def tensorboard_writer(cfg: Config) -> ScalarWriter | None:
    """The scalar writer of --tensorboard-dir / --wandb-project, on the last rank (training/loggers.py)."""
    return build_writer(cfg)


def _writable_dir(path: str, flag: str) -> None:
    """--save and friends are checked before any training, not at the first write hours later."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file, expected a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def check_directories(cfg: Config, observer: Observer) -> None:
    """Before training: output directories writable, leftovers of killed saves cleaned up, and no resume
    that would overwrite a later checkpoint in --save (a --load typo must not destroy a run)."""
    t = cfg.training
    first = not dist.is_initialized() or dist.get_rank() == 0
    for path, flag in ((t.save, "--save"), (t.tensorboard_dir, "--tensorboard-dir"),
                       (cfg.data.data_cache_path, "--data-cache-path")):
        if path and first:
            _writable_dir(path, flag)
    if first:
        for root in dict.fromkeys(r for r in (t.load, t.save) if r):
            for done in recover_directory(root):
                observer.log(f" {done}")
    if dist.is_initialized():
        dist.barrier()
    loaded, why = describe(t.load)
    if t.load and Path(t.load).is_file():
        raise ValueError(f"--load {t.load}: {why}")
    saved, _ = describe(t.save)
    if saved is None or t.overwrite_checkpoints:
        return
    same = t.load and Path(t.load).resolve() == Path(t.save).resolve()
    if t.finetune and loaded is not None:  # training restarts at iteration 0, wherever the weights come from
        loaded, same = 0, False
    if loaded is None:
        raise ValueError(f"--load {t.load or '(not given)'}: {why}, but --save {t.save} holds a checkpoint at "
                         f"iteration {saved}; training from scratch would overwrite it. Resume with --load {t.save}, "
                         "or pass --overwrite-checkpoints to start over")
    if not same and saved > loaded:
        raise ValueError(f"--save {t.save} holds iteration {saved}, later than iteration {loaded} of --load {t.load}; "
                         "training on would overwrite it and move its latest back. Use another --save, or pass "
                         "--overwrite-checkpoints")


def check_resume_config(cfg: Config, observer: Observer) -> None:
    """The model --load holds must be the one this run builds; other changed settings are listed."""
    saved = saved_config(cfg.training.load)
    if not saved:
        return
    shape, other = resume_differences(saved, cfg)
    if shape:
        raise ValueError(f"--load {cfg.training.load}: the checkpoint's model differs from this run's: "
                         + "; ".join(shape))
    if other:
        observer.log(f" resuming with changed settings: {'; '.join(other)}")


def checkpoint_args(cfg: Config, observer: Observer) -> None:
    """--exit-on-missing-checkpoint and --use-checkpoint-args, before the model is built."""
    t = cfg.training
    if not t.load or not (t.use_checkpoint_args or t.exit_on_missing_checkpoint):
        return
    saved = saved_config(t.load) if Path(t.load).is_dir() else None
    if saved is None and t.exit_on_missing_checkpoint:
        raise ValueError(f"--load {t.load}: no checkpoint there (--exit-on-missing-checkpoint)")
    if saved is not None and t.use_checkpoint_args:
        changed = apply_checkpoint_args(cfg, saved)
        observer.log(f" --use-checkpoint-args: the model of {t.load}"
                     + (f" ({'; '.join(changed)})" if changed else " (the command line's already)"))


def pretrain(cfg: Config, observer: Observer | None = None) -> LoopResult:
    observer = observer or Observer()
    for note in dict.fromkeys(cfg.notes):  # once each
        observer.log(f" {note}")
    checkpoint_args(cfg, observer)
    trainer = build(cfg)
    check_directories(cfg, observer)
    state = TrainState()
    if cfg.training.load:
        check_resume_config(cfg, observer)
        loaded = trainer.load()
        if loaded is None:
            observer.log(f" WARNING: no checkpoint in {cfg.training.load}; training from scratch")
        else:
            state = loaded[0]
            observer.log(f" loaded checkpoint from {cfg.training.load} at iteration {state.iteration}")
    n_params = sum(p.numel() for m in trainer.model_chunks for p in m.parameters())
    observer.log(f" > {n_params / 1e6:.2f}M parameters, precision {cfg.optimizer.precision}, device {trainer.device}")
    scheme = quant_scheme(cfg.model, cfg.training.seed)
    if scheme is not None:
        observer.log(f" > quantization points of the linear layers: {scheme.describe()}")
    if cfg.training.load and state.iteration == 0 and cfg.training.finetune:
        observer.log(" --finetune: the weights only; iteration, optimizer and random generators start afresh")
    train_it, valid_it, _ = build_iterators(cfg, state.consumed_train_samples)
    if train_it is None:
        raise ValueError(f"--split {cfg.data.split}: the training split holds no samples")
    if valid_it is None and cfg.training.eval_iters > 0:  # never a silently skipped validation
        raise ValueError(f"--split {cfg.data.split} leaves the validation split of --data-path "
                         f"{' '.join(cfg.data.data_path or [])} empty (one document, or a 0 valid share): give "
                         "validation a share of several documents, or --eval-iters 0 for no validation")
    writer = tensorboard_writer(cfg)
    observer.on_train_start(trainer)
    result = train(trainer, train_it, valid_it, state, observer, writer)
    t = cfg.training
    if result.reason in ("done", "exit-duration"):
        if valid_it is not None and (not result.valid_losses or result.valid_losses[-1][0] != state.iteration):
            vloss = evaluate(trainer.model_chunks, trainer.forward_backward, valid_it, t.eval_iters,
                             trainer.num_microbatches, state.iteration)
            result.valid_losses.append((state.iteration, vloss))
            log_validation(observer, "validation", state.iteration, vloss, writer,
                           t.log_validation_ppl_to_tensorboard, state.consumed_train_samples)
        if result.reason == "done" and t.save and not (t.save_interval and state.iteration % t.save_interval == 0):
            save(trainer, state, observer)
    if writer is not None:
        writer.close()
    if result.valid_losses:
        _, vloss = result.valid_losses[-1]
        ppl = math.exp(min(vloss, 20.0)) if math.isfinite(vloss) else float("nan")
        observer.log(f" final validation loss {vloss:.4f}, perplexity {ppl:.2f}")
    observer.on_train_end(trainer, result)
    return result
