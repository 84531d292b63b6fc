"""The CPU path: the C++ SR AdamW library (optimizer/cpu_fast.py) against the eager reference, bit for bit, its
fall-back, and the BF16 attention of model/cpu_bf16.py.

Every comparison is of bit patterns (NaN payloads included): the library must give exactly what
`adamw_reference_` gives, for every dtype variant, size, stream offset and pointer offset.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
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
    bits,
    clone_chunk,
    make_chunk,
    reference_step,
)

from megatron_sr.optimizer import cpu_fast, dispatch, step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_

SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 255, 1000, 4097, 65539]
# (stream offset, pointer offset in elements): aligned; mid-group starts; a start past a block boundary of the
# library's work split (2048 groups); an index above 2^32 groups' worth (2^35 elements)
OFFSETS = [(0, 0), (5, 1), (8 * 1000 + 3, 0), (13, 3), (16384 * 3 - 2, 2), (2**35 + 7, 5)]


def _ids(v):
    return "p{}-g{}-s{}-{}".format(*(str(x).replace("torch.", "") for x in v))


def _library(chunks, scalars, step, rounding):
    cpu_fast.step(chunks, scalars=scalars, step=step, consts=CONSTS, stochastic=rounding == "stochastic", key=KEY)


def _run_both(chunks, steps, rounding):
    want = [clone_chunk(c) for c in chunks]
    for step in range(1, steps + 1):
        scalars = step_scalars(LR, step, B1, B2, "cpu")
        _library(chunks, scalars, step, rounding)
        reference_step(want, scalars, step, rounding)
    for c, w in zip(chunks, want):
        assert_same_bits(c, w, f"step {steps}")


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_every_variant_sizes_offsets_and_pointers(variant):
    """Every dtype variant and rounding: one call over chunks of many sizes, stream and pointer offsets, 2 steps."""
    *dtypes, rounding = variant
    gen = torch.Generator().manual_seed(1000 + VARIANTS.index(variant))
    chunks = [make_chunk(n, dtypes, gen, base, 0.1 if i % 2 else 0.0, pad)
              for i, n in enumerate(SIZES) for base, pad in OFFSETS]
    _run_both(chunks, steps=2, rounding=rounding)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_every_variant_a_million_elements(variant):
    """One chunk of 10^6 + 3 elements at an odd stream offset and an odd pointer, one step."""
    *dtypes, rounding = variant
    gen = torch.Generator().manual_seed(2000 + VARIANTS.index(variant))
    _run_both([make_chunk(1_000_003, dtypes, gen, 3 * 2**32 + 12_345, 0.1, pad=3)], steps=1, rounding=rounding)


@pytest.mark.parametrize("states", [F32, BF16])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_nan_inf_and_huge_values(states, rounding):
    """NaN, Inf and values near the BF16/FP32 limits in params and grads: the same bits as the reference."""
    gen = torch.Generator().manual_seed(3)
    chunks = [make_chunk(4099, (p, g, states), gen, base=77, wd=0.1) for p in (BF16, F32) for g in (BF16, F32)]
    for c in chunks:
        c.param[::97] = float("nan")
        c.grad[5::89] = float("inf")
        c.grad[6::89] = -float("inf")
        c.grad[7::101] = -float("nan")
        c.param[11::103] = 3.3e38
        c.param[12::103] = -3.39e38 if c.param.dtype == F32 else -3.3e38
        c.exp_avg_sq[13::107] = float("inf")
        c.param[14::109] = -float("nan")
        c.exp_avg[15::113] = -float("nan")  # NaNs of both signs meet in the additions and the division
        c.exp_avg_sq[16::127] = float("nan")
        c.exp_avg_sq[17::131] = -1.0  # a negative second moment: the sqrt of a negative number
        c.exp_avg[18::137] = float("inf")
    _run_both(chunks, steps=3, rounding=rounding)


@pytest.mark.parametrize("states", [F32, BF16])
def test_shards_equal_slices_of_the_full_update(states):
    """The distributed optimizer's pieces: each part of a parameter with its unsharded base index gives
    exactly the slice of the whole parameter's update, however the parts are grouped into calls."""
    gen = torch.Generator().manual_seed(11)
    n, base = 100_003, 4242
    full = make_chunk(n, (BF16, BF16, states), gen, base=base, wd=0.1)
    src = clone_chunk(full)
    cuts = [0, 1, 6, 1000, 1003, 16_384 * 2 + 5, 50_000, 77_777, n]
    pieces = [AdamWChunk(src.param[a:b], src.grad[a:b], src.exp_avg[a:b], src.exp_avg_sq[a:b], base + a, 0.1)
              for a, b in zip(cuts, cuts[1:])]
    for step in (1, 2):
        scalars = step_scalars(LR, step, B1, B2, "cpu")
        _library([full], scalars, step, "stochastic")
        _library(pieces[::2], scalars, step, "stochastic")
        _library(pieces[1::2], scalars, step, "stochastic")
    assert_same_bits(src, full, "shards")


