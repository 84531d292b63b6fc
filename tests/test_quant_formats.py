"""The low-bit formats (megatron_sr/numerics/quant.py) against their definitions and independent references.

References used only here: ml_dtypes (FP8 E4M3FN/E5M2, FP6 E2M3/E3M2, FP4 E2M1, BF16) and numpy's float16
for round-to-nearest floating point; the value grid of a format enumerated from its definition (other fp
formats, SR neighbours); exact rational arithmetic (fractions) element by element for fixed point and block
floating point; numpy FP32 vector code for the integer scales.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_sr.numerics.quant import QuantFormat, parse_format, quantize

SE_BOUND = 4.5  # standard errors allowed in the statistical SR checks (two-sided, many checks: rare false alarms)


# ------------------------------------------------------------------------------------------------ helpers

def fmt(spec: str) -> QuantFormat:
    parsed = parse_format(spec)
    assert parsed is not None
    return parsed


def uniform_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**24, x.shape, generator=gen).to(torch.float32) * 2.0**-24


def assert_bitwise(actual: torch.Tensor, expected) -> None:
    """Same shape, FP32, same bits (so signed zeros count); NaN matches NaN."""
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float32))
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    same = (actual.view(torch.int32) == expected.view(torch.int32)) | (actual.isnan() & expected.isnan())
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        rows = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad]
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} differ, e.g. (index, got, expected) {rows}")


def midpoints(values: np.ndarray) -> np.ndarray:
    """The midpoint between each pair of neighbouring distinct values (exact in float64, then FP32)."""
    v = np.unique(values.astype(np.float64))
    return ((v[:-1] + v[1:]) / 2).astype(np.float32)


def log_uniform_inputs(lo: float, hi: float, n: int, seed: int) -> np.ndarray:
    """Random FP32 values with magnitudes log-uniform in [lo, hi] and random signs."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.uniform(np.log2(lo), np.log2(hi), n))
    x = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    return np.clip(x, -np.float32(hi), np.float32(hi))


# ------------------------------------------------------------------------- fp: independent references

ML_DTYPE_FORMATS = [  # (spec without rounding, reference dtype name, its largest value)
    ("fp:e4m3", "float8_e4m3fn", 448.0),
    ("fp:e5m2", "float8_e5m2", 57344.0),
    ("fp:e2m3", "float6_e2m3fn", 7.5),
    ("fp:e3m2", "float6_e3m2fn", 28.0),
    ("fp:e2m1", "float4_e2m1fn", 6.0),
    ("fp:e8m7", "bfloat16", float(np.float32(3.3895313892515355e38))),
    ("fp:e5m10", "float16", 65504.0),
]


def reference_dtype(name: str):
    if name == "float16":
        return np.float16
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return getattr(ml_dtypes, name)


def every_finite_value(dtype) -> np.ndarray:
    """Every finite value of a small float type, from all of its bit patterns."""
    bits = 16 if dtype is np.float16 else pytest.importorskip("ml_dtypes").finfo(dtype).bits
    codes = np.arange(2**bits, dtype=np.uint16 if bits == 16 else np.uint8)
    values = codes.view(dtype).astype(np.float32)
    return values[np.isfinite(values)]


def fp_grid(e: int, m: int) -> np.ndarray:
    """The non-negative values of fp:e<e>m<m> in code order, enumerated from the definition."""
    bias = 2 ** (e - 1) - 1
    values = [Fraction(k, 2**m) * Fraction(2) ** (1 - bias) for k in range(2**m)]  # zero and subnormals
    top_field = 2**e - 1
    for field in range(1, top_field + 1):
        if e >= 5 and field == top_field:
            break  # Inf / NaN
        for k in range(2**m):
            if e == 4 and field == top_field and k == 2**m - 1:
                break  # E4M3FN's NaN code
            values.append(Fraction(2**m + k, 2**m) * Fraction(2) ** (field - bias))
    return np.array([float(v) for v in values])


