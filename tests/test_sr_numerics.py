"""The random stream, stochastic rounding and the reference AdamW step against their definitions."""

import math

import pytest
import torch

from megatron_sr.numerics.philox import philox4x32
from megatron_sr.optimizer import (
    AdamWConstants,
    Rounding,
    SRKey,
    adamw_reference_,
    random_bits16,
    step_scalars,
    stochastic_round_bf16,
)


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 known-answer vectors for philox4x32, 10 rounds
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ],
)
def test_philox_known_answers(counter, key, expected):
    c = [torch.tensor([x], dtype=torch.int64) for x in counter]
    out = philox4x32(c[0], c[1], c[2], c[3], SRKey(*key))
    assert [int(w) for w in out] == expected


def test_random_bits_slices_agree_with_full_stream():
    key = SRKey.from_seed(1234, tp_rank=1, pp_rank=3)
    full = random_bits16(0, 1000, step=7, stream=0, key=key)
    for start, n in [(0, 1), (3, 17), (8, 8), (13, 400), (999, 1)]:
        assert torch.equal(random_bits16(start, n, 7, 0, key), full[start:start + n])
    assert int(full.min()) >= 0 and int(full.max()) < 65536
    # different step, stream, rank or seed: different bits
    assert not torch.equal(full, random_bits16(0, 1000, 8, 0, key))
    assert not torch.equal(full, random_bits16(0, 1000, 7, 1, key))
    assert not torch.equal(full, random_bits16(0, 1000, 7, 0, SRKey.from_seed(1234, tp_rank=0, pp_rank=3)))
    assert not torch.equal(full, random_bits16(0, 1000, 7, 0, SRKey.from_seed(1235, tp_rank=1, pp_rank=3)))


def test_random_bits_are_uniform():
    bits = random_bits16(0, 1 << 18, step=1, stream=0, key=SRKey.from_seed(0)).double()
    # mean of U{0..65535} is 32767.5 with sd 18918.6; standard error over 2^18 draws is about 37
    assert abs(bits.mean().item() - 32767.5) < 5 * 18918.6 / math.sqrt(1 << 18)
    # each of the 16 bits is set about half the time
    for b in range(16):
        frac = ((bits.long() >> b) & 1).double().mean().item()
        assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(1 << 18)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The BF16 values just below and above (in magnitude order of the bit pattern) an FP32 value."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lo = (bits >> 16) << 16
    hi = lo + (1 << 16)
    to_f = lambda b: torch.where(b >= 1 << 31, b - (1 << 32), b).to(torch.int32).view(torch.float32)  # noqa: E731
    return to_f(lo), to_f(hi)


def test_sr_is_unbiased_and_only_gives_neighbours():
    torch.manual_seed(0)
    xs = torch.randn(64) * torch.logspace(-6, 6, 64)
    draws = 20000
    x = xs.repeat_interleave(draws)
    rand = random_bits16(0, x.numel(), step=1, stream=0, key=SRKey.from_seed(42))
    y = stochastic_round_bf16(x, rand).float().view(64, draws)
    lo, hi = _neighbours(xs)
    ok = (y == lo[:, None]) | (y == hi[:, None])
    assert bool(ok.all())
    ulp = (hi - lo).abs().double()
    mean = y.double().mean(dim=1)
    # Bernoulli per draw: sd of the mean <= ulp / (2 sqrt(draws)); allow 5 standard errors
    assert bool(((mean - xs.double()).abs() <= 5 * ulp / (2 * math.sqrt(draws))).all())


def test_sr_exact_on_representable_and_special_values():
    rep = torch.randn(10000).to(torch.bfloat16).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -2.0, 3.3895314e38])
    x = torch.cat([rep, specials])
    for seed in range(3):
        rand = random_bits16(0, x.numel(), 1, 0, SRKey.from_seed(seed))
        y = stochastic_round_bf16(x, rand)
        assert torch.equal(y.float(), x)
        assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))  # -0.0 keeps its sign
    nan = torch.tensor([float("nan"), -float("nan")])
    nan_payload_low = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # NaN only in low bits
    for v in [nan, nan_payload_low]:
        y = stochastic_round_bf16(v, torch.full(v.shape, 0xFFFF, dtype=torch.int64))
        assert bool(torch.isnan(y.float()).all())


def test_sr_largest_finite_rounds_to_inf_only_as_defined():
    big = torch.tensor([3.3961514e38])  # above the largest BF16 (3.3895314e38), below FP32 max
    low16 = int(big.view(torch.int32)) & 0xFFFF
    assert stochastic_round_bf16(big, torch.tensor([65536 - low16])).float().item() == float("inf")
    assert stochastic_round_bf16(big, torch.tensor([65535 - low16])).float().item() == torch.finfo(torch.bfloat16).max


