"""Simulated low-bit linear layers: six quantization points in every column- and row-parallel linear.

    y = Q_fwd_input(x) Q_fwd_weight(W)^T + b
    dL/dx = Q_bwd_grad_dgrad(g) Q_bwd_weight(W)            (g = dL/dy)
    dL/dW = Q_bwd_grad_wgrad(g)^T Q_bwd_input(x)

Each point is off or a format with a rounding (megatron_sr/numerics/quant.py, e.g. `fp:e4m3:sr`). Every
point quantizes the layer's own full-precision tensor (x and W as saved for backward, g as it arrives), so
the backward points are independent of the forward ones. Gradients are straight-through: the quantizers
have no derivative of their own, the products above are the gradients. The bias gradient is the sum of the
unquantized g. A quantized operand is held in the layer's dtype when the format's values are exact in it (FP8,
FP6, FP4, fixed point up to 9 bits, bfp up to 8 magnitude bits in BF16), else in FP32 (the int formats' FP32
scales); a GEMM runs in the layer's dtype on an accelerator when both operands are in it (exact products, FP32
accumulation: a low-bit tensor core's arithmetic), otherwise, and always on the CPU, in FP32 from the same
values, and its result is rounded to the layer's dtype once. A layer with
every point off never enters this module: it is bitwise the unquantized layer.

Random bits of stochastic points (numerics/philox.py `uniform24_at`; on the CPU a C++ library gives the same
bits): key = the run's seed, counter = (element index // 4, step, stream), stream = STREAM_QUANT | eval << 30 |
linear id << 3 | point. The element index is the position in the *unsharded* tensor: for activations and
gradients ((sample * rows per sample + row) * full width + tp offset + column), the sample counted over the
whole global batch of the step, so dp ranks and micro-batches see the bits a single process would; for weights
(row * full width + column), the same for every micro-batch of a step (the weight is quantized once per step,
like a low-bit weight copy). The linear id is (global layer number * 8 + which linear of the layer), the same on
every pipeline stage.

Statistics that span a tensor (an int format's per-tensor or per-row scale) are reduced over tensor-parallel
ranks when the tensor is sharded (a MAX all-reduce), so they never depend on the layout; blocks (bfp, int
block scales) run along the last dimension and must not cross a shard (the config check requires the local
width to be a multiple of the block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..numerics.philox import STREAM_QUANT, SRKey, uniform24_rows
from ..numerics.quant import QuantFormat, parse_format, quantize
from . import parallel_state as ps

POINTS = ("fwd_input", "fwd_weight", "bwd_input", "bwd_weight", "bwd_grad_dgrad", "bwd_grad_wgrad")
POINT_TENSOR = {"fwd_input": "input", "fwd_weight": "weight", "bwd_input": "input", "bwd_weight": "weight",
                "bwd_grad_dgrad": "grad", "bwd_grad_wgrad": "grad"}
LINEAR_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc1_gate", "linear_fc2")
_EVAL_BIT = 1 << 30


@dataclass(frozen=True)
class QuantScheme:
    """The formats of the points that are on (a point that is off is absent), and the seed of their bits."""

    formats: dict[str, QuantFormat]
    seed: int = 0

    @classmethod
    def parse(cls, specs: dict[str, str], seed: int) -> QuantScheme:
        """{point: spec}; ValueError (one line) for an unknown point or spec."""
        formats = {}
        for point, spec in specs.items():
            if point not in POINTS:
                raise ValueError(f"unknown quantization point {point!r}; expected one of {', '.join(POINTS)}")
            fmt = parse_format(spec)
            if fmt is not None:
                formats[point] = fmt
        return cls(formats, seed)

    @property
    def enabled(self) -> bool:
        return bool(self.formats)

    def describe(self) -> str:
        if not self.formats:
            return "off"
        on = [p for p in POINTS if p in self.formats]
        return "; ".join(f"{p} {self.formats[p].spec} ({self.formats[p].describe()})" for p in on)


@dataclass
class QuantPosition:
    """Where the next forward is: the step, its micro-batch's first sample in the step's global batch
    (over all dp ranks and micro-batches), and whether it is training or evaluation."""

    step: int = 0
    sample_offset: int = 0
    training: bool = True


_POSITION = QuantPosition()


def set_quant_position(step: int, sample_offset: int, training: bool) -> None:
    """Set by the forward step before each micro-batch's forward (training/forward_backward.py)."""
    _POSITION.step, _POSITION.sample_offset, _POSITION.training = int(step), int(sample_offset), bool(training)


def current_quant_position() -> QuantPosition:
    return QuantPosition(_POSITION.step, _POSITION.sample_offset, _POSITION.training)


@dataclass(frozen=True)
class _Place:
    """Where a local 2-D view [rows, width] of a tensor sits in the unsharded one: the full width, this
    rank's column offset in it, and whether the last dimension is split over tp ranks."""

    full_width: int
    column_offset: int
    split_last: bool


