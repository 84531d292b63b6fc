"""pretrain(cfg): config -> process groups -> model -> optimizer -> data iterators -> loop -> final eval/save.

Each step is a small function so the parallel code can swap one in (process groups in
`initialize`, DDP / distributed optimizer in `build_optimizer`, the pipeline schedule in
`choose_forward_backward_func`).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from ..config import Config
from ..model import build_model_chunks
from ..optimizer.sr_adamw import SRAdamW
from ..parallel import parallel_state as ps
from ..parallel.random import model_parallel_seed
from ..parallel.sr_streams import assign_sr_streams
from .checkpointing import TrainState, load_checkpoint
from .loop import LoopResult, _log_validation, evaluate, log, make_save_fn, train
from .lr_schedule import LRScheduler
from .mock_data import MockGPTDataset
from .schedules import forward_backward_no_pipelining, get_batch, loss_func
from ..parallel.parallelize import load_checkpoint as load_parallel_checkpoint
from ..parallel.parallelize import make_forward_backward_func as make_parallel_forward_backward_func
from ..parallel.parallelize import make_save_fn as make_parallel_save_fn
from ..parallel.parallelize import parallelize


def initialize(cfg: Config) -> torch.device:
    """Process groups (under torchrun), device, seeds."""
    t = cfg.training
    if cfg.parallel.world_size > 1 and not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                                     cfg.parallel.pipeline_model_parallel_size)
    ps.set_sequence_parallel(cfg.parallel.sequence_parallel)
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(t.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    random.seed(t.seed)
    np.random.seed(t.seed)
    model_parallel_seed(t.seed, device.type)
    return device


def build_tokenizer(cfg: Config):
    if not cfg.data.tokenizer_model:
        return None
    from ..data import SentencePieceTokenizer

    tok = SentencePieceTokenizer(cfg.data.tokenizer_model)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"--vocab-size {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    return tok


def build_optimizer(cfg: Config, model_chunks):
    o = cfg.optimizer
    return SRAdamW(model_chunks, lr=o.lr, weight_decay=o.weight_decay, beta1=o.adam_beta1, beta2=o.adam_beta2,
                   eps=o.adam_eps, clip_grad=o.clip_grad, precision=o.precision, seed=cfg.training.seed,
                   state_dtype=o.optimizer_state_dtype, grad_dtype=o.grad_dtype)


def choose_forward_backward_func(cfg: Config):
    return forward_backward_no_pipelining


def num_samples(cfg: Config) -> tuple[int, int, int]:
    t = cfg.training
    evals = (t.train_iters // t.eval_interval if t.eval_interval else 0) + 1
    return (t.train_iters * t.global_batch_size, evals * t.eval_iters * t.global_batch_size,
            t.eval_iters * t.global_batch_size)


def build_datasets(cfg: Config):
    n = num_samples(cfg)
    if cfg.data.mock_data:
        return tuple(MockGPTDataset(k, cfg.model.seq_length, cfg.model.vocab_size, cfg.training.seed, split=i)
                     for i, k in enumerate(n))
    from ..data import build_gpt_datasets

    return build_gpt_datasets(cfg.data.data_path, cfg.data.split, cfg.model.seq_length, cfg.training.seed, n,
                              cache_dir=cfg.data.data_cache_path)


def build_iterators(cfg: Config, datasets, consumed_train_samples: int):
    from ..data import build_pretraining_data_loader

    t = cfg.training
    dp_rank, dp_size = ps.get_data_parallel_rank(), cfg.parallel.data_parallel_size
    loaders = [build_pretraining_data_loader(ds, consumed, t.micro_batch_size, dp_rank, dp_size,
                                             cfg.data.num_workers)
               for ds, consumed in zip(datasets, (consumed_train_samples, 0, 0))]
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


def tensorboard_writer(cfg: Config):
    if not cfg.training.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=cfg.training.tensorboard_dir)


def pretrain(cfg: Config) -> LoopResult:
    device = initialize(cfg)
    build_tokenizer(cfg)
    model_chunks = build_model_chunks(cfg, device)
    assign_sr_streams(model_chunks)
    # Under torchrun: DDP buffers + DistributedOptimizer, pipeline schedule, sharded checkpoints (docs/parallel.md).
    parallel = parallelize(cfg, model_chunks[0]) if cfg.parallel.world_size > 1 else None
    optimizer = parallel.optimizer if parallel else build_optimizer(cfg, model_chunks)
    scheduler = LRScheduler(optimizer, max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
                            warmup_iters=cfg.optimizer.lr_warmup_iters, decay_iters=cfg.optimizer.lr_decay_iters,
                            decay_style=cfg.optimizer.lr_decay_style)
    state = TrainState()
    if cfg.training.load:
        loaded = (load_parallel_checkpoint(cfg, parallel) if parallel
                  else load_checkpoint(cfg.training.load, model_chunks, optimizer))
        if loaded is None:
            log(f" WARNING: no checkpoint in {cfg.training.load}; training from scratch")
        else:
            state = loaded[0]
            log(f" loaded checkpoint from {cfg.training.load} at iteration {state.iteration}")
    n_params = sum(p.numel() for m in model_chunks for p in m.parameters())
    log(f" > {n_params / 1e6:.2f}M parameters, precision {cfg.optimizer.precision}, device {device}")
    train_it, valid_it, _ = build_iterators(cfg, build_datasets(cfg), state.consumed_train_samples)
    writer = tensorboard_writer(cfg)
    if parallel:
        fb = make_parallel_forward_backward_func(cfg, parallel, get_batch, loss_func, device)
        save_fn = make_parallel_save_fn(cfg, parallel)
    else:
        fb = choose_forward_backward_func(cfg)
        save_fn = make_save_fn(cfg, model_chunks, optimizer)
    result = train(cfg, model_chunks, optimizer, scheduler, fb, train_it, valid_it, state, save_fn, writer)
    t = cfg.training
    if result.reason in ("done", "exit-duration"):
        if valid_it is not None and (not result.valid_losses or result.valid_losses[-1][0] != state.iteration):
            num_mb = t.global_batch_size // (t.micro_batch_size * cfg.parallel.data_parallel_size)
            vloss = evaluate(model_chunks, fb, valid_it, t.eval_iters, num_mb)
            result.valid_losses.append((state.iteration, vloss))
            _log_validation("validation", state.iteration, vloss, writer)
        if result.reason == "done" and save_fn is not None and not (
                t.save_interval and state.iteration % t.save_interval == 0):
            save_fn(state)
    if writer is not None:
        writer.close()
    if result.valid_losses:
        _, vloss = result.valid_losses[-1]
        log(f" final validation loss {vloss:.4f}, perplexity {math.exp(min(vloss, 20.0)):.2f}")
    return result
