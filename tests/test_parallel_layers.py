"""Tensor-parallel layers (tp = 2, with and without sequence parallelism) against one process's math."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks

from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
    register_sequence_parallel_grad_hooks,
    sequence_parallel_param,
    vocab_parallel_cross_entropy,
)
from megatron_sr.parallel.mappings import scatter_to_sequence_parallel_region
from megatron_sr.parallel.random import get_rng_tracker, model_parallel_seed

V, H, FF, B, S = 16, 8, 12, 2, 4


def _init(seed: int):
    def fill(t: torch.Tensor) -> None:
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return fill


def _full(shape, seed):
    t = torch.empty(shape)
    _init(seed)(t)
    return t


def _data():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, V, (B, S), generator=gen), torch.randint(0, V, (B, S), generator=gen)


def _reference() -> dict:
    """The same block with full weights and plain torch ops (what tp = 1 computes)."""
    tokens, target = _data()
    w = {"emb": _full((V, H), 1), "ln": torch.linspace(0.5, 1.5, H), "col": _full((FF, H), 2),
         "col_b": torch.zeros(FF), "row": _full((H, FF), 3), "row_b": torch.zeros(H)}
    for t in w.values():
        t.requires_grad_(True)
    h = F.embedding(tokens, w["emb"])
    x = F.layer_norm(h, (H,), w["ln"])
    h = h + F.linear(F.gelu(F.linear(x, w["col"], w["col_b"])), w["row"], w["row_b"])
    loss = F.cross_entropy(F.linear(h, w["emb"]).reshape(-1, V), target.reshape(-1))
    loss.backward()
    return {"loss": loss.item(), **{k: t.grad for k, t in w.items()}}


class _Block(torch.nn.Module):
    def __init__(self, use_hooks: bool):
        super().__init__()
        self.emb = VocabParallelEmbedding(V, H, init_method=_init(1))
        self.ln = torch.nn.Parameter(torch.linspace(0.5, 1.5, H))
        self.col = ColumnParallelLinear(H, FF, init_method=_init(2))
        self.row = RowParallelLinear(FF, H, init_method=_init(3))
        self.use_hooks = use_hooks
        if use_hooks:
            register_sequence_parallel_grad_hooks([self.ln])

    def forward(self, tokens, target):
        h = self.emb(tokens)
        if ps.get_sequence_parallel():
            h = scatter_to_sequence_parallel_region(h, ps.get_sequence_dim())
        ln = self.ln if self.use_hooks else sequence_parallel_param(self.ln)
        x = F.layer_norm(h, (H,), ln)
        h = h + self.row(F.gelu(self.col(x)))
        logits = parallel_lm_logits(h, self.emb.weight)
        return vocab_parallel_cross_entropy(logits, target).mean()


def _tp_block(sequence_parallel: bool, use_hooks: bool) -> dict:
    ps.set_sequence_parallel(sequence_parallel)
    block = _Block(use_hooks)
    tokens, target = _data()
    loss = block(tokens, target)
    loss.backward()
    return {"loss": loss.item(), "emb": block.emb.weight.grad, "ln": block.ln.grad, "col": block.col.weight.grad,
            "col_b": block.col.bias.grad, "row": block.row.weight.grad, "row_b": block.row.bias.grad}


def _gather_slice_checks() -> dict:
    """gather_output / input_is_parallel=False give the full linear on every rank."""
    x = _full((B, S, H), 9)
    col = ColumnParallelLinear(H, FF, init_method=_init(2), gather_output=True)
    row = RowParallelLinear(H, FF, init_method=_init(4), input_is_parallel=False, bias=False)
    logits = parallel_lm_logits(x, _full((V, H), 1).chunk(2)[ps.get_tensor_model_parallel_rank()], gather_output=True)
    return {"col": col(x).detach(), "row": row(x).detach(), "logits": logits.detach()}


def _rng_checks() -> dict:
    model_parallel_seed(1234)
    x = torch.ones(64)
    outside = F.dropout(x, 0.5)
    with get_rng_tracker().fork():
        inside = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    model_parallel_seed(1234)
    outside2, after2 = F.dropout(x, 0.5), F.dropout(x, 0.5)  # the default stream did not see the fork
    return {"outside": outside, "inside": inside, "after": after, "restored": torch.equal(after, after2)
            and torch.equal(outside, outside2)}


def _body() -> dict:
    ps.initialize_model_parallel(2, 1)
    out = {"plain": _tp_block(False, False), "sp": _tp_block(True, False), "sp_hooks": _tp_block(True, True)}
    ps.set_sequence_parallel(False)
    out["gather"] = _gather_slice_checks()
    out["rng"] = _rng_checks()
    out["rank"] = ps.get_tensor_model_parallel_rank()
    dist.barrier()
    return out


@pytest.mark.slow
def test_tensor_parallel_layers_match_one_process():
    ref = _reference()
    results = run_ranks(2, _body)
    split_dim = {"emb": 0, "col": 0, "col_b": 0, "row": 1}
    for res in results:
        r = res["rank"]
        for mode in ("plain", "sp", "sp_hooks"):
            got = res[mode]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), mode
            for name in ("emb", "ln", "col", "col_b", "row", "row_b"):
                expected = ref[name].chunk(2, dim=split_dim[name])[r] if name in split_dim else ref[name]
                torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
        x = _full((B, S, H), 9)
        torch.testing.assert_close(res["gather"]["col"], F.linear(x, _full((FF, H), 2)))
        torch.testing.assert_close(res["gather"]["row"], F.linear(x, _full((FF, H), 4)))
        torch.testing.assert_close(res["gather"]["logits"], F.linear(x, _full((V, H), 1)))
        assert res["rng"]["restored"]
    a, b = results[0]["rng"], results[1]["rng"]
    assert torch.equal(a["outside"], b["outside"]) and torch.equal(a["after"], b["after"])
    assert not torch.equal(a["inside"], b["inside"])


def test_single_rank_layers_are_plain():
    assert ps.get_tensor_model_parallel_world_size() == 1
    ref = _reference()
    got = _tp_block(True, True)  # sequence parallel is a no-op with tp = 1
    ps.set_sequence_parallel(False)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    torch.testing.assert_close(got["col"], ref["col"])


def test_cross_entropy_tp2_matches_torch_in_bf16_logits():
    """The vocab-parallel function itself (not the tp=1 shortcut), run on one process against F.cross_entropy."""
    from megatron_sr.parallel.cross_entropy import VocabParallelCrossEntropy

    assert ps.get_tensor_model_parallel_world_size() == 1
    logits = (torch.randn(3, 5, V) * 4).requires_grad_(True)
    target = torch.randint(0, V, (3, 5))
    orig = dist.all_reduce
    try:
        dist.all_reduce = lambda *a, **k: None  # a group of one: the all-reduces are identities
        loss = VocabParallelCrossEntropy.apply(logits, target)
    finally:
        dist.all_reduce = orig
    ref = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(loss, ref)
    g1, = torch.autograd.grad(loss.sum(), logits)
    g2, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)
