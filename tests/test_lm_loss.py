"""The chunked LM head + cross entropy (model/lm_loss.py) against the plain logits path.

Reference: `vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight), labels)`, the path GPTModel
takes. Tolerances (norm-wise: max |got - ref| <= tol x max |ref|, per tensor):
- loss: bit for bit with one chunk (the same GEMM, the same softmax arithmetic; asserted). With several
  chunks the chunk GEMMs may sum in another order (FP32 chunks of 1 or 7 rows do here): FP32 1e-6
  relative (a few ulps of a logit); BF16 2^-7, room for one BF16 ulp (2^-8) of a logit, since the loss
  moves by at most 2 max|d logit| (measured: bit-equal in BF16 at every chunk size on this CPU).
- gradients, FP32 params: 1e-6 (reassociated FP32 sums: the weight gradient is one GEMM over all tokens
  there and a sum of chunk GEMMs here; the tp == 1 softmax uses torch.exp, log_softmax-backward its own).
- gradients, BF16 params: 2^-8, one BF16 rounding. Both paths form the same FP32 sums of exact BF16
  products up to reassociation, then round to BF16 once; where the FP32 values straddle a rounding
  boundary the results differ by one BF16 ulp (<= 2^-8 of the element, so of the largest element).
"""

import contextlib

import pytest
import torch
from multiproc import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_sr.model.cpu_bf16 import cpu_bf16_matmul
from megatron_sr.model.lm_loss import lm_head_cross_entropy
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.layers import parallel_lm_logits, vocab_parallel_cross_entropy

B, S, H, V = 2, 24, 32, 96  # 48 tokens; tokens x vocab = 4608 elements, bigger than any other tensor here
TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}
LOSS_TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7}
CHUNKS = (1, 7, 16, 48, 1000, 0)  # 16 divides the 48 tokens; 1000 and 0 mean one chunk


def _data(dtype, seed=0, vocab=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=gen).to(dtype)
    weight = (torch.randn(vocab, H, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (B, S), generator=gen)
    grad_out = torch.rand(B, S, generator=gen)
    return hidden, weight, labels, grad_out


def _plain(hidden, weight, labels):
    return vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight), labels)


def _run(fn, hidden, weight, labels, grad_out, bf16_mode=False):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with cpu_bf16_matmul(h) if bf16_mode else contextlib.nullcontext():
        loss = fn(h, w, labels)
    loss.backward(grad_out)
    return loss.detach(), h.grad, w.grad


def _chunked(chunk):
    return lambda h, w, labels: lm_head_cross_entropy(h, w, labels, chunk)


