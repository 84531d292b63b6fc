"""Megatron-core's sample order, rebuilt from its published algorithm (megatron/core/datasets: gpt_dataset.py,
blended_dataset.py, blended_megatron_dataset_builder.py, helpers.cpp), so that the same prefixes, weights,
seed, sequence length, split and sample counts give the samples of megatron-core's GPTDataset and
BlendedDataset in the same order.

For one split of one prefix (documents = the split's sequence ids):
- epochs: the fewest whole passes over the documents holding num_samples * seq_length + 1 tokens;
- the last epoch is kept apart ("separate final epoch") when fewer than 80% of its samples are needed:
  the document index is then a shuffle of the first epochs followed by a shuffle of the last one, and the
  shuffle index shuffles the samples before the last epoch and those after separately, so the samples
  that are used come from the first epochs plus a random part of the last;
- one numpy RandomState(seed) drives, in this order, the document shuffle(s) and the sample shuffle(s);
- the sample index row k is the (document index position, offset) of token k * seq_length of the
  concatenated documents (row 0 is (0, 0)); sample k is the seq_length + 1 tokens from row k.
A blend draws at every step from the dataset whose count lags most behind weight * step.

Everything here is numpy and plain Python, so it runs without megatron-core (and without its C++ helper).
"""
from __future__ import annotations

import math

import numpy as np

FINAL_EPOCH_THRESHOLD = 0.80      # the last epoch is separate if fewer than this share of its samples is used
MID_LEVEL_DATASET_SURPLUS = 0.005  # each blended dataset is built 0.5% larger than its share
INT32_MAX = np.iinfo(np.int32).max
UINT32_MAX = np.iinfo(np.uint32).max


def normalize(weights) -> list[float]:
    """Weights over their sum, with numpy's float64 sum and division (the exact bits matter for the blend)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def split_boundaries(fractions: list[float], num_documents: int) -> list[int]:
    """Document boundaries [0, a, b, c] of train, valid and test (split i is [bounds[i], bounds[i + 1])):
    the running sums of the fractions, each times the number of documents, rounded with Python's round
    (ties to even), as megatron-core's split matrix is applied. A split of zero width is empty."""
    running = [0.0]
    for f in fractions:
        running.append(running[-1] + f)
    return [int(round(r * float(num_documents))) for r in running]


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """The fewest epochs holding num_samples samples of seq_length + 1 tokens that overlap by one token;
    one epoch when no count is asked for."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def samples_in(num_tokens: int, seq_length: int) -> int:
    """Whole samples in a stream of num_tokens tokens (the last partial one is dropped)."""
    return (num_tokens - 1) // seq_length


def samples_before_separate_final_epoch(tokens_per_epoch: int, seq_length: int, num_epochs: int,
                                        num_samples: int | None) -> int | None:
    """The number of samples before the final epoch when that epoch is shuffled on its own, else None."""
    if num_epochs == 1 or num_samples is None:
        return None
    before = samples_in((num_epochs - 1) * tokens_per_epoch, seq_length)
    from_final = num_samples - before
    per_epoch = samples_in(tokens_per_epoch, seq_length)
    return before if from_final < int(FINAL_EPOCH_THRESHOLD * per_epoch) else None


def shuffled_documents(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """The documents repeated num_epochs times, as int32, shuffled all together."""
    index = np.tile(np.asarray(documents).astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        return shuffled_documents(documents, num_epochs, rng)
    first = shuffled_documents(documents, num_epochs - 1, rng)
    return np.concatenate([first, shuffled_documents(documents, 1, rng)])


def sample_index_dtype(document_index: np.ndarray, sequence_lengths: np.ndarray):
    """int32 when every position and offset fits, else int64 (as the C++ helper chooses its template)."""
    largest = max(len(document_index), int(sequence_lengths.max()) if len(sequence_lengths) else 0)
    return np.int32 if largest <= INT32_MAX else np.int64


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_tokens: int) -> np.ndarray:
    """[n + 1, 2] (position in the document index, token offset) of the start of each sample, n the whole
    samples in num_tokens tokens. Row k locates token k * seq_length: the document whose tokens hold it (an
    empty document holds none, so it is stepped over); row 0 is (0, 0) whatever the first document holds.
    Vectorised instead of the C++ helper's token walk: the same rows."""
    num_samples = samples_in(num_tokens, seq_length)
    if 2 * len(document_index) > len(sequence_lengths):
        sequence_lengths = np.array(sequence_lengths)  # a dense gather is several times faster from memory than mmap
    lengths = sequence_lengths[document_index]
    ends = np.cumsum(lengths, dtype=np.int64)
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if 4 * num_samples < len(document_index):  # few samples over many documents: search for each
        doc_pos = np.searchsorted(ends, positions, side="right")
    else:  # each document repeated once per sample start it holds
        starts_up_to_end = (ends + (seq_length - 1)) // seq_length  # multiples of seq_length in [0, end)
        held = np.diff(starts_up_to_end, prepend=0)
        doc_pos = np.repeat(np.arange(len(document_index), dtype=np.int64), held)[1:num_samples + 1]
    index = np.zeros((num_samples + 1, 2), dtype=sample_index_dtype(document_index, sequence_lengths))
    index[1:, 0] = doc_pos
    index[1:, 1] = positions - (ends[doc_pos] - lengths[doc_pos])
    return index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """[0, num_first) shuffled, then [num_first, total) shuffled on its own (if non-empty); uint32 unless
    the total needs int64."""
    dtype = np.int64 if total >= UINT32_MAX - 1 else np.uint32
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    rest = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate([first, rest])


def build_gpt_indices(sequence_lengths: np.ndarray, documents: np.ndarray, seq_length: int, seed: int,
                      num_samples: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, sample index, shuffle index) of megatron-core's GPTDataset for these documents."""
    tokens_per_epoch = int(np.sum(sequence_lengths[documents], dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    before_final = samples_before_separate_final_epoch(tokens_per_epoch, seq_length, epochs, num_samples)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, epochs, rng, before_final is not None)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, epochs * tokens_per_epoch)
    total = len(sample_index) - 1
    shuffle_index = build_shuffle_index(total if before_final is None else before_final, total, rng)
    return document_index, sample_index, shuffle_index


def blend_sample_counts(weights: list[float], num_samples: int, surplus: float = 0.0) -> list[int]:
    """Samples each dataset of a blend contributes (surplus 0) or is built with (the 0.5% surplus)."""
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in weights]


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16, sample within that dataset int64) for `size` draws: draw t goes to the dataset
    with the largest weight * max(t, 1) - draws so far (the first on ties), in float64 as the C++ helper
    computes it. The choice depends on every earlier one, so this is a sequential loop (about 0.4 s per
    million draws for two or three datasets); pass it weights that sum to one."""
    w = [float(v) for v in weights]
    counts = [0] * len(w)
    others = list(enumerate(w))[1:]
    w0 = w[0]
    chosen = [0] * size
    for t in range(size):
        x = float(t) if t > 1 else 1.0
        best, best_lag = 0, w0 * x - counts[0]
        for d, wd in others:
            lag = wd * x - counts[d]
            if lag > best_lag:
                best, best_lag = d, lag
        chosen[t] = best
        counts[best] += 1
    dataset_index = np.asarray(chosen, dtype=np.int16)
    return dataset_index, draws_within_each_dataset(dataset_index, len(w))


def draws_within_each_dataset(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """For each draw, how many earlier draws went to the same dataset (its sample number there)."""
    within = np.zeros(len(dataset_index), dtype=np.int64)
    for d in range(num_datasets):
        mask = dataset_index == d
        within[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return within
