"""Checkpoints: the only package that writes or reads checkpoint files.

- layout.py: directory and file names, format tags, the `latest` file, atomic writes, metadata, TrainState;
- rng.py: the random streams a bitwise resume restores;
- single.py: the one-process format (one file per iteration);
- sharded.py: one shard per rank (torchrun), loadable at any dp size and resharded at another tp/pp;
- convert.py: merge any layout to whole tensors and split them for another (tools/convert_checkpoint.py);
- export.py: the single-file model for inference (tools/generate.py);
- interop.py: our names, shapes and tp dims for a config, the qkv (un)fusing, a whole-model checkpoint to split;
- hf.py: Hugging Face GPT-2 / Llama export and import; megatron_legacy.py: Megatron-LM's legacy `torch`
  checkpoints in (tools/convert_checkpoint.py, docs/interop.md).

The trainer calls `save_checkpoint` / `load_checkpoint` below; the optimizer type picks the format.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..distributed.distributed_optimizer import DistributedOptimizer
from . import sharded, single
from .layout import LATEST, SINGLE_FILE, TrainState, iteration_dir, load_file, read_latest_iteration
from .rng import rng_state, set_rng_state

__all__ = ["LATEST", "TrainState", "save_checkpoint", "load_checkpoint", "read_latest_iteration"]


def save_checkpoint(save_dir: str | Path, state: TrainState, model_chunks: list[nn.Module], optimizer,
                    config: dict) -> Path:
    """Write iteration `state.iteration` (collective under torchrun); returns its directory."""
    if isinstance(optimizer, DistributedOptimizer):
        common = {"consumed_train_samples": state.consumed_train_samples, "skipped_iters": state.skipped_iters,
                  "config": config}
        return sharded.save_checkpoint(save_dir, state.iteration, model_chunks[0], optimizer, common=common,
                                       rank_state=rng_state())
    return single.save_checkpoint(save_dir, state, model_chunks, optimizer, config)


def saved_config(load_dir: str | Path) -> dict | None:
    """The training config saved with the latest checkpoint in `load_dir` (None without one), read without
    loading its tensors."""
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        return None
    directory = iteration_dir(load_dir, iteration)
    path = directory / ("common.pt" if (directory / "metadata.json").is_file() else SINGLE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint named by {LATEST} is missing")
    try:
        payload = load_file(path, mmap=True)
    except ValueError as exc:
        earlier = sorted(p.name for p in Path(load_dir).glob("iter_*") if p.is_dir() and p.name < directory.name)
        hint = (f"; the previous iteration here is {earlier[-1]} (write {int(earlier[-1][5:])} into {LATEST} to "
                "resume from it)" if earlier else "")
        raise ValueError(f"{exc}{hint}") from None
    return payload.get("config") if isinstance(payload, dict) else None


def load_checkpoint(load_dir: str | Path, model_chunks: list[nn.Module], optimizer, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> tuple[TrainState, dict] | None:
    """Restore the latest checkpoint of any format into the built model and optimizer: (state, saved config),
    or None when `load_dir` holds none yet. Without `load_optimizer` (--no-load-optim) the optimizer keeps its
    fresh state; without `load_rng` (--no-load-rng) the random generators keep theirs."""
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        return None
    if isinstance(optimizer, DistributedOptimizer) or (iteration_dir(load_dir, iteration) / "metadata.json").is_file():
        it, common, rank_state = sharded.load_checkpoint(load_dir, model_chunks[0], optimizer, iteration=iteration,
                                                         load_optimizer=load_optimizer)
        if rank_state is not None and load_rng:  # same layout: resume the random streams too
            set_rng_state(rank_state)
        return (TrainState(it, common.get("consumed_train_samples", 0), common.get("skipped_iters", 0)),
                common.get("config", {}))
    return single.load_checkpoint(load_dir, model_chunks, optimizer if load_optimizer else None, iteration,
                                  load_rng=load_rng)
