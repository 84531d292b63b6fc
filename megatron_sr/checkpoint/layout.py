"""The checkpoint directory: Megatron's names, the format tags, the `latest` file, atomic writes, the train state.

    SAVE/latest_checkpointed_iteration.txt                 "10"
    SAVE/iter_0000010/mp_rank_TT[_PPP]/...                 one directory per (tp, pp) rank (PPP with pp > 1)

Every checkpoint file is written under a temporary name and renamed; an iteration directory is filled
under a temporary name and renamed in (an existing one is moved aside first and deleted only after the
rename); `latest` is replaced last. A crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..parallel import parallel_state as ps

LATEST = "latest_checkpointed_iteration.txt"
SINGLE_FORMAT = "megatron_sr.single/1"  # one process: SAVE/iter_X/mp_rank_00/model_optim_rng.pt (single.py)
SHARDED_FORMAT = "megatron_sr.checkpoint/1"  # a shard per rank plus metadata.json (sharded.py)
EXPORT_FORMAT = "megatron_sr.export/1"  # one file with the whole model, for inference (export.py)
SINGLE_FILE = "mp_rank_00/model_optim_rng.pt"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iters: int = 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def mp_rank_dir(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's name: mp_rank_TT without pipeline parallelism, mp_rank_TT_PPP with it."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def my_mp_rank_dir() -> str:
    """This process's mp_rank directory name, from parallel_state."""
    return mp_rank_dir(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                       ps.get_pipeline_model_parallel_world_size())


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (a full disk, a quota): the message names the file and the space."""


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_file(obj: Any, path: Path) -> None:
    """torch.save, with a failure (torch reports a full disk as a RuntimeError) as one CheckpointWriteError
    line naming the file, the bytes it needed and the bytes free; the partial file is removed."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as exc:
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:80])
        raise CheckpointWriteError(f"{path}: cannot write the checkpoint ({reason}): it needs about "
                                   f"{_tensor_bytes(obj) / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free; "
                                   "nothing of this save is kept, the previous checkpoint is") from None


def load_file(path: str | Path, *, mmap: bool = False) -> Any:
    """torch.load of a checkpoint file onto the CPU; a truncated or corrupt file (torch's error names no file)
    is one ValueError line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0][:100] or type(exc).__name__
        raise ValueError(f"{path}: unreadable checkpoint file, truncated or corrupt ({reason})") from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def staging_dir(final: Path) -> Path:
    """The temporary name an iteration directory is filled under (emptied if a crash left one)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_iteration(tmp: Path, final: Path, iteration: int) -> None:
    """Rename the filled `tmp` to `final` (re-saving an iteration replaces it) and point `latest` at it."""
    if final.exists():  # move the old one aside first: `latest` may name it until the new one is in place
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(str(iteration), final.parent / LATEST)


def read_latest_iteration(root: str | Path) -> int | None:
    """The iteration `latest` names (Megatron's "release" reads as 0), None when there is no `latest` file."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def resolve_iteration_dir(path: str | Path) -> Path:
    """An iter_XXXXXXX directory as given, or the one a root's `latest` file names."""
    path = Path(path)
    if (path / "metadata.json").exists() or (path / SINGLE_FILE).exists():
        return path
    iteration = read_latest_iteration(path)
    if iteration is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint iteration directory nor a root with {LATEST}")
    return iteration_dir(path, iteration)


def read_metadata(directory: Path) -> dict:
    path = directory / "metadata.json"
    if not path.exists() and (directory / SINGLE_FILE).exists():  # saved by a one-process run
        return {"format": SHARDED_FORMAT, "iteration": int(directory.name.split("_")[-1]), "tp": 1, "pp": 1, "dp": 1,
                "distributed_optimizer": False, "single_process": True}
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a megatron-sr checkpoint (no metadata.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{path}: expected format {SHARDED_FORMAT}, got {meta.get('format')!r}")
    return meta


def recover_directory(root: str | Path) -> list[str]:
    """Clean up after a run killed while saving into `root`; returns what was done (for the log).

    A staging directory (.iter_X.tmp) or temporary file (*.tmp) is an unfinished write: removed. An
    old iteration moved aside (.iter_X.old) while its replacement was renamed in is removed when the
    replacement is there, and put back when it is not (the kill fell between the two renames)."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".iter_") and path.name.endswith(".old") and path.is_dir():
            final = root / path.name[1:-len(".old")]
            if final.exists():
                shutil.rmtree(path)
                done.append(f"removed {path} (replaced by {final.name})")
            else:
                os.replace(path, final)
                done.append(f"restored {final} from {path.name} (a save was interrupted while replacing it)")
        elif path.name.endswith(".tmp") and path.name.lstrip(".").startswith(("iter_", LATEST)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            done.append(f"removed {path} (left by an interrupted save)")
    return done


def describe(root: str | Path | None) -> tuple[int | None, str | None]:
    """(latest iteration, None) of a checkpoint root; (None, why) when it holds no loadable checkpoint."""
    if not root:
        return None, "not given"
    path = Path(root)
    if path.is_file():
        return None, "is a file, not a checkpoint directory"
    if not path.exists():
        return None, "does not exist"
    try:
        iteration = read_latest_iteration(path)
    except ValueError as exc:
        return None, str(exc)
    if iteration is None:
        return None, f"holds no {LATEST}"
    if not iteration_dir(path, iteration).is_dir():
        return None, f"{LATEST} names iteration {iteration}, whose directory is missing"
    return iteration, None
