"""Apply tensor, pipeline and data parallelism to the trainer's GPT stage from outside (torchtitan style).

The trainer builds this rank's model chunk (its pipeline stage, with tensor-parallel slices) from
parallel_state; `parallelize` then adds what the plain model does not know about:

- --sequence-parallel: the embedding's output is scattered along the sequence (a forward hook), and
  the LayerNorm parameters, which now see 1/tp of the tokens, get their gradients summed over tp;
- pipeline parallelism with tied embeddings: the first stage's word embedding is marked
  `shared_embedding`, the last stage's copy is made equal to it, and their gradients are summed over
  the embedding group before the data-parallel reduction of that bucket;
- data parallelism: the chunk is wrapped in megatron_sr.distributed's DDP (gradient buckets whose
  reduce-scatter / all-reduce overlaps backward) and its DistributedOptimizer (sharded states with
  --use-distributed-optimizer);
- a forward_backward_func with the trainer's signature running the 1F1B schedule (pp > 1) or plain
  gradient accumulation, whose returned losses are averaged over dp and sent from the last stage to
  every stage, so each rank logs the global-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..pipeline import (allreduce_tied_embedding_grads, get_forward_backward_func, sync_tied_embedding_weights,
                        tied_embedding_params)
from . import parallel_state as ps
from .layers import register_sequence_parallel_grad_hooks
from .mappings import scatter_to_sequence_parallel_region


@dataclass
class ParallelModel:
    model: nn.Module  # the stage's GPTModel (parameters live in the DDP buffers)
    ddp: nn.Module  # megatron_sr.distributed.DistributedDataParallel around it
    optimizer: object  # megatron_sr.distributed.DistributedOptimizer


def apply_sequence_parallel(model: nn.Module) -> int:
    """Scatter the embedding output along the sequence; tp-sum LayerNorm grads. Returns the hooks added."""
    if not ps.get_sequence_parallel():
        return 0
    embedding = getattr(model, "embedding", None)
    if embedding is not None and getattr(model, "pre_process", True):
        embedding.register_forward_hook(
            lambda module, args, output: scatter_to_sequence_parallel_region(output, ps.get_sequence_dim()))
    norm_params = [p for m in model.modules() if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
                   for p in m.parameters()]
    return register_sequence_parallel_grad_hooks(norm_params)


def mark_tied_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """Mark the first stage's word embedding `shared_embedding` (pp > 1, tied); returns this stage's tied params."""
    if ps.get_pipeline_model_parallel_world_size() > 1 and getattr(model, "tied", False) \
            and getattr(model, "pre_process", False):
        model.embedding.word_embeddings.weight.shared_embedding = True
    return tied_embedding_params(model)


def parallelize(cfg, model: nn.Module) -> ParallelModel:
    """Sequence parallelism, tied-embedding sync and DDP + DistributedOptimizer for one model chunk."""
    from ..distributed.factory import build_data_parallel  # distributed/ imports parallel/, not the reverse

    apply_sequence_parallel(model)
    tied = mark_tied_embeddings(model)
    sync_tied_embedding_weights(model)
    ddp, optimizer = build_data_parallel(
        model, cfg.optimizer, seed=cfg.training.seed,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        late_sync_params=tied, before_late_sync=lambda: allreduce_tied_embedding_grads(model),
        **bucket_options(cfg))
    return ParallelModel(model, ddp, optimizer)


def bucket_options(cfg) -> dict:
    """B's bucket flags, when the config has them (--ddp-bucket-size, --no-overlap-grad-reduce)."""
    p = cfg.parallel
    out = {}
    if getattr(p, "ddp_bucket_size", None) is not None:
        out["bucket_size"] = p.ddp_bucket_size
    if hasattr(p, "overlap_grad_reduce"):
        out["overlap_grad_reduce"] = p.overlap_grad_reduce
    return out