def grid_neighbours(x: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For |x| <= grid max: (lower neighbour, upper neighbour, code of the lower) of |x| on the grid."""
    a = np.abs(x.astype(np.float64))
    i = np.searchsorted(grid, a, side="right") - 1
    j = np.minimum(i + 1, len(grid) - 1)
    return grid[i], grid[j], i


def grid_round_nearest_even(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    lo, hi, code = grid_neighbours(x, grid)
    a = np.abs(x.astype(np.float64))
    take_hi = (hi - a < a - lo) | ((hi - a == a - lo) & (code % 2 == 1))  # a tie goes to the even code
    return np.copysign(np.where(take_hi, hi, lo), x).astype(np.float32)


@pytest.mark.parametrize("spec, dtype_name, max_value", ML_DTYPE_FORMATS)
def test_fp_max_matches_reference_and_definition(spec, dtype_name, max_value):
    dtype = reference_dtype(dtype_name)
    finite = every_finite_value(dtype)
    assert float(finite.max()) == max_value
    for r in ("rn", "sr"):
        f = fmt(f"{spec}:{r}")
        assert f.max_value() == max_value
        x = torch.tensor([max_value, -max_value])
        assert_bitwise(quantize(x, f, uniform_like(x)), [max_value, -max_value])
    e, m = (int(t) for t in spec[4:].split("m"))
    if e <= 5 and m <= 3:  # the grid of the definition holds exactly the reference's values
        assert np.array_equal(fp_grid(e, m), np.unique(np.abs(finite)).astype(np.float64))


@pytest.mark.parametrize("spec, dtype_name, max_value", ML_DTYPE_FORMATS)
def test_fp_every_value_of_the_format_is_exact(spec, dtype_name, max_value):
    values = torch.from_numpy(every_finite_value(reference_dtype(dtype_name)))
    assert_bitwise(quantize(values, fmt(f"{spec}:rn")), values)
    for seed in range(3):
        assert_bitwise(quantize(values, fmt(f"{spec}:sr"), uniform_like(values, seed)), values)


@pytest.mark.parametrize("spec, dtype_name, max_value", ML_DTYPE_FORMATS)
def test_fp_round_to_nearest_matches_reference(spec, dtype_name, max_value):
    dtype = reference_dtype(dtype_name)
    finite = every_finite_value(dtype)
    tiny = float(np.min(np.abs(finite[finite != 0])))  # the smallest subnormal
    x = np.concatenate([
        log_uniform_inputs(tiny / 8, max_value, 20000, seed=1),  # underflow, subnormals, normals
        midpoints(finite),  # exact ties: nearest even
        np.array([0.0, -0.0, tiny / 2, -tiny / 2, tiny * 0.5000001, -tiny / 4], np.float32),
    ])
    expected = x.astype(dtype).astype(np.float32)
    assert_bitwise(quantize(torch.from_numpy(x), fmt(f"{spec}:rn")), expected)


@pytest.mark.parametrize("e, m", [(2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (5, 3), (6, 2), (7, 1), (8, 2)])
def test_fp_other_formats_match_their_value_grid(e, m):
    grid = fp_grid(e, m)
    top = float(grid[-1])
    assert fmt(f"fp:e{e}m{m}:rn").max_value() == top
    values = np.concatenate([grid, -grid]).astype(np.float32)
    x = np.concatenate([values, midpoints(values), log_uniform_inputs(float(grid[1]) / 8, top, 5000, seed=e * 16 + m)])
    assert_bitwise(quantize(torch.from_numpy(x), fmt(f"fp:e{e}m{m}:rn")), grid_round_nearest_even(x, grid))


def test_fp_without_mantissa_bits_ties_to_the_even_integer():
    f = fmt("fp:e3m0:rn")  # bias 3: values 0 (the only subnormal), 2^-2 .. 2^4
    assert f.max_value() == 16.0
    x = torch.tensor([2.0**-3, 1.5 * 2.0**-2, 1.5, 3.0, 0.75, 20.0, -1.4])
    # 2^-3 halfway between 0 and 2^-2 -> 0; 1.5 * 2^e -> 2^(e+1) (the even integer 2 of quantum 2^e)
    assert_bitwise(quantize(x, f), [0.0, 0.5, 2.0, 4.0, 1.0, 16.0, -1.0])


# --------------------------------------------------------------------- fp: saturation, specials, signs

@pytest.mark.parametrize("spec", ["fp:e4m3", "fp:e5m2", "fp:e2m1", "fp:e8m7", "fixed:w8f4", "fixed:w32f0"])
@pytest.mark.parametrize("rounding", ["rn", "sr"])
def test_finite_values_beyond_the_range_saturate_and_specials_pass(spec, rounding):
    f = fmt(f"{spec}:{rounding}")
    top = f.max_value()
    bottom = -(2.0 ** (f.word_bits - 1 - f.fraction_bits)) if f.kind == "fixed" else -top
    beyond = top * 1.01 if top < 3e38 else 3.4e38
    x = torch.tensor([beyond, 3.4028235e38, -3.4028235e38, -beyond, math.inf, -math.inf, math.nan])
    assert_bitwise(quantize(x, f, uniform_like(x)), [top, top, bottom, bottom, math.inf, -math.inf, math.nan])


@pytest.mark.parametrize("spec", ["fp:e4m3", "fp:e2m1", "fixed:w8f4", "bfp:m4:b4", "int:b4:tensor", "int:b8:row",
                                  "int:b4:block4"])
@pytest.mark.parametrize("rounding", ["rn", "sr"])
def test_signed_zeros_and_nonfinite_values(spec, rounding):
    f = fmt(f"{spec}:{rounding}")
    # -1e-9 next to 1.0 rounds to zero in every one of these; with u = 0 SR rounds it up, to -0.0 as well
    x = torch.tensor([[1.0, -0.0, -1e-9, 0.0], [math.nan, 2.0, -math.inf, math.inf], [0.0, -0.0, 0.0, -0.0]])
    u = torch.zeros_like(x) if f.stochastic else None
    got = quantize(x, f, u)
    assert_bitwise(got[0, 1:], [-0.0, -0.0, 0.0])
    assert torch.isnan(got[1, 0]) and got[1, 2] == -math.inf and got[1, 3] == math.inf
    clean = torch.tensor([[0.0, 2.0, 0.0, 0.0]])  # NaN and Inf do not enter a block's or row's statistic
    assert got[1, 1] == quantize(clean, f, None if u is None else u[1:2])[0, 1]
    assert_bitwise(got[2], [0.0, -0.0, 0.0, -0.0])


def test_output_is_a_new_fp32_tensor_of_the_input_shape():
    x = (torch.randn(3, 8) * 4).to(torch.bfloat16)
    before = x.clone()
    for spec in ["fp:e4m3:rn", "fixed:w8f3:rn", "bfp:m4:b8:rn", "int:b8:row:rn"]:
        got = quantize(x, fmt(spec))
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(x, before)
    x32 = torch.randn(4)
    got = quantize(x32, fmt("fp:e8m7:rn"))
    assert got.data_ptr() != x32.data_ptr()
    assert quantize(torch.empty(0, 8), fmt("int:b8:tensor:rn")).shape == (0, 8)


# ---------------------------------------------------------------------------- fixed point (exact rationals)

def fixed_reference(x: np.ndarray, w: int, f: int) -> np.ndarray:
    """Element by element in exact rationals; round() of a Fraction ties to even."""
    lo, hi = -(2 ** (w - 1)), 2 ** (w - 1) - 1
    out = []
    for v in x.tolist():
        r = min(hi, max(lo, round(Fraction(v) * 2**f)))
        out.append(math.copysign(float(Fraction(r, 2**f)), v))
    return np.array(out, np.float32)


@pytest.mark.parametrize("w, f", [(8, 4), (4, 0), (6, 5), (16, 12), (12, 2)])
def test_fixed_point_matches_exact_reference(w, f):
    q = 2.0**-f
    grid = np.arange(-(2 ** (w - 1)), 2 ** (w - 1), dtype=np.float64) * q
    ties = (grid[:-1] + q / 2).astype(np.float32)
    rng = np.random.default_rng(w * 32 + f)
    span = 2.0 ** (w - 1 - f)
    x = np.concatenate([grid.astype(np.float32), ties, rng.uniform(-1.3 * span, 1.3 * span, 3000).astype(np.float32)])
    spec = f"fixed:w{w}f{f}:rn"
    got = quantize(torch.from_numpy(x), fmt(spec))
    assert_bitwise(got, fixed_reference(x, w, f))
    assert_bitwise(got[: len(grid)], grid)  # representable values exact
    assert set(np.unique(np.abs(got[len(grid): 2 * len(grid) - 1].numpy() / q) % 2)) <= {0.0}  # ties -> even


def test_fixed_point_bounds_and_wide_words():
    f = fmt("fixed:w8f4:rn")
    assert f.max_value() == 127 / 16
    assert_bitwise(quantize(torch.tensor([7.97, 7.96, -8.03, -8.04, 100.0]), f), [7.9375, 7.9375, -8.0, -8.0, 7.9375])
    wide = fmt("fixed:w32f8:rn")  # 2^31 - 1 needs 31 bits: the top bound is the largest FP32 below it
    assert wide.max_value() == (2.0**31 - 128) * 2.0**-8
    x = torch.tensor([1e30, -1e30, 1234.56789, 2.0**-9, 3 * 2.0**-9])
    assert_bitwise(quantize(x, wide), [(2.0**31 - 128) / 256, -(2.0**23), fixed_reference(x[2:3].numpy(), 32, 8)[0],
                                       0.0, 2.0**-7])


# -------------------------------------------------------------------------- block floating point

def bfp_reference(x: np.ndarray, m: int, k: int) -> np.ndarray:
    """Block by block in exact rationals: the exponent of each block's largest finite magnitude."""
    out = np.empty(x.shape, np.float32)
    flat_in, flat_out = x.reshape(-1, k), out.reshape(-1, k)
    top = 2**m - 1
    for block, dest in zip(flat_in, flat_out):
        amax = max((abs(float(v)) for v in block if math.isfinite(v)), default=0.0)
        exponent = max(math.frexp(amax)[1] - 1, -126) if amax > 0 else -126
        quantum = Fraction(2) ** (exponent + 1 - m)
        for i, v in enumerate(block.tolist()):
            if not math.isfinite(v):
                dest[i] = v
                continue
            r = max(-top, min(top, round(Fraction(v) / quantum)))
            dest[i] = math.copysign(float(r * quantum), v)
    return out


@pytest.mark.parametrize("m, k", [(4, 8), (8, 16), (3, 1), (1, 4), (23, 4), (6, 32)])
def test_bfp_matches_exact_reference(m, k):
    rng = np.random.default_rng(m * 64 + k)
    rows = 16
    scales = np.exp2(rng.integers(-140, 120, size=(rows, 1, 1)))  # blocks from FP32's subnormals to 2^120
    x = (rng.standard_normal((rows, 4, k)) * scales).astype(np.float32).reshape(rows, 4 * k)
    x[0, :k] = 0.0  # an all-zero block
    x[1, 1] = np.nan
    x[1, 2] = -np.inf
    assert_bitwise(quantize(torch.from_numpy(x), fmt(f"bfp:m{m}:b{k}:rn")), bfp_reference(x, m, k))


def test_bfp_block_semantics():
    f = fmt("bfp:m4:b4:rn")
    x = torch.tensor([[1.0, 0.3, -0.7, 0.05, 32.0, 0.3, 3.1, -1.99]])
    # block 1: max 1.0 -> exponent 0, quantum 2^(0+1-4) = 1/8; block 2: max 32 -> quantum 2^(5+1-4) = 4
    assert_bitwise(quantize(x, f), [[1.0, 0.25, -0.75, 0.0, 32.0, 0.0, 4.0, -0.0]])
    # the magnitude clamps at 2^M - 1 steps: 1.99 / (1/8) = 15.92 -> 16 -> clamped to 15
    assert_bitwise(quantize(torch.tensor([1.99, 0.5, 0.0, 0.0]), f), [1.875, 0.5, 0.0, 0.0])
    # each block's exponent comes from its own max only
    changed = x.clone()
    changed[0, 4:] *= 1000
    a, b = quantize(x, f), quantize(changed, f)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:] * 1000, b[:, 4:])
    # blocks run along the last dimension: a transposed layout groups different elements
    y = torch.arange(1.0, 17.0).reshape(4, 4) ** 2
    assert torch.equal(quantize(y, f), torch.stack([quantize(row, f) for row in y]))
    assert not torch.equal(quantize(y.t().contiguous(), f), quantize(y, f).t())


