"""Pipeline parallelism: p2p activation transfer, the 1F1B schedule, tied embeddings across stages."""

from .schedules import forward_backward_no_pipelining, forward_backward_pipelining, get_forward_backward_func
from .tied_embeddings import (
                              allreduce_tied_embedding_grads,
                              mark_tied_embeddings,
                              sync_tied_embedding_weights,
                              tied_embedding_params,
)

__all__ = ["forward_backward_no_pipelining", "forward_backward_pipelining", "get_forward_backward_func",
           "allreduce_tied_embedding_grads", "mark_tied_embeddings", "sync_tied_embedding_weights",
           "tied_embedding_params"]