def activation_shape(cfg) -> tuple[int, int, int]:
    """What pipeline stages send each other: [micro batch, seq (/ tp under sequence parallelism), hidden]."""
    seq = cfg.model.seq_length
    if ps.get_sequence_parallel():
        seq //= ps.get_tensor_model_parallel_world_size()
    return (cfg.training.micro_batch_size, seq, cfg.model.hidden_size)


def _reduce_losses(stats: list[dict], num_microbatches: int, tokens: int, device) -> list[dict]:
    """Per-micro-batch losses averaged over dp, from the last stage to all stages (for logging)."""
    losses = torch.zeros(num_microbatches, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage() and stats:
        losses.copy_(torch.stack([s["lm loss"].float() for s in stats]))
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(losses, group=ps.get_data_parallel_group())
        losses /= ps.get_data_parallel_world_size()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(losses, src=ps.get_pipeline_model_parallel_global_ranks()[-1],
                       group=ps.get_pipeline_model_parallel_group())
    return [{"lm loss": loss, "num_tokens": tokens} for loss in losses]


def make_forward_backward_func(cfg, parallel: ParallelModel, get_batch: Callable, loss_func: Callable,
                               device: torch.device) -> Callable:
    """forward_backward_func(model_chunks, data_iterator, num_microbatches, forward_only) -> [loss dicts]."""
    model, ddp = parallel.model, parallel.ddp
    schedule = get_forward_backward_func()
    dtype = next(model.parameters()).dtype
    positions = torch.arange(cfg.model.seq_length, device=device)

    def forward_backward(model_chunks, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        stats: list[dict] = []

        def forward_step(it, stage):
            batch = get_batch(it, device)  # every stage draws the micro-batch: first uses tokens, last labels
            position_ids = positions.expand(batch["tokens"].shape[0], -1)
            tokens = batch["tokens"] if stage.pre_process else None
            labels = batch["labels"] if stage.post_process else None
            out = stage(tokens, position_ids=position_ids, labels=labels)
            if not stage.post_process:
                return out
            loss, stat = loss_func(out, batch["loss_mask"])
            stats.append(stat)
            return loss

        schedule(forward_step=forward_step, data_iterator=data_iterator, model=model,
                 num_microbatches=num_microbatches, tensor_shape=activation_shape(cfg), dtype=dtype, device=device,
                 forward_only=forward_only, no_sync=None if forward_only else ddp.no_sync)
        tokens = cfg.training.micro_batch_size * cfg.model.seq_length  # per micro-batch and dp rank
        return _reduce_losses(stats, num_microbatches, tokens, device)

    return forward_backward


def make_save_fn(cfg, parallel: ParallelModel) -> Callable | None:
    """save(state): every rank writes its shard (megatron_sr.distributed.checkpoint); a collective call."""
    if not cfg.training.save:
        return None
    from ..distributed import checkpoint as sharded
    from ..training.checkpointing import rng_state

    def save(state) -> None:
        common = {"consumed_train_samples": state.consumed_train_samples, "skipped_iters": state.skipped_iters,
                  "config": cfg.to_dict()}
        sharded.save_checkpoint(cfg.training.save, state.iteration, parallel.ddp, parallel.optimizer,
                                common=common, rank_state=rng_state())

    return save


def load_checkpoint(cfg, parallel: ParallelModel):
    """(TrainState, config dict) from the latest sharded checkpoint in --load, or None when there is none."""
    from ..distributed import checkpoint as sharded
    from ..training.checkpointing import TrainState, set_rng_state

    if sharded.read_latest_iteration(cfg.training.load) is None:
        return None
    iteration, common, rank_state = sharded.load_checkpoint(cfg.training.load, parallel.ddp, parallel.optimizer)
    if rank_state is not None:  # same dp layout: resume the RNG streams too
        set_rng_state(rank_state)
    state = TrainState(iteration, common.get("consumed_train_samples", 0), common.get("skipped_iters", 0))
    return state, common.get("config", {})
