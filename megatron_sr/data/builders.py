"""build_gpt_datasets: Megatron's --data-path / --split into train, valid and test datasets, as megatron-core's
BlendedMegatronDatasetBuilder makes them for pretrain_gpt.py (same documents, samples and order)."""
from __future__ import annotations

import math

from .blended import BlendedDataset
from .gpt_dataset import GPTDataset, GPTIndexConfig
from .indexed_dataset import IndexedDataset
from .megatron_order import MID_LEVEL_DATASET_SURPLUS, blend_sample_counts, normalize, split_boundaries

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """["PREFIX"], ["A", "B"] (weighted by their samples in one epoch) or ["0.7", "A", "0.3", "B"]; a string is
    split on spaces."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    if not data_path:
        raise ValueError("--data-path: expected at least one prefix")
    try:
        float(data_path[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return list(data_path), None
    if len(data_path) % 2:
        raise ValueError(f"--data-path: expected weight/prefix pairs, got {len(data_path)} items")
    weights, prefixes = [], []
    for w, p in zip(data_path[0::2], data_path[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise ValueError(f"--data-path: {w!r} is not a weight (expected weight/prefix pairs)") from None
        prefixes.append(p)
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path: weights must be non-negative with a positive sum, got {weights}")
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """'969,30,1' or '98/2/0' into three normalised fractions."""
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split: expected up to three numbers like 969,30,1, got {split!r}") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--split: expected up to three non-negative numbers, got {split!r}")
    return normalize(values + [0.0] * (3 - len(values)))


def _build_one_prefix(prefix: str, fractions, seq_length, seed, num_samples, cache_dir):
    """The split datasets of one prefix; num_samples[i] None builds one epoch, 0 builds nothing (None)."""
    indexed = IndexedDataset(prefix)
    bounds = split_boundaries(fractions, len(indexed))
    out = []
    for i, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples)):
        lo, hi = bounds[i], bounds[i + 1]
        if hi <= lo or n == 0:
            out.append(None)
            continue
        cfg = GPTIndexConfig(seq_length=seq_length, seed=seed, num_samples=None if n is None else int(n))
        out.append(GPTDataset(indexed, lo, hi, cfg, cache_dir=cache_dir, name=name))
    return out


def _weighted_blend(prefixes, weights, fractions, seq_length, seed, num_samples, cache_dir):
    """Each prefix's splits built with its share of every split plus 0.5%; each blend is as long as the
    shares (rounded up) add up to."""
    weights = normalize(weights)
    shares = [blend_sample_counts(weights, n) for n in num_samples]
    built = [blend_sample_counts(weights, n, MID_LEVEL_DATASET_SURPLUS) for n in num_samples]
    per_prefix = [_build_one_prefix(p, fractions, seq_length, seed, [built[i][d] for i in range(3)], cache_dir)
                  for d, p in enumerate(prefixes)]
    result = []
    for i in range(3):
        parts = [(ds[i], w) for ds, w in zip(per_prefix, weights) if ds[i] is not None]
        if num_samples[i] <= 0 or not parts:
            result.append(None)
            continue
        size = sum(shares[i][d] for d, ds in enumerate(per_prefix) if ds[i] is not None)
        result.append(BlendedDataset([p for p, _ in parts], [w for _, w in parts], size, cache_dir=cache_dir))
    return tuple(result)


def _unweighted_blend(prefixes, fractions, seq_length, seed, num_samples, cache_dir):
    """One epoch of each prefix's splits, weighted by their sample counts; a blend holds at most the sum."""
    per_prefix = [_build_one_prefix(p, fractions, seq_length, seed, [None if n > 0 else 0 for n in num_samples],
                                    cache_dir) for p in prefixes]
    result = []
    for i, name in enumerate(SPLIT_NAMES):
        parts = [ds[i] for ds in per_prefix if ds[i] is not None and len(ds[i]) > 0]
        if num_samples[i] <= 0 or not parts:
            result.append(None)
            continue
        available = sum(len(p) for p in parts)
        if name == "train" and available < num_samples[i]:
            raise ValueError(f"--data-path without weights blends one epoch of each prefix: its train split holds "
                             f"{available} samples, fewer than the {num_samples[i]} asked for (give weights, "
                             f"e.g. --data-path 0.5 A 0.5 B, to draw more epochs)")
        result.append(BlendedDataset(parts, [len(p) for p in parts], min(num_samples[i], available),
                                     cache_dir=cache_dir))
    return tuple(result)


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None):
    """(train, valid, test): datasets of {"tokens": LongTensor[seq_length + 1]} holding megatron-core's samples
    in its order, or None for a split that is empty or asked for 0 samples. The train dataset holds at
    least the samples asked for; valid and test too, except for a blend without weights (one epoch each).
    cache_dir=None builds the indices in memory and writes nothing."""
    if len(num_samples) != 3:
        raise ValueError(f"num_samples: expected (train, valid, test), got {num_samples}")
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    if weights is not None:
        kept = [(p, w) for p, w in zip(prefixes, weights) if w > 0]  # megatron-core refuses zero weights
        return _weighted_blend([p for p, _ in kept], [w for _, w in kept], fractions, seq_length, seed,
                               num_samples, cache_dir)
    if len(prefixes) == 1:
        return tuple(_build_one_prefix(prefixes[0], fractions, seq_length, seed, num_samples, cache_dir))
    return _unweighted_blend(prefixes, fractions, seq_length, seed, num_samples, cache_dir)
