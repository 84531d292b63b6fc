"""The single-file model for inference: whole tensors by global name, the training config, the iteration.

Written by `tools/convert_checkpoint.py --export` and read by `tools/generate.py`:
- `model.safetensors` (any .safetensors name): tensors, and metadata {"format", "iteration", "config" (JSON)};
- any other name: a torch file {"format", "model", "iteration", "config"}.
A Hugging Face directory (transformers' names and config.json) is hf.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .convert import FullModel, export_tensors, padded_vocab_for, read_full_checkpoint, repad_vocab
from .layout import EXPORT_FORMAT, LATEST, SINGLE_FILE, load_file


def _jsonable_config(common: dict):
    config = common.get("config") if isinstance(common, dict) else None
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def write_export(full: FullModel, path: Path) -> str:
    """Write the full model to `path` atomically; returns the format used ("safetensors" or "torch")."""
    tensors = export_tensors(full)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": EXPORT_FORMAT, "iteration": str(full.iteration),
                "config": json.dumps(_jsonable_config(full.common))}
        save_file(tensors, str(tmp), metadata=meta)
        kind = "safetensors"
    else:
        torch.save({"format": EXPORT_FORMAT, "model": tensors, "iteration": full.iteration,
                    "config": _jsonable_config(full.common)}, tmp)
        kind = "torch"
    os.replace(tmp, path)
    return kind


def read_export(path: Path) -> dict:
    """{"model", "config", "iteration"} of an exported file; ValueError for anything else."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            payload = {"model": {k: f.get_tensor(k) for k in f.keys()}, "format": meta.get("format"),
                       "config": json.loads(meta.get("config", "null")), "iteration": int(meta.get("iteration", 0))}
    else:
        payload = load_file(path)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a model exported by convert_checkpoint.py (format {EXPORT_FORMAT})")
    if not payload.get("config"):
        raise ValueError(f"{path}: the exported file holds no training config to build the model from")
    return payload


def read_model(load: str | Path) -> dict:
    """{"model", "config", "iteration"} of a tp = 1 model from an exported file or a checkpoint of any layout."""
    path = Path(load)
    if path.is_file():
        return read_export(path)
    if not (path / LATEST).is_file() and not (path / "metadata.json").is_file() and not (path / SINGLE_FILE).is_file():
        raise FileNotFoundError(f"{load}: no {LATEST} (not a checkpoint directory)")
    full = read_full_checkpoint(path)
    padded = padded_vocab_for(full.common, 1)
    if padded is not None:
        repad_vocab(full, padded)
    return {"model": export_tensors(full), "config": full.common.get("config"), "iteration": full.iteration}
