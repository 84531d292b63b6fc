"""The train / validation / test data iterators of a run (Megatron's sample counts and cycling)."""

from __future__ import annotations

import torch

from ..config import Config
from ..parallel import parallel_state as ps
from .lr_schedule import BatchSchedule
from .mock_data import MockGPTDataset


def num_samples(cfg: Config) -> tuple[int, int, int]:
    """(train, valid, test) samples the datasets must hold, as Megatron asks for them: --train-samples (or what
    --train-iters iterations consume, ramp-up included, if that is more), and full global batches for the
    validations and the test."""
    t = cfg.training
    train = BatchSchedule(t).consumed_before(t.train_iters + 1)
    evals = (t.train_iters // t.eval_interval if t.eval_interval else 0) + 1
    return (max(train, t.train_samples or 0), evals * t.eval_iters * t.global_batch_size,
            t.eval_iters * t.global_batch_size)


class VocabChecked(torch.utils.data.Dataset):
    """A dataset whose samples must hold token ids below the model's vocabulary: a corpus made with another
    tokenizer is a one-line error at its first bad sample, not an IndexError (a device assert on CUDA)."""

    def __init__(self, dataset, vocab_size: int, source: str):
        self.dataset, self.vocab_size, self.source = dataset, vocab_size, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[idx]
        tokens = sample["tokens"]
        if tokens.numel() and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise ValueError(f"{self.source}: sample {idx} holds token id {bad}, outside the vocabulary of "
                             f"{self.vocab_size} (was the data made with another tokenizer?)")
        return sample


def build_datasets(cfg: Config):
    n = num_samples(cfg)
    if cfg.data.mock_data:  # a split asked for no samples (--eval-iters 0: no validation) has no dataset
        return tuple(MockGPTDataset(k, cfg.model.seq_length, cfg.model.vocab_size, cfg.training.seed, split=i)
                     if k else None for i, k in enumerate(n))
    from ..data import build_gpt_datasets

    datasets = build_gpt_datasets(cfg.data.data_path, cfg.data.split, cfg.model.seq_length, cfg.training.seed, n,
                                  cache_dir=cfg.data.data_cache_path)
    source = "--data-path " + " ".join(cfg.data.data_path)
    return tuple(VocabChecked(ds, cfg.model.vocab_size, source) if ds is not None else None for ds in datasets)


def build_iterators(cfg: Config, consumed_train_samples: int):
    """(train, valid, test) iterators for this dp rank; train resumes after `consumed_train_samples`."""
    from ..data import build_pretraining_data_loader

    t = cfg.training
    dp_rank, dp_size = ps.get_data_parallel_rank(), cfg.parallel.data_parallel_size
    loaders = [build_pretraining_data_loader(ds, consumed, t.micro_batch_size, dp_rank, dp_size,
                                             cfg.data.num_workers)
               for ds, consumed in zip(build_datasets(cfg), (consumed_train_samples, 0, 0))]
    train_it = _quiet_iter(loaders[0]) if loaders[0] is not None else None
    # Validation and test cycle over their datasets, as in Megatron.
    other = [_cycle(ld) if ld is not None else None for ld in loaders[1:]]
    return train_it, other[0], other[1]


def _quiet_iter(loader):
    # A DataLoader iterator draws a base seed from torch's global generator, which dropout also uses;
    # fork it so that making an iterator (at a resume, or a validation epoch) never shifts dropout's stream.
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _cycle(loader):
    while True:
        yield from _quiet_iter(loader)
