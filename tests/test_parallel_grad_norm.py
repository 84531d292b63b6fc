"""The global gradient norm counts every parameter once across tp, pp (tied embedding) and dp shards."""

import math

import pytest
import torch
from multiproc import run_ranks
from torch import nn

from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.grad_norm import (
    clip_coefficient,
    clip_grads_,
    counts_in_grad_norm,
    global_grad_norm,
    model_grad_norm,
)


def _full_grads() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    shapes = {"embedding": (6, 4), "w0": (8, 4), "norm0": (4,), "w1": (8, 4), "norm1": (4,)}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _param(t: torch.Tensor, tp: bool = False, shared: bool = False) -> nn.Parameter:
    p = nn.Parameter(t.clone())
    p.tensor_model_parallel = tp
    if shared:
        p.shared_embedding_copy = True
    p.grad = t.clone()
    return p


def test_counting_rules_single_rank():
    replicated, sliced, copy = _param(torch.ones(2)), _param(torch.ones(2), tp=True), _param(torch.ones(2), shared=True)
    assert counts_in_grad_norm(replicated, 0) and not counts_in_grad_norm(replicated, 1)
    assert counts_in_grad_norm(sliced, 1)
    assert not counts_in_grad_norm(copy, 0)
    grads = _full_grads()
    params = [_param(g) for g in grads.values()]
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert model_grad_norm(params).item() == pytest.approx(expected, rel=1e-6)


def test_clipping():
    g = [torch.full((4,), 3.0), torch.full((2,), 4.0)]
    norm = math.sqrt(4 * 9 + 2 * 16)
    coef = clip_grads_(g, norm, max_norm=1.0)
    assert coef == pytest.approx(1.0 / (norm + 1e-6))
    assert math.sqrt(sum(float((t ** 2).sum()) for t in g)) == pytest.approx(1.0, rel=1e-5)
    assert clip_coefficient(0.5, 1.0) == 1.0 and clip_coefficient(5.0, 0.0) == 1.0
    assert clip_coefficient(float("inf"), 1.0) == 1.0


def _layout_body(tp: int, pp: int, sharded: bool) -> float:
    """Stage 0: embedding, w0, norm0; stage 1: w1, norm1 and the tied embedding copy (pp=2)."""
    ps.initialize_model_parallel(tp, pp)
    grads = _full_grads()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    owned = {0: ["embedding", "w0", "norm0"], 1: ["w1", "norm1"]}
    names = owned[0] + owned[1] if pp == 1 else owned[pp_rank]
    pairs = []
    for name in names:
        is_tp = name != "norm0" and name != "norm1"
        g = grads[name].chunk(tp, dim=0)[tp_rank] if is_tp else grads[name]
        pairs.append((_param(g, tp=is_tp), g))
    if pp > 1 and ps.is_pipeline_last_stage():
        g = grads["embedding"].chunk(tp, dim=0)[tp_rank]
        pairs.append((_param(g, tp=True, shared=True), g))
    if sharded:  # each dp rank keeps a contiguous piece of every flattened grad
        pairs = [(p, g.reshape(-1).tensor_split(dp)[dp_rank]) for p, g in pairs]
    return float(global_grad_norm(pairs, sharded_over_dp=sharded))


def _all_layouts() -> list[float]:
    import torch.distributed as dist

    out = []
    for tp, pp in [(2, 2), (1, 2), (2, 1), (1, 1)]:
        for sharded in (False, True):
            out.append(_layout_body(tp, pp, sharded))
            ps.destroy_model_parallel()
            dist.barrier()
    return out


@pytest.mark.slow
def test_norm_is_layout_independent_on_eight_ranks():
    grads = _full_grads()
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    for rank, norms in enumerate(run_ranks(8, _all_layouts)):
        for norm in norms:
            assert norm == pytest.approx(expected, rel=1e-6), rank
