"""Build DDP + DistributedOptimizer from the trainer's typed config (megatron_sr/config.py).

    ddp, optimizer = build_data_parallel(model, cfg.optimizer, seed=cfg.training.seed,
                                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)

The optimizer config is read by field name (lr, weight_decay, adam_beta1/2, adam_eps, clip_grad,
precision, grad_dtype, optimizer_state_dtype), so this module does not import the trainer's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..parallel.sr_streams import assign_sr_streams
from .data_parallel import DDPConfig, DistributedDataParallel
from .distributed_optimizer import DistributedOptimizer, OptimizerConfig
from .param_and_grad_buffer import DEFAULT_BUCKET_SIZE

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def grad_dtype_for(precision: str, grad_dtype: str) -> torch.dtype:
    """FP32 gradients in fp32 and bf16-mp (Megatron's main grads); else what --grad-dtype says."""
    return torch.float32 if precision in ("fp32", "bf16-mp") else _DTYPES[grad_dtype]


def state_dtype_for(precision: str, state_dtype: str) -> torch.dtype:
    return torch.float32 if precision in ("fp32", "bf16-mp") else _DTYPES[state_dtype]


def build_data_parallel(model: nn.Module, opt_cfg, *, seed: int, use_distributed_optimizer: bool,
                        bucket_size: int | None = DEFAULT_BUCKET_SIZE, overlap_grad_reduce: bool = True,
                        late_sync_params: Iterable[nn.Parameter] = (), before_late_sync: Callable[[], None] | None = None
                        ) -> tuple[DistributedDataParallel, DistributedOptimizer]:
    """Wrap one model chunk (this rank's pipeline stage) and build its optimizer over parallel_state's dp group.

    With pp > 1 and tied embeddings pass `late_sync_params=tied_embedding_params(model)` and
    `before_late_sync=lambda: allreduce_tied_embedding_grads(model)` (megatron_sr.pipeline): the
    embedding's bucket then waits for the stage all-reduce, which needs the full gradient."""
    if not all(hasattr(p, "sr_index_base") for p in model.parameters()):
        assign_sr_streams([model])
    ddp = DistributedDataParallel(model, DDPConfig(
        grad_dtype=grad_dtype_for(opt_cfg.precision, opt_cfg.grad_dtype),
        use_distributed_optimizer=use_distributed_optimizer, overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=bucket_size), late_sync_params=late_sync_params,
        before_late_sync=before_late_sync)
    optimizer = DistributedOptimizer(ddp, OptimizerConfig(
        lr=opt_cfg.lr, beta1=opt_cfg.adam_beta1, beta2=opt_cfg.adam_beta2, eps=opt_cfg.adam_eps,
        weight_decay=opt_cfg.weight_decay, clip_grad=opt_cfg.clip_grad, seed=seed, precision=opt_cfg.precision,
        state_dtype=state_dtype_for(opt_cfg.precision, opt_cfg.optimizer_state_dtype)))
    return ddp, optimizer