def test_block_shapes_are_checked():
    for spec in ["bfp:m4:b8:rn", "int:b8:block8:rn"]:
        with pytest.raises(ValueError, match="multiple of the block size 8"):
            quantize(torch.zeros(3, 12), fmt(spec))
        with pytest.raises(ValueError, match="at least one dimension"):
            quantize(torch.tensor(1.0), fmt(spec))
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize(torch.tensor(1.0), fmt("int:b8:row:rn"))
    assert quantize(torch.tensor(0.3), fmt("int:b8:tensor:rn")) == 0.3  # 0-d: its own amax -> exact


# ---------------------------------------------------------------------------------- integer with a scale

def int_reference(x: np.ndarray, n: int, amax: np.ndarray) -> np.ndarray:
    """numpy FP32: s = amax / qmax (broadcast), clip(rint(x / s)) * s; s == 0 -> zeros; specials pass."""
    x = x.astype(np.float32)
    qmax = np.float32(2 ** (n - 1) - 1)
    s = np.asarray(amax, np.float32) / qmax
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = x / np.where(s > 0, s, np.float32(1))
        out = np.clip(np.rint(y), -qmax, qmax).astype(np.float32) * s
    out = np.copysign(out.astype(np.float32), x)
    return np.where(np.isfinite(x), out, x).astype(np.float32)


