"""Weighted blends of datasets (`--data-path 0.7 A 0.3 B`), in megatron-core's BlendedDataset order."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from .gpt_dataset import INDEX_ALGORITHM_VERSION, load_cached_arrays, save_cached_arrays
from .megatron_order import build_blending_indices, normalize

__all__ = ["BlendedDataset", "build_blending_indices"]

BLEND_INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here, as megatron-core's
    BlendedDataset does). With cache_dir the two indices are cached, keyed by the parts' own cache keys
    (when they have them), the weights and the size."""

    def __init__(self, datasets: list, weights: list[float], size: int, cache_dir: str | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"a blend needs one positive weight per dataset, got {len(weights)} for {len(datasets)}")
        if any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        key = self._cache_key() if cache_dir else None
        loaded = load_cached_arrays(cache_dir, f"BlendedDataset_{key}", BLEND_INDEX_NAMES) if key else None
        if loaded is None:
            loaded = build_blending_indices(self.weights, self.size)
            self._check_parts_are_long_enough(loaded[0])
            if key:
                desc = {"order": "megatron-core BlendedDataset", "weights": self.weights, "size": self.size,
                        "datasets": [ds.cache_key for ds in datasets]}
                save_cached_arrays(cache_dir, f"BlendedDataset_{key}", dict(zip(BLEND_INDEX_NAMES, loaded)), desc)
        self.dataset_index, self.dataset_sample_index = loaded

    def _cache_key(self) -> str | None:
        parts = [getattr(ds, "cache_key", None) for ds in self.datasets]
        if any(p is None for p in parts):
            return None
        desc = {"version": INDEX_ALGORITHM_VERSION, "datasets": parts, "weights": [w.hex() for w in self.weights],
                "size": self.size}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]

    def _check_parts_are_long_enough(self, dataset_index: np.ndarray) -> None:
        draws = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (n, ds) in enumerate(zip(draws, self.datasets)):
            if n > len(ds):
                raise ValueError(f"blend needs {n} samples from dataset {d}, which has {len(ds)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
