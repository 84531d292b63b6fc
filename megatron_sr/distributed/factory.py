"""Build DDP + DistributedOptimizer for one model chunk from the trainer's typed config.

    ddp, optimizer = build_data_parallel(model, cfg.optimizer, seed=cfg.training.seed,
                                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..config import OptimizerConfig
from ..precision import precision_mode
from .data_parallel import DDPConfig, DistributedDataParallel
from .distributed_optimizer import DistributedOptimizer
from .param_and_grad_buffer import DEFAULT_BUCKET_SIZE


def build_data_parallel(model: nn.Module, opt_cfg: OptimizerConfig, *, seed: int, use_distributed_optimizer: bool,
                        bucket_size: int | None = DEFAULT_BUCKET_SIZE, late_sync_params: Iterable[nn.Parameter] = (),
                        before_late_sync: Callable[[], None] | None = None, overlap_grad_reduce: bool = False,
                        overlap_param_gather: bool = False, average_in_collective: bool = False,
                        ) -> tuple[DistributedDataParallel, DistributedOptimizer]:
    """Wrap one model chunk (this rank's pipeline stage) and build its optimizer over parallel_state's dp group.
    Its parameters need their SR streams (optimizer/sr_streams.assign_sr_streams) first.

    With pp > 1 and tied embeddings pass `late_sync_params=tied_embedding_params(model)` and
    `before_late_sync=lambda: allreduce_tied_embedding_grads(model)` (megatron_sr.pipeline): the
    embedding's bucket then waits for the stage all-reduce, which needs the full gradient."""
    grad_dtype = precision_mode(opt_cfg.precision).grad_dtype(opt_cfg.grad_dtype)
    config = DDPConfig(grad_dtype=grad_dtype, use_distributed_optimizer=use_distributed_optimizer,
                       bucket_size=bucket_size, overlap_grad_reduce=overlap_grad_reduce,
                       overlap_param_gather=overlap_param_gather, average_in_collective=average_in_collective)
    ddp = DistributedDataParallel(model, config, late_sync_params=late_sync_params, before_late_sync=before_late_sync)
    return ddp, DistributedOptimizer(ddp, opt_cfg, seed=seed)
