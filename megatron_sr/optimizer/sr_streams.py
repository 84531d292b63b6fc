"""Which part of the SR random stream each parameter draws from.

Every optimizer (single-process, data-parallel, distributed) reads two attributes that this module
sets once, after the model is built (training/setup.py; the optimizers refuse parameters without them):
- `param.sr_index_base`: the canonical stream index of the parameter's first element, the running
  sum of numels over the model chunks' parameters in order. It never depends on buffer layout,
  bucketing or data-parallel sharding, so a shard's update is exactly a slice of the full update.
- `param.sr_key_ranks`: (tp_rank, pp_rank) folded into the Philox key. Parameters replicated over
  tensor-parallel ranks use tp_rank 0, so every replica draws the same bits and replicas never
  drift. The output-layer copy of a tied embedding (`param.shared_embedding_copy = True` on a
  last pipeline stage) uses the first stage's key and index base 0, the same bits as the original.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..numerics.philox import SRKey
from ..parallel import parallel_state as ps


def assign_sr_streams(model_chunks: Iterable[nn.Module]) -> None:
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    offset = 0
    for chunk in model_chunks:
        for param in chunk.parameters():
            if getattr(param, "shared_embedding_copy", False):
                param.sr_index_base = 0
                param.sr_key_ranks = (tp_rank if getattr(param, "tensor_model_parallel", False) else 0, 0)
                continue
            param.sr_index_base = offset
            param.sr_key_ranks = (tp_rank if getattr(param, "tensor_model_parallel", False) else 0, pp_rank)
            offset += param.numel()


def sr_key_for(param: torch.Tensor, seed: int) -> SRKey:
    """The Philox key of a parameter whose streams were assigned by `assign_sr_streams`."""
    tp_rank, pp_rank = getattr(param, "sr_key_ranks", (0, 0))
    return SRKey.from_seed(seed, tp_rank=tp_rank, pp_rank=pp_rank)


def check_sr_streams(named_params) -> None:
    """ValueError naming the first parameter whose stream was never assigned."""
    for name, param in named_params:
        if not hasattr(param, "sr_index_base"):
            raise ValueError(f"parameter {name} has no SR stream: call "
                             "megatron_sr.optimizer.sr_streams.assign_sr_streams(model_chunks) before the optimizer")