def _adamw_float64(p, g, m, v, lr, step, b1, b2, eps, wd):
    p, g, m, v = (t.double() for t in (p, g, m, v))
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** step)) / (torch.sqrt(v / (1 - b2 ** step)) + eps)
    return p, m, v


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_step_matches_float64_before_rounding(wd):
    torch.manual_seed(1)
    n = 4096
    p = torch.randn(n)
    g = torch.randn(n) * 1e-2
    m = torch.randn(n) * 1e-3
    v = torch.rand(n) * 1e-4
    lr, step, b1, b2, eps = 3e-3, 5, 0.9, 0.95, 1e-8
    ref_p, ref_m, ref_v = _adamw_float64(p, g, m, v, lr, step, b1, b2, eps, wd)
    pp, mm, vv = p.clone(), m.clone(), v.clone()  # FP32 everywhere: no rounding to BF16 at all
    adamw_reference_(pp, g, mm, vv, scalars=step_scalars(lr, step, b1, b2, "cpu"), step=step,
                     consts=AdamWConstants.make(b1, b2, eps), weight_decay=wd, rounding=Rounding.STOCHASTIC,
                     key=SRKey.from_seed(0), base_index=0)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(pp, ref_p) < 1e-6 and rel(mm, ref_m) < 1e-6 and rel(vv, ref_v) < 1e-6
    # the BF16 + SR result is one of the two BF16 neighbours of the FP32 result
    pb = p.to(torch.bfloat16)
    pf = pb.float()
    adamw_reference_(pf, g, m.clone(), v.clone(), scalars=step_scalars(lr, step, b1, b2, "cpu"), step=step,
                     consts=AdamWConstants.make(b1, b2, eps), weight_decay=wd, rounding="stochastic",
                     key=SRKey.from_seed(0), base_index=0)
    adamw_reference_(pb, g, m.clone(), v.clone(), scalars=step_scalars(lr, step, b1, b2, "cpu"), step=step,
                     consts=AdamWConstants.make(b1, b2, eps), weight_decay=wd, rounding="stochastic",
                     key=SRKey.from_seed(0), base_index=0)
    lo, hi = _neighbours(pf)
    assert bool(((pb.float() == lo) | (pb.float() == hi)).all())


def test_tiny_updates_move_weights_only_with_sr():
    """Updates below half a BF16 ulp: round-to-nearest never moves the weight; SR moves it by the right amount
    on average."""
    n, steps, lr = 20000, 50, 1e-4
    w0 = torch.ones(n, dtype=torch.bfloat16)  # ulp at 1.0 is 2^-7 = 0.0078; Adam's step is ~lr = 1e-4
    g = torch.ones(n)
    consts = AdamWConstants.make(0.9, 0.999, 1e-8)
    finals = {}
    for mode in ("nearest", "stochastic"):
        p, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
        for step in range(1, steps + 1):
            adamw_reference_(p, g, m, v, scalars=step_scalars(lr, step, 0.9, 0.999, "cpu"), step=step, consts=consts,
                             weight_decay=0.0, rounding=mode, key=SRKey.from_seed(3), base_index=0)
        finals[mode] = p.float()
    assert bool((finals["nearest"] == 1.0).all())
    # with a constant gradient Adam's update is lr each step: the exact trajectory ends at 1 - steps*lr
    expected = 1.0 - steps * lr
    mean = finals["stochastic"].double().mean().item()
    assert abs(mean - expected) < 0.05 * steps * lr


def test_shard_update_equals_slice_of_full_update():
    torch.manual_seed(2)
    n = 1003
    p = torch.randn(n).to(torch.bfloat16)
    g = torch.randn(n).to(torch.bfloat16)
    m, v = torch.randn(n) * 1e-2, torch.rand(n) * 1e-3
    kw = dict(scalars=step_scalars(1e-2, 3, 0.9, 0.95, "cpu"), step=3, consts=AdamWConstants.make(0.9, 0.95),
              weight_decay=0.1, rounding="stochastic", key=SRKey.from_seed(9, tp_rank=1))
    full = [t.clone() for t in (p, g, m, v)]
    adamw_reference_(*full, base_index=100, **kw)
    for start, stop in [(0, 5), (5, 517), (517, 1003)]:
        part = [t[start:stop].clone() for t in (p, g, m, v)]
        adamw_reference_(*part, base_index=100 + start, **kw)
        for a, b in zip(part, full):
            assert torch.equal(a.view(-1), b[start:stop])
