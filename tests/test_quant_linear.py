"""The six quantization points of the tensor-parallel linear layers (megatron_sr/parallel/quantized_linear.py).

Checked against explicit formulas computed here with `quantize` on the same tensors: each point changes only
the tensor it names (forward output, input gradient or weight gradient), gradients are straight-through, a
scheme with every point off is the plain layer, and the random bits follow the documented stream (same
position, same bits; another step, micro-batch sample or evaluation, other bits). The config accepts the
flags and the YAML block and refuses bad specs, blocks that cross a shard and full recompute, each in one line.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sr.config import ConfigError, parse_config
from megatron_sr.numerics.philox import STREAM_QUANT, SRKey, uniform24_at
from megatron_sr.numerics.quant import parse_format, quantize
from megatron_sr.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_sr.parallel.quantized_linear import POINTS, QuantScheme, linear_id, set_quant_position

FMT = "fp:e2m1:rn"  # coarse enough that every quantized tensor differs from its input


def _init(seed):
    def fill(t):
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return fill


def _layer(kind, scheme, dtype=torch.float32):
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layer = cls(8, 12, init_method=_init(3), bias=True, dtype=dtype, quant=scheme, quant_id=linear_id(1, "linear_fc1"))
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 12, dtype=dtype))
    return layer


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 5, 8, generator=gen).to(dtype), torch.randn(2, 5, 12, generator=gen).to(dtype)


def _q(t):
    return quantize(t.float().reshape(-1, t.shape[-1]), parse_format(FMT)).view(t.shape)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("point", POINTS)
def test_each_point_quantizes_its_tensor_and_nothing_else(kind, point):
    set_quant_position(1, 0, True)
    x, g = _data()
    plain = _run(_layer(kind, None), x, g)
    quant = _run(_layer(kind, QuantScheme.parse({point: FMT}, seed=5)), x, g)
    w, b = _layer(kind, None).weight.detach(), torch.linspace(-1, 1, 12)
    X = {"fwd_input": _q(x), "bwd_input": _q(x)}
    W = {"fwd_weight": _q(w), "bwd_weight": _q(w)}
    G = {"bwd_grad_dgrad": _q(g), "bwd_grad_wgrad": _q(g)}
    expect_y = X.get(point, x) @ W.get(point, w).t() + b if point.startswith("fwd") else plain[0]
    expect_dx = G.get(point, g) @ W.get(point, w) if point in ("bwd_weight", "bwd_grad_dgrad") else plain[1]
    if point in ("bwd_input", "bwd_grad_wgrad"):
        expect_dw = G.get(point, g).reshape(-1, 12).t() @ X.get(point, x).reshape(-1, 8)
    else:
        expect_dw = plain[2]
    for got, want, base, name in zip(quant[:3], (expect_y, expect_dx, expect_dw), plain[:3], ("y", "dx", "dw")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{point}: {name}")
        changed = not torch.allclose(got, base, rtol=1e-6, atol=1e-6)
        assert changed == (want is not base), f"{point} changed {name}: {changed}"
    torch.testing.assert_close(quant[3], plain[3], rtol=0, atol=0)  # the bias gradient: the unquantized g


def test_a_scheme_with_every_point_off_is_the_plain_layer():
    scheme = QuantScheme.parse({p: "off" for p in POINTS}, seed=5)
    assert not scheme.enabled
    layer = _layer("column", scheme)
    assert layer.quant is None  # the plain F.linear path: bitwise the unquantized layer by construction
    x, g = _data()
    for a, b in zip(_run(layer, x, g), _run(_layer("column", None), x, g)):
        assert torch.equal(a, b)


def test_a_lossless_format_on_a_bf16_layer_gives_the_plain_cpu_bf16_results():
    """BF16 values are exact in fp:e8m7 (BF16's own format): the quantized path (FP32 GEMMs of the exact
    operands, one rounding to BF16) equals the plain layer under the CPU's FP32-GEMM mode bit for bit."""
    from megatron_sr.model.cpu_bf16 import cpu_bf16_matmul

    set_quant_position(1, 0, True)
    x, g = _data(torch.bfloat16)
    scheme = QuantScheme.parse({p: "fp:e8m7:rn" for p in POINTS}, seed=5)
    quant = _run(_layer("column", scheme, torch.bfloat16), x, g)
    with cpu_bf16_matmul(x):
        plain = _run(_layer("column", None, torch.bfloat16), x, g)
    for a, b, name in zip(quant, plain, ("y", "dx", "dw", "db")):
        assert torch.equal(a, b), name


