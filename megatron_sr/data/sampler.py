"""Megatron's pretraining sampler: global batches in order, each cut over data-parallel ranks,
resumable from a consumed-samples count."""
from __future__ import annotations

import torch


class PretrainingSampler:
    """Yields this rank's micro-batches of sample indices. Samples consumed_samples, consumed_samples+1, ...
    are taken in groups of micro_batch_size * data_parallel_size; rank r gets slice [r*mbs, (r+1)*mbs)
    of each group. An incomplete last group is dropped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise ValueError(f"no samples to load (dataset of {total_samples} samples)")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.group = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.group)

    def __iter__(self):
        lo = self.rank * self.micro_batch_size
        start = self.consumed_samples
        while start + self.group <= self.total_samples:
            yield list(range(start + lo, start + lo + self.micro_batch_size))
            start += self.group


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int, num_workers: int = 0):
    """DataLoader yielding {"tokens": LongTensor[micro_batch_size, seq_length + 1]}; None for no dataset."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)
