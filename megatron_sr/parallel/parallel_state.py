"""Tensor-, pipeline- and data-parallel process groups (tp fastest, then dp, then pp).

Global rank r of a world of tp * dp * pp ranks sits at
    tp_rank = r % tp,  dp_rank = (r // tp) % dp,  pp_rank = r // (tp * dp)
so a tensor-parallel group is a run of neighbouring ranks (one node's fast links), and a pipeline
stage holds a contiguous block of tp * dp ranks.

Until `initialize_model_parallel` is called every size is 1 and every rank 0 and every group None,
so single-process code paths need no process group at all. Code that communicates checks for a
size of 1 first and skips the collective.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_TP_SIZE = 1
_TP_RANK = 0
_PP_SIZE = 1
_PP_RANK = 0
_DP_SIZE = 1
_DP_RANK = 0
_TP_GROUP = None
_PP_GROUP = None
_DP_GROUP = None
_MP_GROUP = None  # tp x pp: the ranks that together hold one full model replica
_EMBEDDING_GROUP = None  # first and last pipeline stage of one (tp, dp) column: tied embeddings
_EMBEDDING_RANKS: list[int] = [0]
_PP_GLOBAL_RANKS: list[int] = [0]
_DP_GLOBAL_RANKS: list[int] = [0]
_TP_GLOBAL_RANKS: list[int] = [0]
_INITIALIZED = False
_OWNS_PROCESS_GROUP = False
_SEQUENCE_PARALLEL = False
_SEQUENCE_DIM = 1
_CREATED_GROUPS: list = []  # every new_group we made (also those this rank is not in), freed on destroy


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def layout_ranks(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """The rank lists of every tp, dp, pp, model-parallel and embedding group (pure function)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp} "
                         f"x pipeline-parallel size {pp}")
    dp = world_size // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return p * tp * dp + d * tp + t

    groups: dict[str, list[list[int]]] = {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }
    # The embedding group: first and last stage of each pipeline (just the one stage when pp == 1).
    groups["embedding"] = [sorted({ranks[0], ranks[-1]}) for ranks in groups["pp"]]
    return groups


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              *, backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Create the process groups from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Initialises torch.distributed itself when nobody has yet (NCCL on CUDA, gloo on CPU). Every rank
    must call this with the same sizes: `new_group` is collective, so every group is created on every
    rank in the same order.
    """
    global _TP_SIZE, _TP_RANK, _PP_SIZE, _PP_RANK, _DP_SIZE, _DP_RANK, _TP_GROUP, _PP_GROUP, _DP_GROUP
    global _MP_GROUP, _EMBEDDING_GROUP, _EMBEDDING_RANKS, _PP_GLOBAL_RANKS, _DP_GLOBAL_RANKS, _TP_GLOBAL_RANKS
    global _INITIALIZED, _OWNS_PROCESS_GROUP
    if _INITIALIZED:
        raise RuntimeError("initialize_model_parallel was already called; call destroy_model_parallel first")
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE", 1)
        backend = backend or _default_backend()
        if backend == "nccl":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # One process without torchrun: a private single-rank group on a local store.
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _OWNS_PROCESS_GROUP = True
    world_size, rank = dist.get_world_size(), dist.get_rank()
    groups = layout_ranks(world_size, tp, pp)
    group_backend = backend or dist.get_backend()

    def build(kind: str):
        mine, my_ranks = None, None
        for ranks in groups[kind]:
            group = dist.new_group(ranks, backend=group_backend)
            if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
                _CREATED_GROUPS.append(group)
            if rank in ranks:
                mine, my_ranks = group, ranks
        return mine, my_ranks

    _TP_GROUP, _TP_GLOBAL_RANKS = build("tp")
    _DP_GROUP, _DP_GLOBAL_RANKS = build("dp")
    _PP_GROUP, _PP_GLOBAL_RANKS = build("pp")
    _MP_GROUP, _ = build("mp")
    _EMBEDDING_GROUP, _EMBEDDING_RANKS = build("embedding")
    _TP_SIZE, _PP_SIZE, _DP_SIZE = tp, pp, world_size // (tp * pp)
    _TP_RANK = rank % tp
    _DP_RANK = (rank // tp) % _DP_SIZE
    _PP_RANK = rank // (tp * _DP_SIZE)
    _INITIALIZED = True


def destroy_model_parallel() -> None:
    """Forget the groups (sizes back to 1); also tears down torch.distributed if we started it."""
    global _TP_SIZE, _TP_RANK, _PP_SIZE, _PP_RANK, _DP_SIZE, _DP_RANK, _TP_GROUP, _PP_GROUP, _DP_GROUP
    global _MP_GROUP, _EMBEDDING_GROUP, _EMBEDDING_RANKS, _PP_GLOBAL_RANKS, _DP_GLOBAL_RANKS, _TP_GLOBAL_RANKS
    global _INITIALIZED, _OWNS_PROCESS_GROUP
    if dist.is_initialized():
        if _OWNS_PROCESS_GROUP:
            dist.destroy_process_group()  # also frees every subgroup
        else:
            for group in _CREATED_GROUPS:
                dist.destroy_process_group(group)
    _CREATED_GROUPS.clear()
    _TP_SIZE = _PP_SIZE = _DP_SIZE = 1
    _TP_RANK = _PP_RANK = _DP_RANK = 0
    _TP_GROUP = _PP_GROUP = _DP_GROUP = _MP_GROUP = _EMBEDDING_GROUP = None
    _EMBEDDING_RANKS, _PP_GLOBAL_RANKS, _DP_GLOBAL_RANKS, _TP_GLOBAL_RANKS = [0], [0], [0], [0]
    _INITIALIZED = False
    _OWNS_PROCESS_GROUP = False
    set_sequence_parallel(False)


def set_sequence_parallel(enabled: bool, sequence_dim: int = 1) -> None:
    """Turn on --sequence-parallel for the parallel layers built afterwards.

    `sequence_dim` is the sequence dimension of the model's activations (1 for [batch, seq, hidden]).
    With a tensor-parallel size of 1 sequence parallelism is a no-op.
    """
    global _SEQUENCE_PARALLEL, _SEQUENCE_DIM
    _SEQUENCE_PARALLEL, _SEQUENCE_DIM = bool(enabled), int(sequence_dim)


def get_sequence_parallel() -> bool:
    """Whether activations between tensor-parallel regions are split along the sequence (only when tp > 1)."""
    return _SEQUENCE_PARALLEL and _TP_SIZE > 1


def get_sequence_dim() -> int:
    return _SEQUENCE_DIM


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def get_tensor_model_parallel_world_size() -> int:
    return _TP_SIZE


def get_tensor_model_parallel_rank() -> int:
    return _TP_RANK


def get_tensor_model_parallel_group():
    return _TP_GROUP


def get_tensor_model_parallel_global_ranks() -> list[int]:
    return list(_TP_GLOBAL_RANKS)


def get_pipeline_model_parallel_world_size() -> int:
    return _PP_SIZE


def get_pipeline_model_parallel_rank() -> int:
    return _PP_RANK


def get_pipeline_model_parallel_group():
    return _PP_GROUP


def get_pipeline_model_parallel_global_ranks() -> list[int]:
    return list(_PP_GLOBAL_RANKS)


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wraps around, like Megatron)."""
    return _PP_GLOBAL_RANKS[(_PP_RANK + 1) % _PP_SIZE]