def test_thread_count_does_not_change_the_bits():
    gen = torch.Generator().manual_seed(5)
    sizes = [(300_001, 9), (70_000, 300_010), (3, 7)]
    chunks = [make_chunk(n, (BF16, BF16, BF16), gen, base, 0.1) for n, base in sizes]
    twins = [clone_chunk(c) for c in chunks]
    threads = torch.get_num_threads()
    try:
        scalars = step_scalars(LR, 4, B1, B2, "cpu")
        torch.set_num_threads(1)
        _library(chunks, scalars, 4, "stochastic")
        torch.set_num_threads(3)
        _library(twins, scalars, 4, "stochastic")
    finally:
        torch.set_num_threads(threads)
    for c, t in zip(chunks, twins):
        assert_same_bits(c, t, "threads")


@pytest.mark.parametrize("dtypes", [(BF16, BF16, F32), (BF16, F32, BF16), (F32, F32, F32)])
def test_skip_flag_leaves_every_tensor_unchanged(dtypes):
    gen = torch.Generator().manual_seed(4)
    chunks = [make_chunk(n, dtypes, gen, base, 0.1) for n, base in [(4097, 0), (9, 5000)]]
    before = [clone_chunk(c) for c in chunks]
    _library(chunks, step_scalars(LR, 3, B1, B2, "cpu", skip=torch.tensor(True)), 3, "stochastic")
    for c, b in zip(chunks, before):
        assert_same_bits(c, b, "skipped step")


def test_unsupported_chunks_are_refused_before_anything_is_written():
    c = AdamWChunk(torch.zeros(8, dtype=torch.float16), torch.zeros(8), torch.zeros(8), torch.zeros(8), 0, 0.0)
    assert "unsupported dtypes" in cpu_fast.unusable_reason([c], step_scalars(LR, 1, B1, B2, "cpu"))
    strided = AdamWChunk(torch.zeros(16)[::2], torch.zeros(8), torch.zeros(8), torch.zeros(8), 0, 0.0)
    assert "non-contiguous" in cpu_fast.unusable_reason([strided], step_scalars(LR, 1, B1, B2, "cpu"))
    short = AdamWChunk(torch.ones(8), torch.ones(7), torch.zeros(8), torch.zeros(8), 0, 0.0)
    with pytest.raises(cpu_fast.UnsupportedChunks, match="differ in size"):
        _library([short], step_scalars(LR, 1, B1, B2, "cpu"), 1, "nearest")
    assert torch.equal(short.param, torch.ones(8))


# ---------------------------------------------------------------- the dispatcher and the fall-back

@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """An empty build directory and no library loaded; afterwards, the normal library again."""
    monkeypatch.setattr(dispatch, "_warned", False)
    monkeypatch.setenv("MEGATRON_SR_EXT_DIR", str(tmp_path))
    cpu_fast.reset()
    yield tmp_path
    monkeypatch.undo()
    cpu_fast.reset()


