"""GPT samples over a range of documents of an indexed dataset.

Three indices, built with vectorised numpy and cached as .npy:
- document index: the documents of each epoch, shuffled per epoch;
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

INDEX_ALGORITHM_VERSION = 1  # bump when the index construction below changes


@dataclass(frozen=True)
class GPTIndexConfig:
    seq_length: int
    seed: int
    num_samples: int  # requested; the dataset holds at least this many


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # num_samples samples need num_samples * seq_length + 1 tokens (samples overlap by one token)
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    tiled = np.broadcast_to(documents.astype(np.int32), (num_epochs, len(documents)))
    return rng.permuted(tiled, axis=1).reshape(-1)


def build_sample_index(doc_lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """doc_lengths: token counts in document-index order. Returns [n + 1, 2] int64 (doc position, offset)."""
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    total = int(ends[-1])
    num_samples = (total - 1) // seq_length
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # the document holding token position p is the first one whose end exceeds p (skips empty documents)
    doc_pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[doc_pos] - doc_lengths[doc_pos])
    return np.stack([doc_pos.astype(np.int64), offsets], axis=1)


def build_shuffle_index(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(num_samples).astype(np.int64)


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
        epochs = num_epochs_needed(tokens_per_epoch, cfg.seq_length, cfg.num_samples)
        doc_rng = np.random.default_rng([cfg.seed, 0])
        document_index = build_document_index(self.documents, epochs, doc_rng)
        sample_index = build_sample_index(self.indexed.sequence_lengths[document_index].astype(np.int64),
                                          cfg.seq_length)
        shuffle_index = build_shuffle_index(len(sample_index) - 1, np.random.default_rng([cfg.seed, 1]))
        return document_index, sample_index, shuffle_index

    def _cache_paths(self, cache_dir: str) -> dict[str, str]:
        base = os.path.join(cache_dir, f"GPTDataset_{self.cache_key}")
        return {k: f"{base}_{k}.npy" for k in ("document_index", "sample_index", "shuffle_index")} | {
            "description": f"{base}_description.json"}

    def _load_cache(self, cache_dir: str):
        paths = self._cache_paths(cache_dir)
        if not all(os.path.isfile(p) for p in paths.values()):
            return None
        return tuple(np.load(paths[k], mmap_mode="r") for k in ("document_index", "sample_index", "shuffle_index"))

    def _save_cache(self, cache_dir: str, document_index, sample_index, shuffle_index) -> None:
        # Every file goes through a temporary name; the description is written last and marks the set
        # complete. Ranks racing to build write identical files, so the race is harmless.
        os.makedirs(cache_dir, exist_ok=True)
        paths = self._cache_paths(cache_dir)
        suffix = f".tmp{os.getpid()}"
        for key, arr in (("document_index", document_index), ("sample_index", sample_index),
                         ("shuffle_index", shuffle_index)):
            with open(paths[key] + suffix, "wb") as f:
                np.save(f, arr)
            os.replace(paths[key] + suffix, paths[key])
        desc = {"prefix": os.path.abspath(self.indexed.path_prefix), "split": self.name,
                "documents": [int(self.documents[0]), int(self.documents[-1]) + 1],
                "seq_length": self.cfg.seq_length, "seed": self.cfg.seed,
                "num_samples_requested": self.cfg.num_samples, "num_samples": len(shuffle_index)}
        with open(paths["description"] + suffix, "w") as f:
            json.dump(desc, f, indent=1)
        os.replace(paths["description"] + suffix, paths["description"])

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
