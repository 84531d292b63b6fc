"""build_gpt_datasets: Megatron's --data-path / --split into train, valid and test datasets."""
from __future__ import annotations

import math

import numpy as np

from .blended import BlendedDataset
from .gpt_dataset import GPTDataset, GPTIndexConfig
from .indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
BLEND_MARGIN = 1.005  # each blended dataset is built a little larger than its share (as Megatron does)


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """["PREFIX"], ["A", "B"] (weighted by tokens) or ["0.7", "A", "0.3", "B"]; a string is split on spaces."""
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
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_boundaries(fractions: list[float], num_documents: int) -> list[int]:
    """Document boundaries [0, a, b, num_documents] (Megatron's rounding, last boundary pinned)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    diff = bounds[-1] - num_documents
    return [0] + [b - diff for b in bounds[1:]]


def _build_one_prefix(prefix: str, fractions, seq_length, seed, num_samples, cache_dir):
    indexed = IndexedDataset(prefix)
    bounds = split_boundaries(fractions, len(indexed))
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        lo, hi = bounds[i], bounds[i + 1]
        if hi <= lo or num_samples[i] <= 0:
            out.append(None)
            continue
        cfg = GPTIndexConfig(seq_length=seq_length, seed=seed, num_samples=int(num_samples[i]))
        out.append(GPTDataset(indexed, lo, hi, cfg, cache_dir=cache_dir, name=name))
    return out, indexed


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None):
    """(train, valid, test): datasets of {"tokens": LongTensor[seq_length + 1]}, each at least as long as
    requested, or None for a split that is empty or asked for 0 samples. Deterministic for a seed.
    cache_dir=None builds the indices in memory (seconds even for 100M tokens) and writes nothing."""
    if len(num_samples) != 3:
        raise ValueError(f"num_samples: expected (train, valid, test), got {num_samples}")
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    if len(prefixes) == 1:
        datasets, _ = _build_one_prefix(prefixes[0], fractions, seq_length, seed, num_samples, cache_dir)
        return tuple(datasets)
    if weights is None:
        weights = [float(IndexedDataset(p).num_tokens) for p in prefixes]
    weights = list(np.asarray(weights) / np.sum(weights))
    per_prefix = []
    for prefix, w in zip(prefixes, weights):
        wanted = tuple(int(math.ceil(n * w * BLEND_MARGIN)) + 1 if n > 0 and w > 0 else 0 for n in num_samples)
        datasets, _ = _build_one_prefix(prefix, fractions, seq_length, seed, wanted, cache_dir)
        per_prefix.append(datasets)
    result = []
    for i in range(3):
        parts = [(d[i], w) for d, w in zip(per_prefix, weights) if d[i] is not None and w > 0]
        if num_samples[i] <= 0 or not parts:
            result.append(None)
            continue
        result.append(BlendedDataset([p for p, _ in parts], [w for _, w in parts], int(num_samples[i])))
    return tuple(result)
