"""The optimizer-step dispatcher without a GPU: reference fallback, one warning with its reason."""

import warnings

import pytest
import torch

from megatron_sr.optimizer import AdamWConstants, SRKey, adamw_reference_, dispatch, fused, step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_, fused_unusable_reason

CONSTS = AdamWConstants.make(0.9, 0.95, 1e-8)
KEY = SRKey.from_seed(5)


def _chunk(n, base=0, wd=0.1, state=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return AdamWChunk(torch.randn(n, generator=g).bfloat16(), (torch.randn(n, generator=g) * 1e-2).bfloat16(),
                      (torch.randn(n, generator=g) * 1e-3).to(state), (torch.rand(n, generator=g) * 1e-5).to(state),
                      base, wd)


def _clone(c):
    return AdamWChunk(c.param.clone(), c.grad.clone(), c.exp_avg.clone(), c.exp_avg_sq.clone(), c.base_index,
                      c.weight_decay)


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", False)


def test_cpu_fallback_matches_reference_and_warns_once(fresh_warning, monkeypatch):
    monkeypatch.setenv("MEGATRON_SR_CPU_FAST", "0")  # the CPU library off: the fall-back (tests/test_cpu_fast_path.py)
    chunks = [_chunk(1000, 0, 0.1), _chunk(37, 1000, 0.0, torch.bfloat16, seed=1), _chunk(0, 1037)]
    want = [_clone(c) for c in chunks]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            scalars = step_scalars(1e-3, step, 0.9, 0.95, "cpu")
            path = adamw_step_(chunks, scalars=scalars, step=torch.tensor(step), consts=CONSTS, rounding="stochastic",
                               key=KEY)
            for w in want:
                adamw_reference_(w.param, w.grad, w.exp_avg, w.exp_avg_sq, scalars=scalars, step=step, consts=CONSTS,
                                 weight_decay=w.weight_decay, rounding="stochastic", key=KEY, base_index=w.base_index)
    ours = [w for w in caught if "fused SR AdamW kernel not used" in str(w.message)]
    assert len(ours) == 1 and "cpu" in str(ours[0].message)
    assert path == "reference"
    for c, w in zip(chunks, want):
        for name in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(c, name), getattr(w, name)), name


def test_reasons_for_not_using_the_kernel(monkeypatch):
    scalars = step_scalars(1e-3, 1, 0.9, 0.95, "cpu")
    assert "not CUDA" in fused_unusable_reason([_chunk(8)], scalars)
    monkeypatch.setenv("MEGATRON_SR_FUSED", "0")
    assert "MEGATRON_SR_FUSED=0" in fused_unusable_reason([_chunk(8)], scalars)


def test_extension_reports_why_it_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(fused.FusedUnavailable, match="CUDA"):
        fused.load_extension()


def test_build_directory_is_keyed_by_torch_cuda_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_SR_EXT_DIR", str(tmp_path))
    d = fused.build_directory((9, 0))
    assert d.parent == tmp_path and d.name.endswith("sm90") and torch.__version__.split("+")[0] in d.name
    assert fused.build_directory((8, 0)) != d


def test_empty_chunk_list_is_a_no_op(fresh_warning):
    adamw_step_([], scalars=step_scalars(1e-3, 1, 0.9, 0.95, "cpu"), step=1, consts=CONSTS, rounding="nearest", key=KEY)
    assert dispatch._warned is False


class _FakeExtension:
    """Stands in for the CUDA extension: records plans and launches; a Python signature of the same fields."""

    def __init__(self):
        self.launches = []

    @staticmethod
    def signature(chunks):
        return repr([(t.data_ptr(), t.numel(), t.dtype, t.is_contiguous(), t.device) for c in chunks
                     for t in (c.param, c.grad, c.exp_avg, c.exp_avg_sq)] +
                    [(c.base_index, c.weight_decay) for c in chunks]).encode()

    def plan(self, params, grads, exp_avgs, exp_avg_sqs, bases, decays):
        return "", torch.zeros(64 * len(params), dtype=torch.uint8), sum(p.numel() for p in params), [1, 1, 0]

    def tile_map(self, table, tiles):
        return torch.zeros(max(tiles, 1), dtype=torch.int32)

    def step(self, table, tile_map, tiles, dtypes, *args):
        self.launches.append((tiles, tuple(dtypes)))
        return ""


def test_plan_cache_hits_for_the_same_tensors_and_misses_on_changes(monkeypatch):
    ext = _FakeExtension()
    monkeypatch.setattr(fused, "_plans", type(fused._plans)())
    monkeypatch.setattr(fused, "_extensions", {(0, 0): ext})
    monkeypatch.setattr(fused, "load_extension", lambda device=None: ext)
    chunks = [_chunk(100), _chunk(20, 100, 0.0, seed=1), _chunk(7, 120, state=torch.bfloat16, seed=2)]
    same = lambda: [AdamWChunk(c.param, c.grad, c.exp_avg, c.exp_avg_sq, c.base_index, c.weight_decay)  # noqa: E731
                    for c in chunks]
    assert fused.cached_plan(chunks) is None
    plan = fused.build_plan(chunks)
    assert [launch[2] for launch in plan.launches] == [120, 7]  # one launch per dtype triple
    assert fused.cached_plan(same()) is plan
    plan.step(scalars=torch.zeros(3), step=torch.tensor(4), consts=CONSTS, stochastic=True, key=KEY)
    assert ext.launches == [(120, (1, 1, 0)), (7, (1, 1, 0))]
    for change in (lambda cs: setattr(cs[1], "base_index", 101), lambda cs: setattr(cs[0], "weight_decay", 0.0),
                   lambda cs: setattr(cs[2], "grad", cs[2].grad.clone())):
        cs = same()
        change(cs)
        assert fused.cached_plan(cs) is None
    bad = same()
    bad[0].grad = bad[0].grad[:50]
    with pytest.raises(ValueError, match="sizes differ"):
        fused.build_plan(bad)
    assert fused.cached_plan(bad) is None


def test_skip_flag_leaves_the_reference_unchanged():
    """scalars[3] != 0: the definition the kernel matches writes nothing (params, moments)."""
    chunks = [_chunk(n) for n in (8, 13)]
    want = [_clone(c) for c in chunks]
    scalars = step_scalars(1e-3, 3, 0.9, 0.95, "cpu", skip=torch.tensor(True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adamw_step_(chunks, scalars=scalars, step=3, consts=CONSTS, rounding="stochastic", key=KEY)
    for c, w in zip(chunks, want):
        for name in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(c, name), getattr(w, name)), name
