"""Weighted blends of datasets (`--data-path 0.7 A 0.3 B`)."""
from __future__ import annotations

import numpy as np
import torch


def build_blending_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets so that after any n samples dataset d has contributed within one sample of
    weights[d] * n. The k-th sample of dataset d is placed at time (k + 0.5) / weights[d]; sorting all
    those times (ties by dataset) gives the order. Vectorised; no per-sample Python loop."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    times, dataset_ids, sample_ids = [], [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        k = np.arange(int(np.ceil(num_samples * w)) + 1, dtype=np.int64)
        times.append((k + 0.5) / w)
        dataset_ids.append(np.full(len(k), d, dtype=np.int16))
        sample_ids.append(k)
    t, ds, ks = np.concatenate(times), np.concatenate(dataset_ids), np.concatenate(sample_ids)
    order = np.lexsort((ds, t))[:num_samples]
    return ds[order], ks[order]


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list, weights: list[float], num_samples: int):
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, num_samples)
        for d, ds in enumerate(datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if len(used) and used.max() >= len(ds):
                raise ValueError(f"blend needs {used.max() + 1} samples from dataset {d}, which has {len(ds)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
