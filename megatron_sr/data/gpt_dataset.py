"""GPT samples over a range of documents of an indexed dataset, in megatron-core's GPTDataset order.

Three indices (built by megatron_order.build_gpt_indices, cached as .npy when asked):
- document index: the documents of all epochs, shuffled (the last epoch on its own when it is separate);
- sample index [num_samples + 1, 2]: (position in the document index, token offset) where sample i
  starts; sample i runs to the start of sample i + 1 inclusive, i.e. seq_length + 1 tokens;
- shuffle index: a permutation of the samples.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .indexed_dataset import IndexedDataset
from .megatron_order import build_gpt_indices

# Part of every cache key: bump when the index construction changes. 2: megatron-core's order (1 was the
# project's own, with per-epoch shuffles and another RNG; its cache files are never read again).
INDEX_ALGORITHM_VERSION = 2


@dataclass(frozen=True)
class GPTIndexConfig:
    seq_length: int
    seed: int
    num_samples: int | None  # requested (the dataset holds at least this many); None: one epoch


def index_cache_key(dataset: IndexedDataset, documents: np.ndarray, cfg: GPTIndexConfig) -> str:
    """Changes when anything the indices depend on changes: the document lengths, the document
    range, the sequence length, the seed, the requested samples, the algorithm."""
    h = hashlib.sha256()
    desc = {"version": INDEX_ALGORITHM_VERSION, "seq_length": cfg.seq_length, "seed": cfg.seed,
            "num_samples": cfg.num_samples, "num_sequences": len(dataset),
            "documents": [int(documents[0]), int(documents[-1]) + 1] if len(documents) else [0, 0]}
    h.update(json.dumps(desc, sort_keys=True).encode())
    h.update(np.ascontiguousarray(dataset.sequence_lengths).tobytes())
    return h.hexdigest()[:32]


def cache_paths(cache_dir: str, base: str, names: tuple[str, ...]) -> dict[str, str]:
    stem = os.path.join(cache_dir, base)
    return {k: f"{stem}_{k}.npy" for k in names} | {"description": f"{stem}_description.json"}


def load_cached_arrays(cache_dir: str, base: str, names: tuple[str, ...]):
    """The arrays memory-mapped, or None unless the whole set (description included) is there."""
    paths = cache_paths(cache_dir, base, names)
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    return tuple(np.load(paths[k], mmap_mode="r") for k in names)


def save_cached_arrays(cache_dir: str, base: str, arrays: dict[str, np.ndarray], description: dict) -> None:
    """Every file goes through a temporary name; the description is written last and marks the set
    complete. Ranks racing to build write identical files, so the race is harmless."""
    os.makedirs(cache_dir, exist_ok=True)
    paths = cache_paths(cache_dir, base, tuple(arrays))
    suffix = f".tmp{os.getpid()}"
    for key, arr in arrays.items():
        with open(paths[key] + suffix, "wb") as f:
            np.save(f, arr)
        os.replace(paths[key] + suffix, paths[key])
    with open(paths["description"] + suffix, "w") as f:
        json.dump(description, f, indent=1)
    os.replace(paths["description"] + suffix, paths["description"])


INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens over documents [doc_begin, doc_end) of one indexed dataset.
    Documents are the dataset's sequences (one sequence per document, as preprocess_data writes)."""

    def __init__(self, indexed: IndexedDataset, doc_begin: int, doc_end: int, cfg: GPTIndexConfig,
                 cache_dir: str | None = None, name: str = "train"):
        self.indexed, self.cfg, self.name = indexed, cfg, name
        self.documents = np.arange(doc_begin, doc_end, dtype=np.int64)
        if len(self.documents) == 0:
            raise ValueError(f"{indexed.path_prefix}: {name} split has no documents")
        if cfg.seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {cfg.seq_length}")
        self.cache_key = index_cache_key(indexed, self.documents, cfg)
        loaded = self._load_cache(cache_dir) if cache_dir else None
        if loaded is None:
            loaded = self._build()
            if cache_dir:
                self._save_cache(cache_dir, *loaded)
        self.document_index, self.sample_index, self.shuffle_index = loaded

    def _build(self):
        lengths = self.indexed.sequence_lengths[self.documents].astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch < 2:
            raise ValueError(f"{self.indexed.path_prefix}: {self.name} split has fewer than 2 tokens")
        cfg = self.cfg
        if self.name == "train" and tokens_per_epoch < cfg.seq_length + 1:  # every sample would repeat it
            raise ValueError(f"{self.indexed.path_prefix}: the train split holds {tokens_per_epoch} tokens, fewer "
                             f"than one sample of --seq-length {cfg.seq_length} + 1")
        return build_gpt_indices(self.indexed.sequence_lengths, self.documents, cfg.seq_length, cfg.seed,
                                 cfg.num_samples)

    def _load_cache(self, cache_dir: str):
        return load_cached_arrays(cache_dir, f"GPTDataset_{self.cache_key}", INDEX_NAMES)

    def _save_cache(self, cache_dir: str, document_index, sample_index, shuffle_index) -> None:
        desc = {"order": "megatron-core GPTDataset", "version": INDEX_ALGORITHM_VERSION,
                "prefix": os.path.abspath(self.indexed.path_prefix), "split": self.name,
                "documents": [int(self.documents[0]), int(self.documents[-1]) + 1],
                "seq_length": self.cfg.seq_length, "seed": self.cfg.seed,
                "num_samples_requested": self.cfg.num_samples, "num_samples": len(shuffle_index)}
        arrays = dict(zip(INDEX_NAMES, (document_index, sample_index, shuffle_index), strict=True))
        save_cached_arrays(cache_dir, f"GPTDataset_{self.cache_key}", arrays, desc)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx (after shuffling), as int64."""
        j = int(self.shuffle_index[idx])
        pos_a, off_a = (int(x) for x in self.sample_index[j])
        pos_b, off_b = (int(x) for x in self.sample_index[j + 1])
        doc = self.document_index
        if pos_a == pos_b:
            return self.indexed.get(int(doc[pos_a]), off_a, off_b - off_a + 1).astype(np.int64)
        pieces = [self.indexed.get(int(doc[pos_a]), off_a)]
        pieces += [self.indexed.get(int(doc[p])) for p in range(pos_a + 1, pos_b)]
        pieces.append(self.indexed.get(int(doc[pos_b]), 0, off_b + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return {"tokens": torch.from_numpy(self.sample_tokens(idx))}
