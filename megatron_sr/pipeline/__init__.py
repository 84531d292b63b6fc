"""Pipeline parallelism: p2p activation transfer, the 1F1B schedule, stage layer ranges, tied embeddings."""

from .schedules import forward_backward_no_pipelining, forward_backward_pipelining, get_forward_backward_func
from .stages import stage_layer_range
from .tied_embeddings import allreduce_tied_embedding_grads, sync_tied_embedding_weights, tied_embedding_params

__all__ = ["forward_backward_no_pipelining", "forward_backward_pipelining", "get_forward_backward_func",
           "stage_layer_range", "allreduce_tied_embedding_grads", "sync_tied_embedding_weights",
           "tied_embedding_params"]
