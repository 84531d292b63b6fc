"""Sharded checkpoints: every rank writes its own part, in Megatron's directory layout.

    <dir>/latest_checkpointed_iteration.txt       "10"
    <dir>/iter_0000010/metadata.json              format, iteration, tp, pp, dp, distributed optimizer
    <dir>/iter_0000010/common.pt                  trainer state (config, consumed samples, ...) from rank 0
    <dir>/iter_0000010/mp_rank_TT[_PPP]/model.pt    this (tp, pp) rank's parameters, written by dp rank 0
    <dir>/iter_0000010/mp_rank_TT[_PPP]/optim_dp_DDD.pt  optimizer state of dp rank DDD (only dp 0 when unsharded)
    <dir>/iter_0000010/mp_rank_TT[_PPP]/rank_dp_DDD.pt   per-rank state (RNG), when given

model.pt = {"model": {name: tensor}, "params": {name: {"partition_dim", "shared_embedding_copy"}},
"tp_rank", "pp_rank", "tp", "pp"}. Optimizer states are stored per named parameter piece
(distributed_optimizer.state_dict), so a checkpoint loads at any dp size; at another tp or pp each
rank reshards it on the fly (convert.py), or tools/convert_checkpoint.py converts it offline. Saving is
atomic: all ranks write into the staging directory, then rank 0 renames it in and replaces the `latest`
file (layout.py), so a crash never leaves a half-written iteration.
A shared filesystem is assumed across nodes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.data_parallel import DistributedDataParallel
from ..distributed.distributed_optimizer import DistributedOptimizer
from ..parallel import parallel_state as ps
from .convert import resharded_for_rank
from .layout import (
    LATEST,
    SHARDED_FORMAT,
    CheckpointWriteError,
    atomic_torch_save,
    atomic_write_text,
    iteration_dir,
    load_file,
    my_mp_rank_dir,
    publish_iteration,
    read_latest_iteration,
    read_metadata,
    staging_dir,
)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_shard(model: nn.Module) -> dict:
    """This rank's parameters (copied: they are views into one big buffer) and what conversion needs."""
    module = _unwrap(model)
    params = dict(module.named_parameters())
    return {
        "model": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "params": {k: {"partition_dim": int(getattr(p, "partition_dim", -1)),
                       "shared_embedding_copy": bool(getattr(p, "shared_embedding_copy", False))}
                   for k, p in params.items()},
        "tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
    }


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def save_checkpoint(root: str | Path, iteration: int, model: nn.Module, optimizer=None, *,
                    common: dict | None = None, rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        staging_dir(final)
    _barrier()
    dp_rank = ps.get_data_parallel_rank()
    sharded = isinstance(optimizer, DistributedOptimizer) and optimizer.shard
    failure = None
    try:  # a rank that fails (a full disk) must not leave the others waiting in the barrier
        shard_dir = tmp / my_mp_rank_dir()
        shard_dir.mkdir(exist_ok=True)
        if dp_rank == 0:
            atomic_torch_save(model_shard(model), shard_dir / "model.pt")
        if optimizer is not None and (sharded or dp_rank == 0):
            atomic_torch_save(optimizer.state_dict(), shard_dir / f"optim_dp_{dp_rank:03d}.pt")
        if rank_state is not None:
            atomic_torch_save(rank_state, shard_dir / f"rank_dp_{dp_rank:03d}.pt")
    except OSError as exc:
        failure = exc
    if ps.any_rank(failure is not None):
        _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing of this save is kept; `latest` still names the last
        raise failure or CheckpointWriteError(f"{final}: another rank could not write its part of the checkpoint")
    _barrier()
    if _rank() == 0:
        meta = {"format": SHARDED_FORMAT, "iteration": iteration, "tp": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
                "distributed_optimizer": bool(sharded)}
        atomic_write_text(json.dumps(meta, indent=1), tmp / "metadata.json")
        atomic_torch_save(common or {}, tmp / "common.pt")
        publish_iteration(tmp, final, iteration)
    _barrier()
    return final


def load_model_shard(model: nn.Module, shard: dict, source: str) -> None:
    module = _unwrap(model)
    own = module.state_dict()
    missing = sorted(set(own) - set(shard["model"]))
    unexpected = sorted(set(shard["model"]) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, tensor in own.items():
            saved = shard["model"][name]
            if saved.shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(saved.shape)}, the model {tuple(tensor.shape)}")
            tensor.copy_(saved)  # in place: parameters stay views into the DDP buffer


@torch.no_grad()
def load_into_per_param_optimizer(optimizer, states, source: str) -> None:
    """Sharded optimizer states (named pieces) into the single-process SRAdamW, whose state_dict holds
    `names` and per-parameter `exp_avg` / `exp_avg_sq` / `master` lists (optimizer/sr_adamw.py)."""
    target = optimizer.state_dict()
    if "names" not in target:
        raise ValueError(f"{source}: cannot load sharded optimizer states into {type(optimizer).__name__}")
    index = {name: i for i, name in enumerate(target["names"])}
    covered = [0] * len(index)
    step = lr = None
    saved_master = True
    for state in states:
        step, lr = int(state["step"]), float(state["lr"])
        saved_master &= state.get("master") is not None
        for sp in state["pieces"]:
            if sp["name"] not in index:
                raise ValueError(f"{source}: optimizer state for {sp['name']}, which the model does not have")
            i, n, off, src = index[sp["name"]], sp["numel"], sp["offset"], sp["state_offset"]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if target.get(key) is not None and state.get(key) is not None:
                    target[key][i].view(-1)[off:off + n].copy_(state[key][src:src + n])
            covered[i] += n
    for name, i in index.items():
        if covered[i] != target["exp_avg"][i].numel():
            raise ValueError(f"{source}: optimizer state of {name} is incomplete ({covered[i]} elements)")
    target["step"], target["lr"] = step, lr
    if not saved_master:
        target["master"] = None  # SRAdamW then starts its FP32 masters from the loaded BF16 params
    optimizer.load_state_dict(target)


def _load_optimizer(optimizer, states, source: str) -> None:
    """States is an iterator of saved optimizer states (read one at a time)."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_state_dicts(states)
    else:
        load_into_per_param_optimizer(optimizer, states, source)


def load_checkpoint(root: str | Path, model: nn.Module, optimizer=None, *, iteration: int | None = None,
                    load_optimizer: bool = True, reshard: bool = True) -> tuple[int, dict, dict | None]:
    """Load into an already built model/optimizer. Returns (iteration, common, rank_state or None).

    Any dp size loads directly. A different tp/pp layout is resharded on the fly (reshard=True; each
    rank reads the whole checkpoint) or refused (reshard=False: use tools/convert_checkpoint.py)."""
    root = Path(root)
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {LATEST}")
    directory = iteration_dir(root, iteration)
    meta = read_metadata(directory)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    shard_dir = directory / my_mp_rank_dir()
    if meta.get("single_process") or (meta["tp"], meta["pp"]) != (tp, pp):
        if not reshard and not meta.get("single_process"):
            raise ValueError(f"{directory}: saved with tp={meta['tp']} pp={meta['pp']}, running tp={tp} pp={pp}; "
                             "convert it with tools/convert_checkpoint.py")
        # Another tp/pp layout: every rank reads the whole checkpoint and cuts out its part (memory: one
        # full model + states per rank; for large models convert offline with tools/convert_checkpoint.py).
        named = list(_unwrap(model).named_parameters())
        copies = [n for n, p in named if getattr(p, "shared_embedding_copy", False)]
        dims = {n: int(getattr(p, "partition_dim", -1)) for n, p in named}  # for a one-process checkpoint
        shard, optim, common = resharded_for_rank(directory, tp, pp, ps.get_tensor_model_parallel_rank(),
                                          ps.get_pipeline_model_parallel_rank(), copies, dims)
        load_model_shard(model, shard, f"{directory} (resharded from tp={meta['tp']} pp={meta['pp']})")
        if optimizer is not None and load_optimizer and optim is not None:
            _load_optimizer(optimizer, iter([optim]), str(directory))
    else:
        common = load_file(directory / "common.pt")
        load_model_shard(model, load_file(shard_dir / "model.pt"),
                         str(shard_dir / "model.pt"))
        if optimizer is not None and load_optimizer:
            files = sorted(shard_dir.glob("optim_dp_*.pt"))
            if not files:
                raise FileNotFoundError(f"{shard_dir}: no optimizer state (optim_dp_*.pt)")
            _load_optimizer(optimizer, (load_file(f) for f in files),
                            str(shard_dir))
    rank_file = shard_dir / f"rank_dp_{ps.get_data_parallel_rank():03d}.pt"
    rank_state = None
    if (meta["tp"], meta["pp"], meta["dp"]) == (tp, pp, ps.get_data_parallel_world_size()) and rank_file.exists():
        rank_state = load_file(rank_file)
    return iteration, common, rank_state
