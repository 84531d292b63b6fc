"""The fused SR AdamW CUDA kernel against the eager PyTorch reference, bit for bit (GPU only).

The reference runs eagerly on the same GPU with the same 0-dim device scalars, so both sides do
IEEE FP32 arithmetic; every comparison is of bit patterns, NaN payloads included.
"""

import math

import pytest
import torch
from adamw_cases import (
    B1,
    B2,
    BF16,
    CONSTS,
    F32,
    KEY,
    LR,
    VARIANTS,
    assert_same_bits,
    clone_chunk,
    make_chunk,
    rand_tensor,
    reference_step,
)

from megatron_sr.optimizer import step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 255, 1000, 4097, 65539, 1_000_003]


def _fused(chunks, scalars, step, rounding):
    path = adamw_step_(chunks, scalars=scalars, step=step, consts=CONSTS, rounding=rounding, key=KEY)
    assert path == "fused"


def _run_both(chunks, steps, rounding, step_as_tensor=False):
    want = [clone_chunk(c) for c in chunks]
    for step in range(1, steps + 1):
        scalars = step_scalars(LR, step, B1, B2, "cuda")
        s = torch.tensor(step, dtype=torch.int64, device="cuda") if step_as_tensor else step
        _fused(chunks, scalars, s, rounding)
        reference_step(want, scalars, step, rounding)
    torch.cuda.synchronize()
    for c, w in zip(chunks, want):
        assert_same_bits(c, w, f"step {steps}")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "p{}-g{}-s{}-{}".format(
    *(str(x).replace("torch.", "") for x in v)))
def test_multi_tensor_sizes_offsets_and_alignment(variant):
    """Every variant, one launch over chunks of many sizes, stream offsets and pointer misalignments, 3 steps."""
    *dtypes, rounding = variant
    gen = torch.Generator(device="cuda").manual_seed(1000 + VARIANTS.index(variant))
    chunks = []
    for i, n in enumerate(SIZES):
        # (stream offset, pointer offset): aligned; scalar-only (offsets disagree); vector path with a
        # shifted group start (13 % 8 == 5); misaligned pointers; an index above 2^32
        for base, pad in [(0, 0), (5, 0), (8 * 1000 + 3, 0), (13, 5), (13, 1), (2**33 + 7, 3)]:
            chunks.append(make_chunk(n, dtypes, gen, base, 0.1 if i % 2 else 0.0, pad))
    _run_both(chunks, steps=3, rounding=rounding)


