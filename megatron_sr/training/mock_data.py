"""Synthetic token data (--mock-data): learnable, deterministic, no files.

Each sample follows a fixed random successor table: with probability 3/4 the next token is
succ[token], else a uniform random token. A bigram model can learn it, so the loss falls well below
ln(vocab) (to about 0.25 ln(vocab) + 0.56 nats), which makes it a real signal for tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch


class MockGPTDataset(torch.utils.data.Dataset):
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int = 0):
        # One successor table per seed (shared by train/valid/test); samples differ per split.
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed
        self.split = split
        self.successor = np.random.default_rng(seed).permutation(vocab_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.split, int(idx)))
        n = self.seq_length + 1
        noise = rng.integers(0, self.vocab_size, size=n)
        follow = rng.random(n) < 0.75
        out = np.empty(n, dtype=np.int64)
        out[0] = noise[0]
        for j in range(1, n):
            out[j] = self.successor[out[j - 1]] if follow[j] else noise[j]
        return {"tokens": torch.from_numpy(out)}
