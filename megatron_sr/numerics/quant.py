"""Low-bit number formats for simulated (fake) quantization: parse a format spec, quantize a tensor to it.

`quantize(x, fmt, uniform)` computes in FP32 and returns an FP32 tensor of x's shape whose values are
values of the format. It is pure tensor ops (no element loops, no host sync), so torch.compile can trace it.

Spec grammar (colon separated; the last field is the rounding, `rn` or `sr`; case and surrounding blanks
are ignored, `QuantFormat.spec` holds the canonical lower-case form):

    off                             no quantization (parse_format returns None)
    fp:e<E>m<M>:<r>                 floating point, 2 <= E <= 8, 0 <= M <= 10
    fixed:w<W>f<F>:<r>              signed fixed point, 2 <= W <= 32, 0 <= F <= 30
    bfp:m<M>:b<K>:<r>               block floating point, 1 <= M <= 23, K >= 1
    int:b<N>:<tensor|row|block<K>>:<r>  symmetric integer with a scale, 2 <= N <= 16, K >= 1

Every format: NaN and +-Inf inputs pass through unchanged (the quantizer never hides an overflow);
finite values beyond the format's range saturate to its largest value of that sign; a zero result keeps
x's sign (-0.0 stays -0.0, and so does a negative value that rounds to zero).

Rounding of a real y to an integer r: `rn` is round to nearest, ties to the even r (torch.round; so with
M = 0 mantissa bits a tie between two powers of two goes to the larger); `sr` is
r = floor(y) + (u < y - floor(y)) with u the caller's uniform k * 2^-24, k in [0, 2^24). So only the two
neighbours floor(y), floor(y) + 1 ever appear, P(up) = frac(y) and E[r] = y, both up to 2^-24.

fp:e<E>m<M>  bias = 2^(E-1) - 1, emin = 1 - bias, subnormals kept (gradual underflow). Per element,
    e = floor(log2|x|) clamped below at emin, quantum q = 2^(e - M), r = round(x / q) (x / q is exact: a
    power of two), result r * q clamped to +-max. The largest finite value, chosen so that the OCP /
    ml_dtypes formats come out right: E >= 5 reserve the top exponent for Inf/NaN like IEEE (e5m2 57344,
    e5m10 = FP16 65504, e8m7 = BF16's max); E == 4 reserves only the all-ones mantissa of the top exponent
    like E4M3FN (e4m3 448; e4m0, which has no mantissa bits, reserves the top exponent); E <= 3 reserve
    nothing, like OCP FP6/FP4 (e3m2 28, e2m3 7.5, e2m1 6).
fixed:w<W>f<F>  quantum 2^-F, r = round(x * 2^F) clamped to [-2^(W-1), 2^(W-1) - 1], result r * 2^-F.
    Where 2^(W-1) - 1 has more than 24 bits (W > 25) the top bound is the largest FP32 below it.
bfp:m<M>:b<K>  blocks of K consecutive elements along the last dimension (x.shape[-1] must be a multiple
    of K). Each element is a sign and an M-bit magnitude under one exponent per block:
    e_b = floor(log2(max |x| over the block's finite values)), clamped below at -126 (FP32's smallest
    normal exponent, so the quantum is an FP32 number), quantum 2^(e_b + 1 - M), magnitude clamped to
    2^M - 1. A block's exponent depends on its own elements only; an all-zero block stays zero.
int:b<N>:<scale>  qmax = 2^(N-1) - 1, amax = max |x| over the finite values of the tensor, of each row
    (the last dimension) or of each block of K along the last dimension, s = amax / qmax in FP32, result
    clamp(round(x / s), -qmax, qmax) * s in FP32. s == 0 (amax == 0, or so small that amax / qmax
    underflows) gives zeros.

Sharded tensors (tensor parallelism): `tensor_max` / `row_max` complete the local per-tensor / per-row
absmax into the max over all shards, so a scale never depends on the layout. Blocks never call them: the
caller cuts shards on block boundaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

KINDS = ("fp", "fixed", "bfp", "int")
INT_SCALES = ("tensor", "row", "block")
GRAMMAR = (
    "expected off, fp:e<E>m<M>:<r> (2<=E<=8, 0<=M<=10), fixed:w<W>f<F>:<r> (2<=W<=32, 0<=F<=30), "
    "bfp:m<M>:b<K>:<r> (1<=M<=23, K>=1) or int:b<N>:<tensor|row|block<K>>:<r> (2<=N<=16, K>=1), "
    "with the rounding <r> = rn (nearest even) or sr (stochastic)"
)
UNIFORM_STEP = 2.0**-24  # resolution of the caller's uniform values
FP32_MIN_EXP = -126  # smallest normal exponent of FP32
FP32_MAX_EXP = 127

Reducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QuantFormat:
    """One parsed format spec. Fields a kind does not use stay 0 / ""."""

    spec: str  # canonical spec string, e.g. "fp:e4m3:sr"
    kind: str  # "fp" | "fixed" | "bfp" | "int"
    stochastic: bool  # True for ":sr", False for ":rn"
    exponent_bits: int = 0  # fp: E
    mantissa_bits: int = 0  # fp: M; bfp: magnitude bits M
    word_bits: int = 0  # fixed: W; int: N
    fraction_bits: int = 0  # fixed: F
    scale: str = ""  # int: "tensor" | "row" | "block"
    block: int = 0  # bfp and int block scale: K

    def block_size(self) -> int | None:
        """Elements per block along the last dimension (bfp, int with a block scale), else None."""
        if self.kind == "bfp" or (self.kind == "int" and self.scale == "block"):
            return self.block
        return None

    def max_value(self) -> float | None:
        """The largest finite value of fp and fixed formats (None for bfp and int: they scale)."""
        if self.kind == "fp":
            return _fp_max(self.exponent_bits, self.mantissa_bits)
        if self.kind == "fixed":
            return _fixed_bounds(self.word_bits, self.fraction_bits)[1] * 2.0**-self.fraction_bits
        return None

    def describe(self) -> str:
        """A short description for the log, e.g. "FP8 E4M3 (max 448), stochastic rounding"."""
        rounding = "stochastic rounding" if self.stochastic else "round to nearest even"
        return f"{self._describe_values()}, {rounding}"

    def _describe_values(self) -> str:
        if self.kind == "fp":
            e, m = self.exponent_bits, self.mantissa_bits
            name = {(5, 10): "FP16", (8, 7): "BF16"}.get((e, m), f"FP{1 + e + m}")
            return f"{name} E{e}M{m} (max {self.max_value():g})"
        if self.kind == "fixed":
            w, f = self.word_bits, self.fraction_bits
            lo, hi = _fixed_bounds(w, f)
            return f"{w}-bit fixed point, {f} fraction bits (range [{lo * 2.0**-f:g}, {hi * 2.0**-f:g}])"
        if self.kind == "bfp":
            return (f"block FP, sign + {self.mantissa_bits}-bit magnitude, "
                    f"one exponent per {self.block} elements of the last dim")
        per = f"{self.block}-element block of the last dim" if self.scale == "block" else self.scale
        return f"INT{self.word_bits} symmetric (qmax {2 ** (self.word_bits - 1) - 1}), scale per {per}"


# ---------------------------------------------------------------------------------------------- parsing

_FORMS = {"fp": "fp:e<E>m<M>:<r>", "fixed": "fixed:w<W>f<F>:<r>", "bfp": "bfp:m<M>:b<K>:<r>",
          "int": "int:b<N>:<tensor|row|block<K>>:<r>"}
_FIELD_PATTERNS = {  # the fields between the kind and the rounding
    "fp": re.compile(r"e(\d+)m(\d+)"),
    "fixed": re.compile(r"w(\d+)f(\d+)"),
    "bfp": re.compile(r"m(\d+):b(\d+)"),
    "int": re.compile(r"b(\d+):(tensor|row|block(\d+))"),
}


def _bad_spec(spec: object, why: str) -> ValueError:
    return ValueError(f"bad quantization format {spec!r}: {why}; {GRAMMAR}")


def _check_range(spec: object, name: str, value: int, lo: int, hi: int | None = None) -> None:
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _bad_spec(spec, f"{name} must be {bound}, got {value}")


def parse_format(spec: str) -> QuantFormat | None:
    """'off' -> None; else a QuantFormat; a bad spec -> ValueError with one line naming the spec and the grammar."""
    if not isinstance(spec, str):
        raise _bad_spec(spec, "not a string")
    text = spec.strip().lower()
    if text == "off":
        return None
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise _bad_spec(spec, f"unknown kind {kind!r}")
    body, _, rounding = rest.rpartition(":")
    if rounding not in ("rn", "sr"):
        raise _bad_spec(spec, "the last field must be the rounding rn or sr")
    match = _FIELD_PATTERNS[kind].fullmatch(body)
    if match is None:
        raise _bad_spec(spec, f"not of the form {_FORMS[kind]}")
    groups = match.groups()
    return _build_format(spec, kind, rounding == "sr", groups)


def _build_format(spec: str, kind: str, stochastic: bool, groups: tuple[str | None, ...]) -> QuantFormat:
    """Range-check the matched fields and build the format with its canonical spec."""
    r = "sr" if stochastic else "rn"
    if kind == "fp":
        e, m = int(groups[0]), int(groups[1])
        _check_range(spec, "exponent bits E", e, 2, 8)
        _check_range(spec, "mantissa bits M", m, 0, 10)
        return QuantFormat(f"fp:e{e}m{m}:{r}", kind, stochastic, exponent_bits=e, mantissa_bits=m)
    if kind == "fixed":
        w, f = int(groups[0]), int(groups[1])
        _check_range(spec, "word bits W", w, 2, 32)
        _check_range(spec, "fraction bits F", f, 0, 30)
        return QuantFormat(f"fixed:w{w}f{f}:{r}", kind, stochastic, word_bits=w, fraction_bits=f)
    if kind == "bfp":
        m, k = int(groups[0]), int(groups[1])
        _check_range(spec, "magnitude bits M", m, 1, 23)
        _check_range(spec, "block size K", k, 1)
        return QuantFormat(f"bfp:m{m}:b{k}:{r}", kind, stochastic, mantissa_bits=m, block=k)
    n, scale = int(groups[0]), groups[1]
    _check_range(spec, "integer bits N", n, 2, 16)
    if groups[2] is None:
        return QuantFormat(f"int:b{n}:{scale}:{r}", kind, stochastic, word_bits=n, scale=scale)
    k = int(groups[2])
    _check_range(spec, "block size K", k, 1)
    return QuantFormat(f"int:b{n}:block{k}:{r}", kind, stochastic, word_bits=n, scale="block", block=k)


# ------------------------------------------------------------------------------------------ format limits

def _fp_max(e: int, m: int) -> float:
    """Largest finite value of fp:e<e>m<m> (see the module docstring for which codes are reserved)."""
    bias = 2 ** (e - 1) - 1
    top_exponent = 2**e - 1 - bias  # the all-ones exponent field
    if e >= 5 or (e == 4 and m == 0):  # the whole top exponent is Inf/NaN
        return 2.0 ** (top_exponent - 1) * (2 - 2.0**-m)
    if e == 4:  # only the all-ones mantissa of the top exponent is NaN
        return 2.0**top_exponent * (2 - 2.0 ** (1 - m))
    return 2.0**top_exponent * (2 - 2.0**-m)


def _fixed_bounds(w: int, f: int) -> tuple[float, float]:
    """The integer range [-2^(w-1), 2^(w-1) - 1]; the top bound rounded down to FP32 where it needs > 24 bits."""
    return -(2.0 ** (w - 1)), 2.0 ** (w - 1) - 2.0 ** max(0, w - 25)


# ------------------------------------------------------------------------------------------- tensor helpers

def _floor_log2(magnitude: torch.Tensor, lowest: int) -> torch.Tensor:
    """floor(log2 a) as int32 for a >= 0 from the FP32 exponent field, clamped to [lowest, 127].

    lowest >= -126, so FP32 subnormals and zero (exponent field 0) land on `lowest` as they should.
    """
    biased = magnitude.view(torch.int32) >> 23  # the sign bit is 0
    return torch.clamp(biased - 127, lowest, FP32_MAX_EXP)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as FP32 for int32 e in [-126, 127], built from its bits (exact on every device)."""
    return ((exponent + 127) << 23).view(torch.float32)