def get_pipeline_model_parallel_prev_rank() -> int:
    return _PP_GLOBAL_RANKS[(_PP_RANK - 1) % _PP_SIZE]


def get_data_parallel_world_size() -> int:
    return _DP_SIZE


def get_data_parallel_rank() -> int:
    return _DP_RANK


def get_data_parallel_group():
    return _DP_GROUP


def get_data_parallel_global_ranks() -> list[int]:
    return list(_DP_GLOBAL_RANKS)


def get_model_parallel_group():
    """tp x pp ranks holding one model replica (the gradient norm is reduced over them)."""
    return _MP_GROUP


def get_model_parallel_world_size() -> int:
    return _TP_SIZE * _PP_SIZE


def get_embedding_group():
    """First and last pipeline stage of this rank's pipeline (None when not initialised)."""
    return _EMBEDDING_GROUP


def get_embedding_global_ranks() -> list[int]:
    return list(_EMBEDDING_RANKS)


def is_rank_in_embedding_group() -> bool:
    return is_pipeline_first_stage() or is_pipeline_last_stage()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a MAX all-reduce over the whole world).

    For decisions that must be collective, such as stopping on SIGTERM or after --exit-duration-in-mins:
    if one rank left the loop while the others entered the next iteration's collectives, they would hang.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_pipeline_first_stage() -> bool:
    return _PP_RANK == 0


def is_pipeline_last_stage() -> bool:
    return _PP_RANK == _PP_SIZE - 1
