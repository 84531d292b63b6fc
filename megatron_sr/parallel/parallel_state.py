"""Tensor-, pipeline- and data-parallel process groups (tp fastest, then dp, then pp).

Until `initialize_model_parallel` is called every size is 1 and every rank 0, so single-process
code paths need no process group at all.
"""

from __future__ import annotations

_TP_SIZE = 1
_TP_RANK = 0
_PP_SIZE = 1
_PP_RANK = 0
_DP_SIZE = 1
_DP_RANK = 0
_TP_GROUP = None
_PP_GROUP = None
_DP_GROUP = None


def get_tensor_model_parallel_world_size() -> int:
    return _TP_SIZE


def get_tensor_model_parallel_rank() -> int:
    return _TP_RANK


def get_tensor_model_parallel_group():
    return _TP_GROUP


def get_pipeline_model_parallel_world_size() -> int:
    return _PP_SIZE


def get_pipeline_model_parallel_rank() -> int:
    return _PP_RANK


def get_pipeline_model_parallel_group():
    return _PP_GROUP


def get_data_parallel_world_size() -> int:
    return _DP_SIZE


def get_data_parallel_rank() -> int:
    return _DP_RANK


def get_data_parallel_group():
    return _DP_GROUP


def is_pipeline_first_stage() -> bool:
    return _PP_RANK == 0


def is_pipeline_last_stage() -> bool:
    return _PP_RANK == _PP_SIZE - 1
