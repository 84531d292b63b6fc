"""Tied input/output embeddings across the first and last pipeline stage.

With pp > 1 the first stage holds the word embedding and the last stage a copy used for the logits
(`param.shared_embedding_copy = True`). They start equal (the copy is overwritten with the first
stage's weight) and stay equal because after every backward both hold the *sum* of the two stages'
gradients (one all-reduce over the embedding group), and the SR update draws the same random bits for
both (megatron_sr/optimizer/sr_streams.py), so the two BF16 copies are updated identically.
The first stage's parameter is found by `param.shared_embedding = True` (set by `mark_tied_embeddings`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import parallel_state as ps


def tied_embedding_params(module: nn.Module) -> list[nn.Parameter]:
    """This stage's parameters that take part in the tied-embedding sync (empty on middle stages)."""
    return [p for p in module.parameters()
            if getattr(p, "shared_embedding", False) or getattr(p, "shared_embedding_copy", False)]


def mark_tied_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """Mark the first stage's word embedding `shared_embedding` (pp > 1, tied); returns this stage's tied params."""
    if ps.get_pipeline_model_parallel_world_size() > 1 and getattr(model, "tied", False) \
            and getattr(model, "pre_process", False):
        model.embedding.word_embeddings.weight.shared_embedding = True
    return tied_embedding_params(model)


def _needs_sync() -> bool:
    return ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group()


@torch.no_grad()
def sync_tied_embedding_weights(module: nn.Module) -> None:
    """Make the last stage's copy equal to the first stage's embedding (broadcast from the first stage)."""
    if not _needs_sync():
        return
    params = tied_embedding_params(module)
    if not params:  # untied embeddings: no stage holds a tied parameter, so no stage broadcasts
        return
    if len(params) != 1:
        raise ValueError(f"expected one tied embedding parameter on this stage, found {len(params)}")
    first = ps.get_embedding_global_ranks()[0]
    dist.broadcast(params[0].data, src=first, group=ps.get_embedding_group())


@torch.no_grad()
def allreduce_tied_embedding_grads(module: nn.Module) -> None:
    """Sum the embedding gradient of the first and last stage (`main_grad` when a DDP buffer holds it)."""
    if not _needs_sync():
        return
    for param in tied_embedding_params(module):
        grad = param.main_grad if hasattr(param, "main_grad") else param.grad
        if grad is None:
            grad = param.grad = torch.zeros_like(param)
        dist.all_reduce(grad, group=ps.get_embedding_group())
