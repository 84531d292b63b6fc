"""The one assembly path: config -> process groups -> model -> optimizer -> forward_backward, at any layout.

    trainer = build(cfg)        # world size 1 or torchrun's, tp x pp x dp from the config

The model is built as this rank's pipeline stage with its tensor-parallel slices; the parallel
layout is then applied from outside (the model knows only its layers):
- --sequence-parallel: the embedding's output is scattered along the sequence (a forward hook), and
  the LayerNorm parameters, which see 1/tp of the tokens, get their gradients summed over tp;
- pp > 1 with tied embeddings: the first stage's word embedding is marked, the last stage's copy made
  equal to it, and their gradients summed over the embedding group before the dp reduction;
- the optimizer: SRAdamW over the parameters in one process; under torchrun the chunk is wrapped in
  DDP (gradient buckets whose collectives overlap backward) with the DistributedOptimizer (sharded
  states with --use-distributed-optimizer). This is the one place that chooses between them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import TrainState, load_checkpoint, save_checkpoint
from ..config import Config
from ..distributed import DistributedOptimizer, build_data_parallel
from ..model import build_model_chunks
from ..optimizer.sr_adamw import SRAdamW
from ..optimizer.sr_streams import assign_sr_streams
from ..parallel import parallel_state as ps
from ..parallel.layers import register_sequence_parallel_grad_hooks
from ..parallel.mappings import scatter_to_sequence_parallel_region
from ..parallel.parallel_state import any_rank
from ..parallel.random import model_parallel_seed
from ..pipeline import allreduce_tied_embedding_grads, mark_tied_embeddings, sync_tied_embedding_weights
from .forward_backward import ForwardBackward, make_forward_backward
from .lr_schedule import LRScheduler


class TrainingDiverged(ValueError):
    """NaN/Inf took over: training stops without saving the broken state (pretrain_gpt.py exits 2)."""


@dataclass
class Trainer:
    """Everything the loop runs, built for this rank."""

    cfg: Config
    device: torch.device
    model_chunks: list[nn.Module]  # this rank's stage (parameters in DDP's buffers under torchrun)
    optimizer: SRAdamW | DistributedOptimizer
    scheduler: LRScheduler
    forward_backward: ForwardBackward

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.cfg.parallel.data_parallel_size)

    def params_finite(self) -> bool:
        """Whether every parameter on every rank is finite (one reduction, one host synchronisation)."""
        flags = [torch.isfinite(p).all() for m in self.model_chunks for p in m.parameters()]
        return not any_rank(not bool(torch.stack(flags).all()))

    def save(self, state: TrainState) -> Path:
        """Checkpoint to --save (a collective call under torchrun); never from non-finite weights."""
        if not self.params_finite():
            raise TrainingDiverged(f"iteration {state.iteration}: the weights hold NaN/Inf; no checkpoint written "
                                   f"(the last good one in {self.cfg.training.save} is kept)")
        return save_checkpoint(self.cfg.training.save, state, self.model_chunks, self.optimizer, self.cfg.to_dict())

    def load(self) -> tuple[TrainState, dict] | None:
        """Restore the latest checkpoint in --load: (state, its saved config), None when there is none."""
        return load_checkpoint(self.cfg.training.load, self.model_chunks, self.optimizer)


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    random.seed(t.seed)
    np.random.seed(t.seed)
    model_parallel_seed(t.seed, device.type)
    return device


def build_tokenizer(cfg: Config):
    """The tokenizer of --tokenizer-model (None without one); sets --vocab-size from it when not given."""
    if not cfg.data.tokenizer_model:
        return None
    from ..data import SentencePieceTokenizer

    tok = SentencePieceTokenizer(cfg.data.tokenizer_model)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"--vocab-size {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    return tok


def compiles(cfg: Config, device: torch.device) -> bool:
    """--torch-compile: auto compiles on CUDA only (on the CPU compilation costs more than it saves for the
    small models trained there)."""
    return cfg.training.torch_compile == "on" or (cfg.training.torch_compile == "auto" and device.type == "cuda")


def apply_sequence_parallel(model: nn.Module) -> int:
    """Scatter the embedding output along the sequence; tp-sum LayerNorm grads. Returns the hooks added."""
    if not ps.get_sequence_parallel():
        return 0
    embedding = getattr(model, "embedding", None)
    if embedding is not None and getattr(model, "pre_process", True):
        embedding.register_forward_hook(
            lambda module, args, output: scatter_to_sequence_parallel_region(output, ps.get_sequence_dim()))
    norm_params = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    return register_sequence_parallel_grad_hooks(norm_params)


def build(cfg: Config) -> Trainer:
    device = initialize(cfg)
    build_tokenizer(cfg)
    model_chunks = build_model_chunks(cfg, device)
    model = model_chunks[0]
    assign_sr_streams(model_chunks)
    apply_sequence_parallel(model)
    tied = mark_tied_embeddings(model)
    sync_tied_embedding_weights(model)
    stage = torch.compile(model) if compiles(cfg, device) else model  # what forward_backward runs
    if cfg.parallel.world_size > 1:
        p = cfg.parallel
        ddp, optimizer = build_data_parallel(
            model, cfg.optimizer, seed=cfg.training.seed, use_distributed_optimizer=p.use_distributed_optimizer,
            late_sync_params=tied, before_late_sync=lambda: allreduce_tied_embedding_grads(model),
            **({"bucket_size": p.ddp_bucket_size} if p.ddp_bucket_size is not None else {}))
        forward_backward = make_forward_backward(cfg, stage, device, no_sync=ddp.no_sync)
    else:
        optimizer = SRAdamW(model_chunks, cfg.optimizer, seed=cfg.training.seed)
        forward_backward = make_forward_backward(cfg, stage, device)
    o = cfg.optimizer
    scheduler = LRScheduler(optimizer, max_lr=o.lr, min_lr=o.min_lr, warmup_iters=o.lr_warmup_iters,
                            decay_iters=o.lr_decay_iters, decay_style=o.lr_decay_style)
    return Trainer(cfg, device, model_chunks, optimizer, scheduler, forward_backward)
