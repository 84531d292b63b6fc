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
from .lr_schedule import LRScheduler, build_lr_scheduler


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
        """Micro-batches of a full --global-batch-size (validation always uses it, as in Megatron)."""
        return self.cfg.training.global_batch_size // self._samples_per_microbatch

    @property
    def _samples_per_microbatch(self) -> int:
        return self.cfg.training.micro_batch_size * self.cfg.parallel.data_parallel_size

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The global batch of the training iteration that starts after `consumed_samples` (--rampup-batch-size)."""
        return self.scheduler.batches.global_batch_size_at(consumed_samples)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches per rank of the training iteration that starts after `consumed_samples`."""
        return self.global_batch_size_at(consumed_samples) // self._samples_per_microbatch

    def global_batch_size_of(self, iteration: int) -> int:
        """The global batch of training iteration `iteration` (1-based; for the log line)."""
        return self.scheduler.batches.global_batch_size_of(iteration)

    def finish_param_sync(self) -> None:
        """Whole parameters on every rank: waits for all-gathers left in flight (--overlap-param-gather)."""
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer.finish_param_sync()

    def params_finite(self) -> bool:
        """Whether every parameter on every rank is finite (one reduction, one host synchronisation)."""
        self.finish_param_sync()
        flags = [torch.isfinite(p).all() for m in self.model_chunks for p in m.parameters()]
        return not any_rank(not bool(torch.stack(flags).all()))

    def save(self, state: TrainState) -> Path:
        """Checkpoint to --save (a collective call under torchrun); never from non-finite weights."""
        if not self.params_finite():
            raise TrainingDiverged(f"iteration {state.iteration}: the weights hold NaN/Inf; no checkpoint written "
                                   f"(the last good one in {self.cfg.training.save} is kept)")
        return save_checkpoint(self.cfg.training.save, state, self.model_chunks, self.optimizer, self.cfg.to_dict())

    def load(self) -> tuple[TrainState, dict] | None:
        """Restore the latest checkpoint in --load: (state, its saved config), None when there is none.
        --finetune takes the weights only and starts at iteration 0; --no-load-optim / --no-load-rng skip those."""
        t = self.cfg.training
        loaded = load_checkpoint(t.load, self.model_chunks, self.optimizer,
                                 load_optimizer=not (t.no_load_optim or t.finetune),
                                 load_rng=not (t.no_load_rng or t.finetune))
        if loaded is not None and t.finetune:
            loaded = (TrainState(), loaded[1])
        return loaded


def initialize(cfg: Config) -> torch.device:
    """Process groups (under torchrun), device, seeds."""
    t = cfg.training
    if cfg.parallel.world_size > 1 and not ps.model_parallel_is_initialized():
        p = cfg.parallel
        ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                     backend=p.distributed_backend, timeout_s=60 * p.distributed_timeout_minutes)
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
    """The tokenizer the --tokenizer-* flags name (None without one), built by the factory the preprocessing
    uses; sets --vocab-size from it when not given (a smaller --vocab-size is a one-line error there).
    NullTokenizer's --vocab-size N counts the ids before its eod, as in Megatron, so the model's vocabulary
    becomes N + 1 (Megatron pads tokenizer.vocab_size = N + 1 likewise)."""
    from ..data.tokenizers import build_tokenizer as build_from_flags

    d, m = cfg.data, cfg.model
    vocab_size = m.vocab_size
    if d.tokenizer_type == "NullTokenizer":  # N itself, kept aside so that a second call does not add another 1
        vocab_size = vars(m).setdefault("_null_tokenizer_vocab_size", m.vocab_size)
    tok = build_from_flags(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file, vocab_size)
    if tok is not None and (m.vocab_size is None or d.tokenizer_type == "NullTokenizer"):
        m.vocab_size = tok.vocab_size
    return tok


def compiles(cfg: Config, device: torch.device) -> bool:
    """--torch-compile: auto compiles on CUDA only (on the CPU compilation costs more than it saves for the
    small models trained there)."""
    return cfg.training.torch_compile == "on" or (cfg.training.torch_compile == "auto" and device.type == "cuda")


def apply_sequence_parallel(model: nn.Module) -> int:
    """Scatter the embedding output along the sequence; tp-sum the norms' (LayerNorm, RMSNorm) grads. Returns the
    hooks added."""
    if not ps.get_sequence_parallel():
        return 0
    embedding = getattr(model, "embedding", None)
    if embedding is not None and getattr(model, "pre_process", True):
        embedding.register_forward_hook(
            lambda module, args, output: scatter_to_sequence_parallel_region(output, ps.get_sequence_dim()))
    norm_params = [p for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for p in m.parameters()]
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
            overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
            average_in_collective=p.ddp_average_in_collective,
            **({"bucket_size": p.ddp_bucket_size} if p.ddp_bucket_size is not None else {}))
        forward_backward = make_forward_backward(cfg, stage, device, no_sync=ddp.no_sync)
    else:
        optimizer = SRAdamW(model_chunks, cfg.optimizer, seed=cfg.training.seed)
        forward_backward = make_forward_backward(cfg, stage, device)
    scheduler = build_lr_scheduler(optimizer, cfg)
    return Trainer(cfg, device, model_chunks, optimizer, scheduler, forward_backward)