def finite_absmax(x: np.ndarray, axis=None, keepdims=False) -> np.ndarray:
    return np.max(np.where(np.isfinite(x), np.abs(x), 0), axis=axis, keepdims=keepdims).astype(np.float32)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_int_scales_match_numpy_reference(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((6, 32)) * np.exp2(rng.integers(-20, 20, size=(6, 1)))).astype(np.float32)
    x[2, 5] = np.inf
    x[3, :] = 0.0
    cases = {
        "tensor": finite_absmax(x),
        "row": finite_absmax(x, axis=-1, keepdims=True),
    }
    for scale, amax in cases.items():
        assert_bitwise(quantize(torch.from_numpy(x), fmt(f"int:b{n}:{scale}:rn")), int_reference(x, n, amax))
    blocks = x.reshape(6, 4, 8)
    expected = int_reference(blocks, n, finite_absmax(blocks, axis=-1, keepdims=True)).reshape(6, 32)
    assert_bitwise(quantize(torch.from_numpy(x), fmt(f"int:b{n}:block8:rn")), expected)


def test_int_representable_values_ties_and_clamp():
    f = fmt("int:b4:tensor:rn")  # qmax 7; amax 7/8 -> s = 1/8 exactly
    grid = torch.arange(-7, 8, dtype=torch.float32) / 8
    assert_bitwise(quantize(grid, f), grid)
    ties = torch.cat([torch.tensor([7 / 8]), (torch.arange(-7, 7, dtype=torch.float32) + 0.5) / 8])
    got = quantize(ties, f)
    assert got[0] == 7 / 8 and bool(((got[1:] * 8) % 2 == 0).all())  # every tie went to an even multiple
    # a larger max than the tensor's own (from tensor_max) clamps the values beyond qmax * s
    got = quantize(torch.tensor([0.5, 0.875]), f, tensor_max=lambda t: t * 0 + 0.4375)
    assert_bitwise(got, [0.4375, 0.4375])  # s = 1/16: 8 and 14 steps, clamped to 7
    assert_bitwise(quantize(torch.tensor([0.0, -0.0, 0.0]), f), [0.0, -0.0, 0.0])  # amax 0 -> zeros


