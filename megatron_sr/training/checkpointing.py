"""Checkpoints in Megatron's layout, written atomically, complete enough to resume bit for bit.

    SAVE/latest_checkpointed_iteration.txt          "10"
    SAVE/iter_0000010/mp_rank_00/model_optim_rng.pt (mp_rank_TT_PPP with pipeline parallelism)

model_optim_rng.pt holds the model chunks, the optimizer (states, step count = the SR stream's step,
FP32 masters in bf16-mp), the RNG states (torch CPU/CUDA, Python, NumPy, the tracked tp RNG), the
iteration, consumed samples, skipped iterations and the config. The iteration directory is written
under a temporary name and renamed; `latest` is replaced last, so a crash leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..parallel import parallel_state as ps
from ..parallel.random import get_rng_tracker

LATEST = "latest_checkpointed_iteration.txt"
FORMAT = "megatron_sr.single/1"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iters: int = 0


def mp_rank_name() -> str:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return f"mp_rank_{tp:02d}"
    return f"mp_rank_{tp:02d}_{pp:03d}"


def checkpoint_file(iteration_dir: Path) -> Path:
    return iteration_dir / mp_rank_name() / "model_optim_rng.pt"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])


def _model_state(model_chunks: list[nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].state_dict()}
    return {f"model{i}": m.state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(save_dir: str, state: TrainState, model_chunks: list[nn.Module], optimizer, config: dict) -> Path:
    """Write SAVE/iter_XXXXXXX atomically and point `latest` at it; returns the iteration directory."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{state.iteration:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    payload = {"format": FORMAT, "checkpoint_version": 3.0, "iteration": state.iteration,
               "consumed_train_samples": state.consumed_train_samples, "skipped_iters": state.skipped_iters,
               **_model_state(model_chunks), "optimizer": optimizer.state_dict(),
               "sr": {"seed": optimizer.seed, "step": optimizer.step_count},  # the SR stream position
               "rng_state": rng_state(), "config": config}
    path = checkpoint_file(tmp)
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    if final.exists():  # re-saving an iteration: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(str(state.iteration))
    os.replace(latest_tmp, root / LATEST)
    return final


def read_latest_iteration(load_dir: str) -> int | None:
    path = Path(load_dir) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, got {text!r}") from None


def load_checkpoint(load_dir: str, model_chunks: list[nn.Module], optimizer) -> tuple[TrainState, dict] | None:
    """Restore model, optimizer and RNG from the latest checkpoint; None when there is none yet."""
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        return None
    if (Path(load_dir) / f"iter_{iteration:07d}" / "metadata.json").is_file():
        # A sharded checkpoint (torchrun runs, tools/convert_checkpoint.py): megatron_sr.distributed.checkpoint.
        from ..distributed.checkpoint import load_checkpoint as load_sharded

        it, common, rank_state = load_sharded(load_dir, model_chunks[0], optimizer, iteration=iteration)
        if rank_state is not None:
            set_rng_state(rank_state)
        return TrainState(it, common.get("consumed_train_samples", 0), common.get("skipped_iters", 0)), \
            common.get("config", {})
    path = checkpoint_file(Path(load_dir) / f"iter_{iteration:07d}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint named by {LATEST} is missing")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a megatron-sr checkpoint (format {payload.get('format')!r})")
    for key, model in zip(sorted(k for k in payload if k.startswith("model")), model_chunks):
        model.load_state_dict(payload[key])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng_state"])
    state = TrainState(payload["iteration"], payload["consumed_train_samples"], payload["skipped_iters"])
    return state, payload["config"]