def _fwd(layer, x, step, sample, training=True):
    set_quant_position(step, sample, training)
    with torch.no_grad():
        return layer(x)


def test_stochastic_bits_follow_the_position():
    x, _ = _data()
    layer = _layer("column", QuantScheme.parse({"fwd_input": "fp:e2m1:sr"}, seed=5))
    base = _fwd(layer, x, 3, 0)
    assert torch.equal(base, _fwd(layer, x, 3, 0))  # reproducible
    assert not torch.equal(base, _fwd(layer, x, 4, 0))  # another step
    assert not torch.equal(base, _fwd(layer, x, 3, 0, training=False))  # evaluation draws its own bits
    # sample 1 of a micro-batch at offset 0 is sample 0 of the micro-batch at offset 1: the same bits
    assert torch.equal(base[1], _fwd(layer, x[1:], 3, 1)[0])
    # the element index is (sample * rows + row) * width + column, with the documented stream
    x2d = x.reshape(-1, 8)
    index = torch.arange(x2d.numel()).view(x2d.shape)
    stream = STREAM_QUANT | (linear_id(1, "linear_fc1") << 3) | POINTS.index("fwd_input")
    u = uniform24_at(index, 3, stream, SRKey.from_seed(5))
    xq = quantize(x2d, parse_format("fp:e2m1:sr"), u).view(x.shape)
    torch.testing.assert_close(base, xq @ layer.weight.detach().t() + layer.bias.detach(), rtol=1e-6, atol=1e-6)


def test_weights_draw_the_same_bits_for_every_micro_batch_of_a_step():
    x, _ = _data()
    layer = _layer("column", QuantScheme.parse({"fwd_weight": "fp:e2m1:sr"}, seed=5))
    a, b = _fwd(layer, x, 3, 0), _fwd(layer, x, 3, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, _fwd(layer, x, 4, 0))


ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--mock-data", "--train-iters", "2", "--device", "cpu"]


def test_flags_and_yaml_block_set_the_points(tmp_path):
    cfg = parse_config(ARGS + ["--quant-fwd-weight", "fp:e4m3:sr", "--quant-bwd-grad-dgrad", "fp:e5m2:rn"])
    assert cfg.model.quant_fwd_weight == "fp:e4m3:sr" and cfg.model.quant_bwd_grad_dgrad == "fp:e5m2:rn"
    assert cfg.model.quant_fwd_input == "off"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("quant:\n  fwd-input: int:b8:row:sr\n  bwd_grad_wgrad: bfp:m7:b16:rn\n")
    cfg = parse_config(ARGS + ["--config", str(yaml_file)])
    assert cfg.model.quant_fwd_input == "int:b8:row:sr" and cfg.model.quant_bwd_grad_wgrad == "bfp:m7:b16:rn"