def test_int_scale_granularity():
    x = torch.tensor([[1.0, 0.3, 100.0, 7.0], [0.01, 0.02, 0.03, 0.04]])
    per_tensor = quantize(x, fmt("int:b8:tensor:rn"))
    per_row = quantize(x, fmt("int:b8:row:rn"))
    per_block = quantize(x, fmt("int:b8:block2:rn"))
    assert torch.equal(per_row, torch.stack([quantize(r, fmt("int:b8:tensor:rn")) for r in x]))
    assert torch.equal(per_block, torch.cat([quantize(x[:, i:i + 2], fmt("int:b8:row:rn")) for i in (0, 2)], 1))
    assert bool((per_tensor[1] == 0).all())  # 0.04 < s / 2 = 100/127/2: the small row vanishes per tensor
    assert not bool((per_row[1] == 0).any())


def test_int_reducers_complete_the_statistic():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.1], [2.0, 0.3, -0.7, 0.9]])
    calls = []

    def doubled(t):
        calls.append(t.clone())
        return t * 2

    never = pytest.fail  # called only if quantize asks for the wrong statistic
    got = quantize(x, fmt("int:b8:tensor:rn"), tensor_max=doubled, row_max=never)
    assert len(calls) == 1 and calls[0].shape == () and calls[0] == 2.0
    assert_bitwise(got, int_reference(x.numpy(), 8, np.float32(4.0)))
    calls.clear()
    got = quantize(x, fmt("int:b8:row:rn"), tensor_max=never, row_max=doubled)
    assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([1.0, 2.0]))
    assert_bitwise(got, int_reference(x.numpy(), 8, np.array([[2.0], [4.0]], np.float32)))
    for spec in ["int:b8:block2:rn", "bfp:m4:b2:rn", "fp:e4m3:rn", "fixed:w8f4:rn"]:
        quantize(x, fmt(spec), tensor_max=never, row_max=never)
    with pytest.raises(ValueError, match="row_max returned shape"):
        quantize(x, fmt("int:b8:row:rn"), row_max=lambda t: t.sum())


