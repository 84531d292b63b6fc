"""The one-process checkpoint: one file holding everything a bitwise resume needs.

    SAVE/iter_0000010/mp_rank_00/model_optim_rng.pt

It holds the model chunks, the SRAdamW state (moments, step count = the SR stream's step, FP32
masters in bf16-mp), the RNG states, the iteration, consumed samples, skipped iterations and the
config. Written through layout.py's staging directory, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from .layout import (
    LATEST,
    SINGLE_FORMAT,
    TrainState,
    iteration_dir,
    load_file,
    my_mp_rank_dir,
    publish_iteration,
    read_latest_iteration,
    save_file,
    staging_dir,
)
from .rng import rng_state, set_rng_state


def checkpoint_file(iteration_directory: Path) -> Path:
    return iteration_directory / my_mp_rank_dir() / "model_optim_rng.pt"


def _model_state(model_chunks: list[nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].state_dict()}
    return {f"model{i}": m.state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(save_dir: str | Path, state: TrainState, model_chunks: list[nn.Module], optimizer,
                    config: dict) -> Path:
    """Write SAVE/iter_XXXXXXX atomically and point `latest` at it; returns the iteration directory."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = iteration_dir(root, state.iteration)
    tmp = staging_dir(final)
    try:
        payload = {"format": SINGLE_FORMAT, "checkpoint_version": 3.0, "iteration": state.iteration,
                   "consumed_train_samples": state.consumed_train_samples, "skipped_iters": state.skipped_iters,
                   **_model_state(model_chunks), "optimizer": optimizer.state_dict(),
                   "sr": {"seed": optimizer.seed, "step": optimizer.step_count},  # the SR stream position
                   "rng_state": rng_state(), "config": config}
        path = checkpoint_file(tmp)
        path.parent.mkdir(parents=True)
        save_file(payload, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_iteration(tmp, final, state.iteration)
    return final


def load_checkpoint(load_dir: str | Path, model_chunks: list[nn.Module], optimizer,
                    iteration: int | None = None, *, load_rng: bool = True) -> tuple[TrainState, dict] | None:
    """Restore model, optimizer (unless None) and RNG (unless not `load_rng`) from the latest (or the given)
    iteration; None when there is none yet."""
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
    if iteration is None:
        return None
    path = checkpoint_file(iteration_dir(load_dir, iteration))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint named by {LATEST} is missing")
    payload = load_file(path)
    if payload.get("format") != SINGLE_FORMAT:
        hint = (f"; a Megatron-LM checkpoint: convert it with tools/convert_checkpoint.py --from-megatron {load_dir} "
                "--save DIR" if "args" in payload else "")
        raise ValueError(f"{path}: not a megatron-sr checkpoint (format {payload.get('format')!r}){hint}")
    for key, model in zip(sorted(k for k in payload if k.startswith("model")), model_chunks):
        model.load_state_dict(payload[key])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if load_rng:
        set_rng_state(payload["rng_state"])
    state = TrainState(payload["iteration"], payload["consumed_train_samples"], payload["skipped_iters"])
    return state, payload["config"]