@pytest.mark.parametrize("extra, message", [
    (["--quant-fwd-input", "fp:e9m3:sr"], "--quant-fwd-input"),
    (["--quant-bwd-weight", "nonsense"], "--quant-bwd-weight"),
    (["--quant-fwd-input", "bfp:m7:b48:sr"], "blocks of 48"),  # 48 does not tile hidden 32
    (["--quant-bwd-grad-dgrad", "int:b8:block16:sr", "--tensor-model-parallel-size", "4"], "blocks of 16"),
    (["--quant-fwd-weight", "fp:e4m3:sr", "--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"], "--recompute-granularity full"),
])
def test_bad_quantization_settings_are_one_line_errors(extra, message, monkeypatch):
    if "--tensor-model-parallel-size" in extra:
        monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError) as err:
        parse_config(ARGS + extra)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_log_names_the_scheme_and_training_runs():
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Lines(Observer):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    lines = Lines()
    result = pretrain(parse_config(ARGS + ["--quant-fwd-weight", "fp:e4m3:sr", "--quant-bwd-grad-dgrad",
                                           "fp:e5m2:sr", "--eval-iters", "1", "--eval-interval", "1"]), lines)
    assert len(result.train_losses) == 2 and all(torch.isfinite(torch.tensor(result.train_losses)))
    named = [ln for ln in lines.lines if "quantization points" in ln]
    assert len(named) == 1 and "fwd_weight fp:e4m3:sr" in named[0] and "bwd_grad_dgrad fp:e5m2:sr" in named[0]


@pytest.mark.parametrize("rows, width, first_row, full_width, col_offset", [
    (5, 7, 3, 20, 5), (100, 512, 16, 1024, 512), (3, 1, 0, 1, 0), (64, 33, 2**33 + 1, 99, 13), (2, 300, 5, 301, 1)])
def test_the_cpu_uniform_library_equals_the_tensor_definition(rows, width, first_row, full_width, col_offset):
    from megatron_sr.numerics import philox

    assert philox._uniform_cpu() is not None  # a compiler is there (CI has one): the library is what runs
    key = SRKey.from_seed(77)
    fast = philox.uniform24_rows(rows, width, first_row, full_width, col_offset, 9, STREAM_QUANT | 123, key)
    index = (torch.arange(rows) + first_row).unsqueeze(1) * full_width + torch.arange(width) + col_offset
    assert torch.equal(fast, uniform24_at(index, 9, STREAM_QUANT | 123, key))


def test_without_the_library_the_tensor_path_runs_with_one_warning(monkeypatch):
    from megatron_sr.numerics import philox

    monkeypatch.setenv("MEGATRON_SR_CPU_FAST", "0")
    monkeypatch.setattr(philox, "_uniform_library", None)
    monkeypatch.setattr(philox, "_uniform_failure", None)
    key = SRKey.from_seed(3)
    with pytest.warns(RuntimeWarning, match="MEGATRON_SR_CPU_FAST=0"):
        slow = philox.uniform24_rows(4, 9, 1, 9, 0, 2, STREAM_QUANT, key)
    assert torch.equal(slow, uniform24_at(torch.arange(9, 45).view(4, 9), 2, STREAM_QUANT, key))
    aligned = philox.uniform24_rows(3, 8, 2, 16, 4, 2, STREAM_QUANT, key)  # runs of 4 known from the shape
    index = (torch.arange(3) + 2).unsqueeze(1) * 16 + 4 + torch.arange(8)
    assert torch.equal(aligned, uniform24_at(index, 2, STREAM_QUANT, key))


@pytest.mark.parametrize("spec, dtype, exact", [
    ("fp:e4m3:sr", torch.bfloat16, True), ("fp:e8m7:rn", torch.bfloat16, True), ("fp:e5m2:rn", torch.float16, True),
    ("fixed:w9f3:sr", torch.bfloat16, True), ("bfp:m8:b4:sr", torch.bfloat16, True),
    ("fp:e5m10:rn", torch.bfloat16, False), ("fixed:w12f3:rn", torch.bfloat16, False),
    ("int:b4:row:sr", torch.bfloat16, False)])
def test_operands_stay_in_the_layer_dtype_exactly_when_the_format_fits(spec, dtype, exact):
    from megatron_sr.parallel.quantized_linear import exact_in

    fmt = parse_format(spec)
    assert exact_in(fmt, dtype) == exact
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen) * torch.logspace(-6, 3, 16)
    u = torch.randint(0, 2**24, x.shape, generator=gen) * 2.0**-24
    q = quantize(x, fmt, u if fmt.stochastic else None)
    if exact:  # every value of the format survives the cast
        assert torch.equal(q.to(dtype).float(), q)