@pytest.mark.parametrize("spec", ["int:b8:tensor:sr", "int:b4:row:sr", "int:b4:block4:sr", "bfp:m3:b4:sr"])
def test_sharded_last_dimension_matches_the_whole_tensor(spec):
    """Two tensor-parallel shards of the last dim, with reducers that max over both, give the unsharded result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=gen) * torch.logspace(-3, 3, 5).unsqueeze(1)
    u = uniform_like(x, seed=4)
    shards = list(zip(x.split(8, dim=-1), u.split(8, dim=-1)))
    local = [(s.abs().amax(), s.abs().amax(dim=-1)) for s, _ in shards]
    whole_tensor = torch.maximum(local[0][0], local[1][0])
    whole_rows = torch.maximum(local[0][1], local[1][1])
    got = torch.cat([quantize(s, fmt(spec), v, tensor_max=lambda t: torch.maximum(t, whole_tensor),
                              row_max=lambda t: torch.maximum(t, whole_rows)) for s, v in shards], dim=-1)
    assert_bitwise(got, quantize(x, fmt(spec), u).numpy())


# -------------------------------------------------------------------------------------- stochastic rounding

def sr_draws(x_values: list[float], spec: str, draws: int, anchor: float | None = None, seed: int = 0):
    """quantize `draws` copies of each value; an anchor element per row pins a block's or row's statistic."""
    x = torch.tensor(x_values, dtype=torch.float32).repeat_interleave(draws).unsqueeze(1)
    if anchor is not None:
        x = torch.cat([x, torch.full_like(x, anchor)], dim=1)
    got = quantize(x, fmt(spec), uniform_like(x, seed))
    if anchor is not None:
        assert bool((got[:, 1] == anchor).all())
    return got[:, 0].reshape(len(x_values), draws)


SR_CASES = [  # (spec, anchor for the block / row statistic, lower neighbour, step, fractions)
    ("fp:e4m3:sr", None, 1.25, 0.125, (0.1, 0.25, 0.5, 0.75, 0.93)),
    ("fp:e4m3:sr", None, 3 * 2.0**-9, 2.0**-9, (0.1, 0.5, 0.8)),  # subnormals (step 2^-9)
    ("fp:e4m3:sr", None, 0.0, 2.0**-9, (0.03, 0.5)),  # between zero and the smallest subnormal
    ("fp:e2m1:sr", None, 4.0, 2.0, (0.2, 0.6)),
    ("fp:e5m2:sr", None, 2.0**-16, 2.0**-16, (0.3, 0.7)),  # subnormals of e5m2
    ("fixed:w8f4:sr", None, 1.0, 0.0625, (0.1, 0.5, 0.9)),
    ("bfp:m3:b2:sr", 1.5, 0.5, 0.25, (0.2, 0.5, 0.85)),  # block max 1.5: quantum 2^(0+1-3)
    ("int:b4:row:sr", 7.0, 2.0, 1.0, (0.15, 0.5, 0.7)),  # row amax 7: s = 1
]


@pytest.mark.parametrize("spec, anchor, low, step, fractions", SR_CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sr_is_unbiased_between_the_two_neighbours(spec, anchor, low, step, fractions, sign):
    draws = 4000
    values = [sign * (low + p * step) for p in fractions]
    got = sr_draws(values, spec, draws, anchor, seed=len(spec))
    for row, p, v in zip(got, fractions, values):
        down, up = sign * low, sign * (low + step)
        assert set(row.unique().tolist()) <= {down, up}, (v, row.unique())
        p_up = float((row == up).double().mean())
        se = math.sqrt(p * (1 - p) / draws)
        assert abs(p_up - p) < SE_BOUND * se, (v, p_up, p)
        mean_error = float(row.double().mean()) - v
        assert abs(mean_error) < SE_BOUND * step * se, (v, mean_error)


@pytest.mark.parametrize("e, m", [(4, 3), (3, 2), (2, 1), (5, 2)])
def test_sr_gives_only_grid_neighbours(e, m):
    grid = fp_grid(e, m)
    x = log_uniform_inputs(float(grid[1]) / 4, float(grid[-1]), 4000, seed=e * 8 + m)
    lo, hi, _ = grid_neighbours(x, grid)
    got = quantize(torch.from_numpy(x), fmt(f"fp:e{e}m{m}:sr"), uniform_like(torch.from_numpy(x))).numpy()
    assert np.all((np.abs(got) == lo) | (np.abs(got) == hi)) and np.all(np.signbit(got) == np.signbit(x))
    assert np.all(np.abs(got)[lo == hi] == lo[lo == hi])  # representable values stay


def test_sr_rule_at_the_threshold():
    """Round up exactly when u < frac(y): the resolution 2^-24 decides at the boundary."""
    f = fmt("fixed:w8f2:sr")  # quantum 1/4; y = x * 4
    x = torch.tensor([1.0625, 1.0625, -1.0625, -1.0625, 1.0, 1.0])  # y = 4.25 / -4.25 (frac 0.75), 4
    u = torch.tensor([0.25 - 2.0**-24, 0.25, 0.75 - 2.0**-24, 0.75, 0.0, 1 - 2.0**-24])
    assert_bitwise(quantize(x, f, u), [1.25, 1.0, -1.0, -1.25, 1.0, 1.0])


def test_sr_needs_a_uniform_of_the_right_shape_and_rn_ignores_it():
    x = torch.tensor([0.3, 1.7])
    with pytest.raises(ValueError, match="needs the uniform"):
        quantize(x, fmt("fp:e4m3:sr"))
    with pytest.raises(ValueError, match="uniform has shape"):
        quantize(x, fmt("fp:e4m3:sr"), torch.zeros(3))
    rn = fmt("fp:e4m3:rn")
    assert torch.equal(quantize(x, rn), quantize(x, rn, torch.zeros(2)))


# ------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("spec, canonical, fields", [
    ("fp:e4m3:sr", "fp:e4m3:sr", {"kind": "fp", "stochastic": True, "exponent_bits": 4, "mantissa_bits": 3}),
    (" FP:E5M2:RN ", "fp:e5m2:rn", {"kind": "fp", "stochastic": False, "exponent_bits": 5, "mantissa_bits": 2}),
    ("fp:e02m1:rn", "fp:e2m1:rn", {"exponent_bits": 2, "mantissa_bits": 1}),
    ("fixed:w8f4:rn", "fixed:w8f4:rn", {"kind": "fixed", "word_bits": 8, "fraction_bits": 4}),
    ("bfp:m8:b32:sr", "bfp:m8:b32:sr", {"kind": "bfp", "mantissa_bits": 8, "block": 32}),
    ("int:b8:tensor:rn", "int:b8:tensor:rn", {"kind": "int", "word_bits": 8, "scale": "tensor"}),
    ("int:b4:row:sr", "int:b4:row:sr", {"word_bits": 4, "scale": "row", "block": 0}),
    ("Int:B4:Block064:SR", "int:b4:block64:sr", {"word_bits": 4, "scale": "block", "block": 64}),
])
def test_parse_good_specs(spec, canonical, fields):
    f = fmt(spec)
    assert f.spec == canonical and parse_format(canonical) == f
    for name, value in fields.items():
        assert getattr(f, name) == value
    with pytest.raises(AttributeError):
        f.kind = "int"  # frozen


def test_parse_off_block_size_and_describe():
    assert parse_format("off") is None and parse_format(" OFF ") is None
    assert fmt("bfp:m8:b32:rn").block_size() == 32 and fmt("int:b8:block16:sr").block_size() == 16
    assert all(fmt(s).block_size() is None for s in ["fp:e4m3:rn", "fixed:w8f4:rn", "int:b8:row:rn"])
    assert fmt("fp:e4m3:sr").describe() == "FP8 E4M3 (max 448), stochastic rounding"
    assert fmt("fp:e2m1:rn").describe() == "FP4 E2M1 (max 6), round to nearest even"
    for spec, words in [("fixed:w8f4:rn", ["8-bit fixed", "4 fraction", "[-8, 7.9375]"]),
                        ("bfp:m8:b32:sr", ["block FP", "8-bit", "32 elements", "stochastic"]),
                        ("int:b4:block32:rn", ["INT4", "qmax 7", "32-element block"])]:
        assert all(w in fmt(spec).describe() for w in words), fmt(spec).describe()


@pytest.mark.parametrize("spec, reason", [
    ("foo:e4m3:rn", "unknown kind"), ("", "unknown kind"), ("on", "unknown kind"), ("fp8", "unknown kind"),
    ("fp:e4m3", "rounding"), ("fp:e4m3:", "rounding"), ("fp:e4m3:nearest", "rounding"), ("int:b8:row", "rounding"),
    ("fp:e4m3:sr:rn", "not of the form"), ("fp:e4:rn", "not of the form"), ("fp:e-4m3:rn", "not of the form"),
    ("fp:e4 m3:rn", "not of the form"), ("int:b8:column:rn", "not of the form"), ("int:b8:block:rn", "not of the form"),
    ("bfp:m8:rn", "not of the form"), ("fixed:w8:rn", "not of the form"),
    ("fp:e1m3:rn", "exponent bits"), ("fp:e9m3:rn", "exponent bits"), ("fp:e4m11:sr", "mantissa bits"),
    ("fixed:w1f0:rn", "word bits"), ("fixed:w33f0:rn", "word bits"), ("fixed:w8f31:rn", "fraction bits"),
    ("bfp:m0:b8:rn", "magnitude bits"), ("bfp:m24:b8:rn", "magnitude bits"), ("bfp:m8:b0:rn", "block size"),
    ("int:b1:tensor:rn", "integer bits"), ("int:b17:row:rn", "integer bits"), ("int:b8:block0:rn", "block size"),
])
def test_parse_bad_specs_one_line(spec, reason):
    with pytest.raises(ValueError) as info:
        parse_format(spec)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message and reason in message
    assert "expected off, fp:e<E>m<M>:<r>" in message and "int:b<N>:<tensor|row|block<K>>:<r>" in message


def test_parse_refuses_non_strings():
    for spec in [None, 8, ["fp:e4m3:rn"]]:
        with pytest.raises(ValueError, match="not a string"):
            parse_format(spec)