def _tp_max(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    return out


class LinearQuant:
    """The quantization points of one linear layer: its formats, its id in the random stream and where its
    input, weight and output gradient sit in their unsharded tensors."""

    def __init__(self, scheme: QuantScheme, linear_id: int, *, parallel: str, in_features: int, out_features: int):
        """parallel: "column" (weight rows split over tp) or "row" (weight columns, and so the input, split);
        in_features/out_features: this rank's (local) sizes."""
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.scheme, self.linear_id = scheme, linear_id
        self.weight_split = tp > 1  # either way the weight is split: its per-tensor statistic spans the ranks
        if parallel == "column":  # x full; W [out/tp, in] rows at rank * out/tp; g split along its last dim
            self.places = {"input": _Place(in_features, 0, False), "weight": _Place(in_features, 0, False),
                           "grad": _Place(out_features * tp, rank * out_features, tp > 1)}
            self.weight_row_offset = rank * out_features
        elif parallel == "row":  # x split along its last dim; W [out, in/tp] columns at rank * in/tp; g full
            self.places = {"input": _Place(in_features * tp, rank * in_features, tp > 1),
                           "weight": _Place(in_features * tp, rank * in_features, tp > 1),
                           "grad": _Place(out_features, 0, False)}
            self.weight_row_offset = 0
        else:
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")

    def point(self, name: str) -> QuantFormat | None:
        return self.scheme.formats.get(name)

    def _uniform(self, name: str, t2d: torch.Tensor, pos: QuantPosition, rows_per_sample: int) -> torch.Tensor:
        """The point's uniforms for the local [rows, width] view t2d (see the module docstring)."""
        kind = POINT_TENSOR[name]
        place = self.places[kind]
        first_row = self.weight_row_offset if kind == "weight" else pos.sample_offset * rows_per_sample
        stream = STREAM_QUANT | (0 if pos.training else _EVAL_BIT) | (self.linear_id << 3) | POINTS.index(name)
        return uniform24_rows(t2d.shape[0], t2d.shape[1], first_row, place.full_width, place.column_offset, pos.step,
                              stream, SRKey.from_seed(self.scheme.seed), t2d.device)

    def apply(self, name: str, t: torch.Tensor, pos: QuantPosition) -> torch.Tensor:
        """t quantized at point `name`: in t's dtype when every value of the format is exact in it, else FP32
        (t itself when the point is off)."""
        fmt = self.point(name)
        if fmt is None:
            return t
        kind = POINT_TENSOR[name]
        t2d = t.reshape(-1, t.shape[-1])
        rows_per_sample = t2d.shape[0] // t.shape[0] if t.dim() > 2 else 1
        uniform = self._uniform(name, t2d, pos, rows_per_sample) if fmt.stochastic else None
        if kind == "weight":
            whole = self.weight_split
            rows_split = self.places["weight"].split_last
        else:
            whole = rows_split = self.places[kind].split_last
        q = quantize(t2d, fmt, uniform, tensor_max=_tp_max if whole else None,
                     row_max=_tp_max if rows_split else None)
        return q.view(t.shape).to(t.dtype) if exact_in(fmt, t.dtype) else q.view(t.shape)


def exact_in(fmt: QuantFormat, dtype: torch.dtype) -> bool:
    """Whether every value of the format is a value of dtype (then the cast after quantize is exact)."""
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:  # 8 significant bits, FP32's exponent range
        return ((fmt.kind == "fp" and fmt.mantissa_bits <= 7) or (fmt.kind == "fixed" and fmt.word_bits <= 9)
                or (fmt.kind == "bfp" and fmt.mantissa_bits <= 8))
    if dtype == torch.float16:  # 11 significant bits, exponents -24 (subnormal) to 15
        return fmt.kind == "fp" and fmt.exponent_bits <= 5 and fmt.mantissa_bits <= 10
    return False  # int formats (an FP32 scale) and anything else stay FP32


def _operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's operands in one dtype: the layer's own on an accelerator when both are in it (a low-bit value
    is exact there, the GEMM accumulates in FP32); FP32 otherwise, and always on the CPU (whose BF16 GEMMs are
    emulated and slow; the products are the same, each operand being exact)."""
    if a.dtype == b.dtype and (a.dtype == torch.float32 or a.device.type != "cpu"):
        return a, b
    return a.float(), b.float()


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lq: LinearQuant,
                pos: QuantPosition) -> torch.Tensor:
        xq, wq = _operands(lq.apply("fwd_input", x, pos), lq.apply("fwd_weight", weight, pos))
        out = F.linear(xq, wq, bias.to(xq.dtype) if bias is not None else None).to(x.dtype)
        ctx.save_for_backward(x, weight)
        ctx.lq, ctx.pos, ctx.has_bias, ctx.bias_dtype = lq, pos, bias is not None, getattr(bias, "dtype", None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        lq, pos = ctx.lq, ctx.pos
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g, w = _operands(lq.apply("bwd_grad_dgrad", grad, pos), lq.apply("bwd_weight", weight, pos))
            grad_x = g.matmul(w).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g, xb = _operands(lq.apply("bwd_grad_wgrad", grad, pos), lq.apply("bwd_input", x, pos))
            grad_w = g.reshape(-1, grad.shape[-1]).t().mm(xb.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lq: LinearQuant) -> torch.Tensor:
    """F.linear with the layer's quantization points, at the current position (set_quant_position)."""
    return _QuantizedLinear.apply(x, weight, bias, lq, current_quant_position())


def linear_id(layer_number: int, kind: str) -> int:
    """The stream id of a transformer layer's linear: global 0-based layer number * 8 + which linear."""
    return layer_number * 8 + LINEAR_KINDS.index(kind)
