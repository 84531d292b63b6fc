"""Where the scalars go: TensorBoard (--tensorboard-dir) and, optionally, Weights & Biases (--wandb-project).

    writer = build_writer(cfg)                 # None on every rank but the last, or without either flag
    writer.add_scalar("lm loss", 4.2, iteration, samples=consumed_train_samples)

As in Megatron only the last rank writes (it holds the last pipeline stage's loss; every rank here logs the
same values). Each scalar goes to TensorBoard as `name` over iterations and, when `samples` is given, as
`name vs samples` over consumed samples; wandb gets `name` at step `iteration`. wandb is optional: it is
imported only with --wandb-project (megatron_sr/config refuses the flag, with `pip install wandb`, when it is
missing) and honours its own environment (WANDB_MODE=offline writes under --wandb-save-dir without network).
"""

from __future__ import annotations

import os
import resource
import sys

import torch
import torch.distributed as dist

from ..config import Config


class ScalarWriter:
    def __init__(self, tensorboard=None, wandb_module=None):
        self.tensorboard, self.wandb = tensorboard, wandb_module

    def add_scalar(self, name: str, value: float, iteration: int, samples: int | None = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, iteration)
            if samples is not None:
                self.tensorboard.add_scalar(f"{name} vs samples", value, samples)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_scalars(device: torch.device) -> dict[str, float]:
    """--log-memory-to-tensorboard: Megatron's four CUDA allocator scalars; on the CPU, where there is no
    allocator to ask, the process's peak resident memory. Host-side reads only (no device synchronisation)."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return {"mem-max-rss-bytes": float(peak if sys.platform == "darwin" else peak * 1024)}


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _tensorboard(cfg: Config):
    from torch.utils.tensorboard import SummaryWriter

    t = cfg.training
    return SummaryWriter(log_dir=t.tensorboard_dir, max_queue=t.tensorboard_queue_size)


def _wandb(cfg: Config):
    import wandb

    t = cfg.training
    save_dir = t.wandb_save_dir or os.path.join(t.save, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    kwargs = {"dir": save_dir, "name": t.wandb_exp_name, "project": t.wandb_project, "config": cfg.to_dict()}
    if t.wandb_entity:
        kwargs["entity"] = t.wandb_entity
    wandb.init(**kwargs)
    return wandb


def build_writer(cfg: Config) -> ScalarWriter | None:
    t = cfg.training
    if not (t.tensorboard_dir or t.wandb_project) or not is_last_rank():
        return None
    return ScalarWriter(_tensorboard(cfg) if t.tensorboard_dir else None, _wandb(cfg) if t.wandb_project else None)