def _dispatch_both(rounding="stochastic"):
    gen = torch.Generator().manual_seed(8)
    chunks = [make_chunk(n, (BF16, BF16, F32), gen, base, 0.1) for n, base in [(1000, 0), (37, 1000), (0, 1037)]]
    want = [clone_chunk(c) for c in chunks]
    paths = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            scalars = step_scalars(LR, step, B1, B2, "cpu")
            paths.append(adamw_step_(chunks, scalars=scalars, step=torch.tensor(step), consts=CONSTS,
                                     rounding=rounding, key=KEY))
            reference_step(want, scalars, step, rounding)
    for c, w in zip(chunks, want):
        assert_same_bits(c, w, "dispatch")
    return paths, [str(w.message) for w in caught if "SR AdamW" in str(w.message)]


def test_dispatch_takes_the_cpu_library_without_a_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", False)
    paths, messages = _dispatch_both()
    assert paths == ["cpu", "cpu"] and messages == []


def test_no_compiler_falls_back_to_the_reference_with_one_warning(fresh_dispatch, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_dispatch / "no-such-compiler"))
    paths, messages = _dispatch_both()
    assert paths == ["reference", "reference"]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "running the PyTorch reference" in messages[0]


def test_a_failed_build_falls_back_with_one_warning(fresh_dispatch, monkeypatch):
    broken = fresh_dispatch / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'broken-cxx: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    paths, messages = _dispatch_both("nearest")
    assert paths == ["reference", "reference"]
    assert len(messages) == 1 and "building the CPU SR AdamW library failed" in messages[0]
    assert "cannot compile" in messages[0]
    assert not list(fresh_dispatch.rglob("*.so"))  # nothing half-built left behind


@pytest.mark.parametrize("env", ["MEGATRON_SR_CPU_FAST", "MEGATRON_SR_FUSED"])
def test_switched_off_by_environment(fresh_dispatch, monkeypatch, env):
    monkeypatch.setenv(env, "0")
    paths, messages = _dispatch_both()
    assert paths == ["reference", "reference"] and len(messages) == 1 and f"{env}=0" in messages[0]


def test_build_from_scratch_is_cached_and_leaves_no_temporary_files(fresh_dispatch):
    lib = cpu_fast.load_library()
    built = list(fresh_dispatch.rglob("*"))
    so = [p for p in built if p.suffix == ".so"]
    assert len(so) == 1 and so[0].name == "libsr_adamw_cpu.so" and all(p.is_dir() or p in so for p in built)
    assert lib.sr_adamw_cpu_abi() == cpu_fast.ABI_VERSION
    mtime = so[0].stat().st_mtime_ns
    cpu_fast.reset()
    cpu_fast.load_library()  # a new process would find it: no rebuild
    assert so[0].stat().st_mtime_ns == mtime
    assert cpu_fast.build_directory(cpu_fast.compiler()) == so[0].parent


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="the AVX2 Philox is x86 only")
def test_portable_build_without_avx2_gives_the_same_bits(fresh_dispatch, monkeypatch):
    """The build without -march=native (baseline x86-64: the scalar Philox loop) is also the reference."""
    monkeypatch.setattr(cpu_fast, "ARCH_FLAGS", ())
    gen = torch.Generator().manual_seed(21)
    chunks = [make_chunk(n, (BF16, BF16, BF16), gen, base, 0.1, pad) for n, (base, pad) in zip((1, 17, 4097, 65539),
                                                                                         OFFSETS[1:])]
    _run_both(chunks, steps=2, rounding="stochastic")


# ---------------------------------------------------------------- the optimizers end to end

@pytest.mark.parametrize("precision,extra", [("bf16-sr", []), ("bf16-sr", ["--optimizer-state-dtype", "bf16",
                                                                          "--grad-dtype", "fp32"]),
                                             ("bf16-mp", []), ("bf16", []), ("fp32", [])])
