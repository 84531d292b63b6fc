"""Data parallelism: contiguous param/grad buffers in buckets, DDP with overlapped gradient
collectives, and the sharded SR distributed optimizer."""

from .data_parallel import DDPConfig, DistributedDataParallel
from .distributed_optimizer import DistributedOptimizer, merge_state_dicts
from .factory import build_data_parallel
from .param_and_grad_buffer import Bucket, ParamAndGradBuffer

__all__ = ["DDPConfig", "DistributedDataParallel", "DistributedOptimizer", "merge_state_dicts",
           "build_data_parallel", "Bucket", "ParamAndGradBuffer"]