def _assert_close(got, ref, tol, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol * ref.float().abs().max().item(), f"{what}: max error {err:.3g}"


def _compare(got, ref, dtype, what, exact_loss):
    loss, gh, gw = got
    assert loss.dtype == torch.float32
    if exact_loss:
        assert torch.equal(loss, ref[0]), f"{what}: loss not bit-equal"
    _assert_close(loss, ref[0], LOSS_TOL[dtype], f"{what} loss")
    _assert_close(gh, ref[1], TOL[dtype], f"{what} grad hidden")
    _assert_close(gw, ref[2], TOL[dtype], f"{what} grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_plain_tp1(dtype, masked):
    hidden, weight, labels, grad_out = _data(dtype)
    if masked:  # loss_mask'd tokens: their grad_out is 0, and they must contribute nothing
        grad_out[0, :5] = 0.0
        grad_out[1, -3:] = 0.0
    ref = _run(_plain, hidden, weight, labels, grad_out)
    for chunk in CHUNKS:
        got = _run(_chunked(chunk), hidden, weight, labels, grad_out)
        _compare(got, ref, dtype, f"{dtype} chunk {chunk}", exact_loss=chunk <= 0 or chunk >= B * S)
    # The per-token loss is F.cross_entropy's.
    logits = torch.nn.functional.linear(hidden.float(), weight.float()) if dtype == torch.float32 else None
    if logits is not None:
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none")
        assert torch.equal(_chunked(0)(hidden, weight, labels).reshape(-1), ce)


def test_cpu_bf16_mode_both_ways():
    """Under cpu_bf16_matmul (as GPTModel calls it) the logits are FP32 GEMMs rounded to BF16, and so are
    the chunked path's, inside the mode or not; the backward GEMMs (outside the mode) are FP32 too."""
    hidden, weight, labels, grad_out = _data(torch.bfloat16, seed=1)
    grad_out[1, 2:9] = 0.0
    ref_mode = _run(_plain, hidden, weight, labels, grad_out, bf16_mode=True)
    ref_native = _run(_plain, hidden, weight, labels, grad_out, bf16_mode=False)
    for chunk in (5, 0):
        for mode in (True, False):
            got = _run(_chunked(chunk), hidden, weight, labels, grad_out, bf16_mode=mode)
            _compare(got, ref_mode, torch.bfloat16, f"mode={mode} chunk {chunk}", exact_loss=chunk == 0)
            _compare(got, ref_native, torch.bfloat16, f"native mode={mode} chunk {chunk}", exact_loss=False)


def test_only_the_needed_gradients():
    hidden, weight, labels, grad_out = _data(torch.float32)
    h = hidden.clone().requires_grad_()
    lm_head_cross_entropy(h, weight, labels, 7).backward(grad_out)
    ref = _run(_plain, hidden, weight, labels, grad_out)
    _assert_close(h.grad, ref[1], TOL[torch.float32], "hidden only")
    w = weight.clone().requires_grad_()
    lm_head_cross_entropy(hidden, w, labels, 7).backward(grad_out)
    _assert_close(w.grad, ref[2], TOL[torch.float32], "weight only")
    with pytest.raises(ValueError):
        lm_head_cross_entropy(hidden, weight, labels[:, :-1], 7)


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any op creates while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _memory(fn, dtype):
    hidden, weight, labels, grad_out = _data(dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _LargestTensor() as created:
            loss = fn(h, w, labels)
            forward_largest = created.largest
            loss.backward(grad_out)
    return max(saved), forward_largest, created.largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens_by_vocab_tensor(dtype):
    full = B * S * V
    saved, fwd, total = _memory(_plain, dtype)
    assert saved >= full and fwd >= full and total >= full  # the check can fail: the plain path does it
    chunk = 7
    saved, fwd, total = _memory(_chunked(chunk), dtype)
    assert saved <= max(B * S * H, V * H), "saved a tensor larger than the inputs"
    assert fwd <= max(chunk * V, B * S * H, V * H) < full, f"forward created {fwd} elements"
    assert total <= max(chunk * V, B * S * H, V * H) < full, f"backward created {total} elements"


# ---- tp = 2 (gloo), with and without sequence parallelism --------------------------------------------------

VP = 2 * V  # 192 ids; each tp rank holds 96 rows of the output weight


def _tp_body() -> dict:
    ps.initialize_model_parallel(2, 1)
    rank = ps.get_tensor_model_parallel_rank()
    out = {}
    for sp in (False, True):
        ps.set_sequence_parallel(sp)
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, labels, grad_out = _data(dtype, seed=3, vocab=VP)
            weight = weight.chunk(2, dim=0)[rank].contiguous()
            if sp:  # this rank's sequence shard; labels and grad_out cover the whole sequence
                hidden = hidden.chunk(2, dim=ps.get_sequence_dim())[rank].contiguous()
            grad_out[0, :4] = 0.0
            ref = _run(_plain, hidden, weight, labels, grad_out, bf16_mode=dtype == torch.bfloat16)
            for chunk in (5, 0):
                got = _run(_chunked(chunk), hidden, weight, labels, grad_out, bf16_mode=dtype == torch.bfloat16)
                out[(sp, str(dtype), chunk)] = (got, ref)
    ps.set_sequence_parallel(False)
    return out


@pytest.mark.slow
def test_chunked_equals_plain_tp2_and_sequence_parallel():
    hidden, weight, labels, grad_out = _data(torch.float32, seed=3, vocab=VP)
    one_process = _run(_plain, hidden, weight, labels, grad_out)[0]
    for rank, res in enumerate(run_ranks(2, _tp_body)):
        assert len(res) == 8
        for (sp, dtype, chunk), (got, ref) in res.items():
            what = f"rank {rank} sp={sp} {dtype} chunk {chunk}"
            dt = torch.float32 if dtype == str(torch.float32) else torch.bfloat16
            _compare(got, ref, dt, what, exact_loss=chunk == 0)
            assert got[1].shape == (B, S // 2 if sp else S, H) and got[2].shape == (V, H), what
            if dt == torch.float32:
                _assert_close(got[0], one_process, 1e-6, f"{what} vs one process")