def _round_integer(y: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
    """Nearest-even integer (uniform None) or floor(y) + (uniform < frac(y))."""
    if uniform is None:
        return torch.round(y)
    low = torch.floor(y)
    return low + (uniform < y - low).to(y.dtype)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN and +-Inf counted as 0, for the statistics that set an exponent or a scale."""
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))


def _blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // k, k)


# ------------------------------------------------------------------------------------------- the formats

def _quantize_fp(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None) -> torch.Tensor:
    m = fmt.mantissa_bits
    emin = 2 - 2 ** (fmt.exponent_bits - 1)  # 1 - bias
    quantum = _pow2(_floor_log2(x.abs(), emin)) * 2.0**-m  # 2^(e - m) >= 2^-136: an FP32 number, exact
    r = _round_integer(x / quantum, uniform)
    limit = _fp_max(fmt.exponent_bits, m)
    return torch.clamp(r * quantum, -limit, limit)


def _quantize_fixed(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None) -> torch.Tensor:
    f = fmt.fraction_bits
    lo, hi = _fixed_bounds(fmt.word_bits, f)
    r = _round_integer(x * 2.0**f, uniform)  # exact, or Inf past FP32's range, which the clamp saturates
    return torch.clamp(r, lo, hi) * 2.0**-f


def _quantize_bfp(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None) -> torch.Tensor:
    k, m = fmt.block, fmt.mantissa_bits
    xb = _blocks(x, k)
    block_max = _finite_abs(xb).amax(dim=-1, keepdim=True)
    quantum = _pow2(_floor_log2(block_max, FP32_MIN_EXP)) * 2.0 ** (1 - m)
    ub = None if uniform is None else _blocks(uniform, k)
    top = 2.0**m - 1
    r = torch.clamp(_round_integer(xb / quantum, ub), -top, top)
    return (r * quantum).reshape(x.shape)


def _scaled_integer(x: torch.Tensor, amax: torch.Tensor, qmax: float, uniform: torch.Tensor | None) -> torch.Tensor:
    """clamp(round(x / s), -qmax, qmax) * s with s = amax / qmax broadcast over x; s == 0 gives zeros."""
    scale = amax / qmax
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    r = torch.clamp(_round_integer(x / divisor, uniform), -qmax, qmax)
    return r * scale


def _reduced(local: torch.Tensor, reducer: Reducer | None, what: str) -> torch.Tensor:
    """The statistic over all shards: the reducer's answer, which must keep the local statistic's shape."""
    if reducer is None:
        return local
    full = reducer(local).to(torch.float32)
    if full.shape != local.shape:
        raise ValueError(f"{what} returned shape {tuple(full.shape)}, expected {tuple(local.shape)}")
    return full


def _quantize_int(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None,
                  tensor_max: Reducer | None, row_max: Reducer | None) -> torch.Tensor:
    qmax = float(2 ** (fmt.word_bits - 1) - 1)
    magnitude = _finite_abs(x)
    if fmt.scale == "tensor":
        amax = _reduced(magnitude.amax(), tensor_max, "tensor_max")
        return _scaled_integer(x, amax, qmax, uniform)
    if fmt.scale == "row":
        amax = _reduced(magnitude.amax(dim=-1), row_max, "row_max")
        return _scaled_integer(x, amax.unsqueeze(-1), qmax, uniform)
    k = fmt.block
    amax = _blocks(magnitude, k).amax(dim=-1, keepdim=True)
    ub = None if uniform is None else _blocks(uniform, k)
    return _scaled_integer(_blocks(x, k), amax, qmax, ub).reshape(x.shape)


def _check_inputs(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None) -> torch.Tensor | None:
    """The uniform to round with (None for rn); refuses shapes the format cannot take."""
    needs_rows = fmt.block_size() is not None or fmt.scale == "row"
    if needs_rows and x.dim() == 0:
        raise ValueError(f"quantize({fmt.spec}): needs a tensor with at least one dimension")
    k = fmt.block_size()
    if k is not None and x.shape[-1] % k:
        raise ValueError(f"quantize({fmt.spec}): the last dimension {x.shape[-1]} is not a multiple of the "
                         f"block size {k}")
    if not fmt.stochastic:
        return None
    if uniform is None:
        raise ValueError(f"quantize({fmt.spec}): stochastic rounding needs the uniform random values")
    if uniform.shape != x.shape:
        raise ValueError(f"quantize({fmt.spec}): uniform has shape {tuple(uniform.shape)}, "
                         f"x has {tuple(x.shape)}")
    return uniform.to(torch.float32)


def quantize(x: torch.Tensor, fmt: QuantFormat, uniform: torch.Tensor | None = None, *,
             tensor_max: Reducer | None = None, row_max: Reducer | None = None) -> torch.Tensor:
    """Fake-quantize x: computed in FP32, returns an FP32 tensor of x's shape holding values of the format.

    uniform: FP32 values k * 2^-24 of x's shape, required for stochastic rounding, ignored otherwise.
    tensor_max / row_max: complete the local per-tensor (0-d) / per-row (x.shape[:-1]) absmax into the max
    over all shards of a sharded tensor; None means x is the whole tensor. Only int's tensor and row scales
    call them.
    """
    x32 = x.to(torch.float32)
    u = _check_inputs(x32, fmt, uniform)
    if x32.numel() == 0:
        return x32.clone()
    if fmt.kind == "fp":
        out = _quantize_fp(x32, fmt, u)
    elif fmt.kind == "fixed":
        out = _quantize_fixed(x32, fmt, u)
    elif fmt.kind == "bfp":
        out = _quantize_bfp(x32, fmt, u)
    elif fmt.kind == "int":
        out = _quantize_int(x32, fmt, u, tensor_max, row_max)
    else:
        raise ValueError(f"quantize: unknown format kind {fmt.kind!r}")
    # a zero result keeps x's sign (every nonzero result already has it); NaN and +-Inf pass through
    return torch.where(torch.isfinite(x32), torch.copysign(out, x32), x32)
