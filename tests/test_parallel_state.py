"""Process-group layout: tp fastest, then dp, then pp; groups really connect the ranks they claim."""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from megatron_sr.parallel import parallel_state as ps


def test_defaults_without_init_are_single_rank():
    assert not ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == ps.get_pipeline_model_parallel_world_size() == 1
    assert ps.get_data_parallel_world_size() == 1
    assert ps.get_tensor_model_parallel_rank() == ps.get_data_parallel_rank() == 0
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    assert ps.get_data_parallel_group() is None and ps.get_tensor_model_parallel_group() is None
    assert ps.any_rank(True) and not ps.any_rank(False)


def test_layout_ranks_tp_fastest_then_dp_then_pp():
    groups = ps.layout_ranks(8, tp=2, pp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert groups["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ps.layout_ranks(4, tp=1, pp=1)["dp"] == [[0, 1, 2, 3]]
    assert ps.layout_ranks(4, tp=1, pp=4)["embedding"] == [[0, 3]]
    assert ps.layout_ranks(2, tp=1, pp=1)["embedding"] == [[0], [1]]


def test_layout_ranks_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        ps.layout_ranks(6, tp=4, pp=1)
    with pytest.raises(ValueError, match=">= 1"):
        ps.layout_ranks(4, tp=0, pp=1)


def _sum_over(group) -> int:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=group)
    return int(t.item())


def _layout_body(tp: int, pp: int) -> dict:
    ps.initialize_model_parallel(tp, pp)
    out = {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        "sum_tp": _sum_over(ps.get_tensor_model_parallel_group()),
        "sum_dp": _sum_over(ps.get_data_parallel_group()),
        "sum_pp": _sum_over(ps.get_pipeline_model_parallel_group()),
        "sum_mp": _sum_over(ps.get_model_parallel_group()),
        "next": ps.get_pipeline_model_parallel_next_rank(),
        "prev": ps.get_pipeline_model_parallel_prev_rank(),
        "embedding": ps.get_embedding_global_ranks(),
    }
    if ps.is_rank_in_embedding_group():
        out["sum_emb"] = _sum_over(ps.get_embedding_group())
    out["any"] = (ps.any_rank(dist.get_rank() == 5), ps.any_rank(False))
    ps.destroy_model_parallel()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_group() is None
    return out


@pytest.mark.slow
def test_groups_on_eight_gloo_ranks():
    results = run_ranks(8, _layout_body, 2, 2)
    groups = ps.layout_ranks(8, 2, 2)

    def group_of(kind, rank):
        return next(g for g in groups[kind] if rank in g)

    for rank, res in enumerate(results):
        assert res["tp"] == (rank % 2, 2)
        assert res["dp"] == ((rank // 2) % 2, 2)
        assert res["pp"] == (rank // 4, 2)
        for kind in ("tp", "dp", "pp", "mp"):
            assert res[f"sum_{kind}"] == sum(group_of(kind, rank)), (rank, kind)
        assert res["sum_emb"] == sum(group_of("embedding", rank))
        assert res["next"] == res["prev"] == (rank + 4) % 8
        assert res["embedding"] == group_of("embedding", rank)
        assert res["any"] == (True, False)