@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_above_1e8_elements(state_dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    chunk = make_chunk(100_000_007, (BF16, BF16, state_dtype), gen, base=123_456_789, wd=0.1)
    _run_both([chunk], steps=2, rounding="stochastic")


def test_step_from_device_tensor_and_specials():
    """Step read from an int64 device tensor; NaN, Inf and huge values in params and grads."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    chunk = make_chunk(4099, (BF16, BF16, BF16), gen, base=77, wd=0.1)
    chunk.param[::97] = float("nan")
    chunk.grad[5::89] = float("inf")
    chunk.grad[7::101] = -float("nan")
    chunk.param[11::103] = 3.3e38
    _run_both([chunk], steps=3, rounding="stochastic", step_as_tensor=True)


@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_shard_equals_slice_of_full_update(state_dtype):
    """Pieces of a parameter updated with their own base index give exactly the full update's slices."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    n, base = 100_003, 4242
    full = make_chunk(n, (BF16, BF16, state_dtype), gen, base=base, wd=0.1)
    pieces_src = clone_chunk(full)
    cuts = [0, 1, 6, 1000, 1003, 50_000, 77_777, n]
    pieces = [AdamWChunk(pieces_src.param[a:b], pieces_src.grad[a:b], pieces_src.exp_avg[a:b],
                         pieces_src.exp_avg_sq[a:b], base + a, 0.1) for a, b in zip(cuts, cuts[1:])]
    for step in (1, 2):
        scalars = step_scalars(LR, step, B1, B2, "cuda")
        _fused([full], scalars, step, "stochastic")
        _fused(pieces[::2], scalars, step, "stochastic")  # two launches, pieces in any grouping
        _fused(pieces[1::2], scalars, step, "stochastic")
    assert_same_bits(pieces_src, full, "shards")


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The BF16 values just below and above a positive FP32 value (truncate, then one unit up)."""
    bits = int(torch.tensor([x], dtype=F32).view(torch.int32))
    lo = (bits >> 16) << 16
    to_f = lambda b: float(torch.tensor([b], dtype=torch.int32).view(F32))  # noqa: E731
    return to_f(lo), to_f(lo + (1 << 16))


def test_sr_unbiased_on_kernel_output():
    """Every element gets the same FP32 update; SR over 2^21 indices averages to it (5 standard errors)."""
    n = 1 << 21
    full = lambda v: torch.full((n,), v, dtype=BF16, device="cuda")  # noqa: E731
    chunk = AdamWChunk(full(1.0), full(0.3), full(0.0), full(0.0), 0, 0.1)
    exact = AdamWChunk(*(t[:1].float().clone() for t in (chunk.param, chunk.grad, chunk.exp_avg, chunk.exp_avg_sq)),
                       0, 0.1)
    scalars = step_scalars(1e-2, 1, B1, B2, "cuda")
    _fused([chunk], scalars, 1, "stochastic")
    reference_step([exact], scalars, 1, "stochastic")  # FP32 tensors: the exact FP32 results, no rounding
    for name in ("param", "exp_avg", "exp_avg_sq"):
        x = float(getattr(exact, name))
        y = getattr(chunk, name).double()
        lo, hi = _bf16_neighbours(x)
        assert lo < x < hi, f"{name}: the test needs a value that BF16 cannot hold, got {x}"
        assert bool(((y == lo) | (y == hi)).all()), f"{name}: outputs other than the two neighbours"
        q = (x - lo) / (hi - lo)
        se = (hi - lo) * math.sqrt(q * (1 - q) / n)
        assert abs(y.mean().item() - x) < 5 * se, f"{name}: mean {y.mean().item()} vs {x} (se {se})"


def test_cuda_graph_captures_the_step():
    """Scalars and step live in device tensors: a captured launch replays correctly for later steps."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    chunks = [make_chunk(n, (BF16, BF16, F32), gen, base, 0.1) for n, base in [(1000, 0), (77_777, 1000)]]
    scalars = step_scalars(LR, 1, B1, B2, "cuda")
    step_t = torch.ones((), dtype=torch.int64, device="cuda")
    _fused(chunks, scalars, step_t, "stochastic")  # warm-up: builds and caches the chunk table outside the capture
    torch.cuda.synchronize()
    want = [clone_chunk(c) for c in chunks]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _fused(chunks, scalars, step_t, "stochastic")
    for step in (1, 2, 3):
        scalars.copy_(step_scalars(LR, step, B1, B2, "cuda"))
        step_t.fill_(step)
        graph.replay()
        reference_step(want, scalars, step, "stochastic")
    torch.cuda.synchronize()
    for c, w in zip(chunks, want):
        assert_same_bits(c, w, "graph")


def test_mismatched_sizes_raise_before_the_binding():
    c = AdamWChunk(torch.zeros(8, dtype=BF16, device="cuda"), torch.zeros(9, dtype=BF16, device="cuda"),
                   torch.zeros(8, device="cuda"), torch.zeros(8, device="cuda"), 0, 0.0)
    with pytest.raises(ValueError, match="sizes differ"):
        _fused([c], step_scalars(LR, 1, B1, B2, "cuda"), 1, "stochastic")


def test_plan_is_reused_for_the_same_tensors_and_rebuilt_on_any_change():
    """New chunk objects over the same tensors reuse the checked plan; a new offset, decay or tensor rebuilds it."""
    from megatron_sr.optimizer import fused

    gen = torch.Generator(device="cuda").manual_seed(13)
    chunks = [make_chunk(n, (BF16, BF16, F32), gen, base, wd) for n, base, wd in
              [(1000, 0, 0.1), (8191, 1000, 0.0), (0, 9191, 0.1), (65539, 9191, 0.1)]]
    want = [clone_chunk(c) for c in chunks]
    same = lambda cs: [AdamWChunk(c.param, c.grad, c.exp_avg, c.exp_avg_sq, c.base_index, c.weight_decay)  # noqa: E731
                       for c in cs]
    builds = []
    for step in range(1, 6):
        if step == 3:  # another stream offset for one chunk
            chunks[1].base_index = want[1].base_index = 5
        if step == 4:  # another weight decay
            chunks[0].weight_decay = want[0].weight_decay = 0.0
        if step == 5:  # another tensor in place of one state
            chunks[3].exp_avg = chunks[3].exp_avg.clone()
        scalars = step_scalars(LR, step, B1, B2, "cuda")
        _fused(same(chunks), scalars, step, "stochastic")
        reference_step(want, scalars, step, "stochastic")
        builds.append(fused.plan_cache_info().builds)
    torch.cuda.synchronize()
    for c, w in zip(chunks, want):
        assert_same_bits(c, w, "cached plans")
    assert [b - builds[0] for b in builds] == [0, 0, 1, 2, 3]
    # a non-contiguous view with the same pointer, size and dtype as a planned tensor is not that tensor
    buf = rand_tensor(2000, BF16, 1.0, gen)
    head = AdamWChunk(buf[:1000], *(t.clone() for t in (chunks[0].grad, chunks[0].exp_avg, chunks[0].exp_avg_sq)),
                      0, 0.1)
    _fused([head], scalars, 6, "stochastic")
    assert fused.cached_plan(same([head])) is not None
    strided = same([head])
    strided[0].param = buf[::2]
    assert strided[0].param.data_ptr() == head.param.data_ptr() and not strided[0].param.is_contiguous()
    assert fused.cached_plan(strided) is None


@pytest.mark.parametrize("dtypes", [(BF16, BF16, F32), (BF16, F32, BF16), (F32, F32, F32)])
def test_skip_flag_leaves_every_tensor_unchanged(dtypes):
    """scalars[3] != 0 (non-finite gradients, decided on the device): the kernel writes nothing."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    chunks = [make_chunk(n, dtypes, gen, base, 0.1) for n, base in [(4097, 0), (9, 5000)]]
    before = [clone_chunk(c) for c in chunks]
    skip = torch.tensor(True, device="cuda")
    _fused(chunks, step_scalars(LR, torch.tensor(3, device="cuda"), B1, B2, "cuda", skip), 3, "stochastic")
    torch.cuda.synchronize()
    for c, b in zip(chunks, before):
        assert_same_bits(c, b, "skipped step")
