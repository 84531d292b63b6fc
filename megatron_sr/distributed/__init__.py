"""Data parallelism: contiguous param/grad buffers in buckets, DDP with overlapped gradient
collectives, the sharded SR distributed optimizer, and sharded checkpoints."""

from .data_parallel import DDPConfig, DistributedDataParallel
from .distributed_optimizer import DistributedOptimizer, OptimizerConfig, StepResult, merge_state_dicts
from .param_and_grad_buffer import Bucket, ParamAndGradBuffer

__all__ = ["DDPConfig", "DistributedDataParallel", "DistributedOptimizer", "OptimizerConfig", "StepResult",
           "merge_state_dicts", "Bucket", "ParamAndGradBuffer"]