def test_training_steps_equal_the_reference_path(monkeypatch, precision, extra):
    """A few steps of the tiny GPT through SRAdamW (norm, clipping, the FP32 master of bf16-mp): the CPU
    library and the eager reference (MEGATRON_SR_CPU_FAST=0) leave the same bits in every tensor."""
    from megatron_sr.config import parse_config
    from megatron_sr.training.setup import build

    argv = ["--mock-data", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
            "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64", "--micro-batch-size", "2",
            "--precision", precision, "--train-iters", "3", "--lr", "1e-2", "--clip-grad", "0.05", *extra]

    def run(fast):
        monkeypatch.setenv("MEGATRON_SR_CPU_FAST", "1" if fast else "0")
        trainer = build(parse_config(argv))
        model, opt = trainer.model_chunks[0], trainer.optimizer
        gen = torch.Generator().manual_seed(0)
        paths = set()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                opt.zero_grad()
                tokens = torch.randint(0, 64, (2, 17), generator=gen)
                model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
                paths.add(opt.step().path)
        states = [t for ts in (opt.exp_avg, opt.exp_avg_sq, opt.master or []) for t in ts]
        return paths, [p.detach() for p in model.parameters()] + states

    fast_paths, fast = run(True)
    ref_paths, ref = run(False)
    assert fast_paths == {"cpu"} and ref_paths == {"reference"}
    for a, b in zip(fast, ref):
        assert torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------- BF16 attention on the CPU

def test_cpu_bf16_attention_is_fp32_attention_of_bf16_operands():
    from megatron_sr.model.cpu_bf16 import cpu_bf16_matmul

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with cpu_bf16_matmul(q):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    assert out.dtype == BF16 and torch.equal(out, want.bfloat16())
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    want.backward(grad.float())
    for a, b in ((q, q32), (k, k32), (v, v32)):
        assert a.grad.dtype == BF16 and torch.equal(a.grad, b.grad.bfloat16())


# ---------------------------------------------------------------- the LM head's loss on the CPU

@pytest.mark.parametrize("dtype", [F32, BF16])
def test_single_cpu_chunk_keeps_its_logits_and_matches_the_recompute(monkeypatch, dtype):
    """One chunk on the CPU: backward uses the forward's logits (one LM-head GEMM fewer); a second backward,
    which has to recompute them, gives exactly the same gradients."""
    from megatron_sr.model import lm_loss

    calls = []
    real = lm_loss._logits
    monkeypatch.setattr(lm_loss, "_logits", lambda h, w: calls.append(h.shape) or real(h, w))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 24, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(40, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 24), generator=g)
    loss = lm_loss.lm_head_cross_entropy(hidden, weight, labels, chunk_tokens=4096)
    grad_out = torch.rand(loss.shape, generator=g)
    loss.backward(grad_out, retain_graph=True)
    assert len(calls) == 1  # forward only: the kept logits served the backward
    first = (hidden.grad.clone(), weight.grad.clone())
    loss.backward(grad_out)  # the logits were used up: this one recomputes them
    assert len(calls) == 2
    for got, once in zip((hidden.grad, weight.grad), first):
        assert torch.equal(got, once + once)


# ---------------------------------------------------------------- tools/bench_cpu.py

@pytest.mark.slow
def test_bench_cpu_writes_the_table_and_the_targets(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu"
    proc = subprocess.run([sys.executable, "tools/bench_cpu.py", "--rows", "plain-bf16,pretrain-bf16-sr,step-bf16-sr,"
                           "torch-adamw", "--iters", "2", "--warmup", "1", "--rounds", "1", "--threads", "1",
                           "--output", str(out)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    res = data["results"]
    assert res["pretrain-bf16-sr"]["optimizer_path"] == ["cpu"] and res["pretrain-bf16-sr"]["ms"] > 0
    assert res["step-bf16-sr"]["params"] == res["torch-adamw"]["params"] == 940_800
    assert 0 < res["step-bf16-sr"]["update_ms"] < res["step-bf16-sr"]["ms"]
    assert {(t["row"], t["over"]) for t in data["targets"]} >= {("pretrain-bf16-sr", "plain-bf16"),
                                                                ("update:step-bf16-sr", "torch-adamw")}
    meta = data["meta"]
    assert meta["commit"] and "bench_cpu.py" in meta["command"] and len(meta["load_range"]) == 2
    md = out.with_suffix(".md").read_text()
    assert "| pretrain-bf16-sr |" in md and "torch.optim.AdamW(foreach=True)" in md
