"""The LM head and its cross entropy, chunked over tokens so the [tokens, vocab] logits never exist.

`lm_head_cross_entropy(hidden, weight, labels, chunk_tokens)` returns the FP32 per-token loss [b, s] that
`vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight), labels)` returns, and the same gradients
for `hidden` and `weight`. Why: the plain path holds the logits in the param dtype, an FP32 copy, the
FP32 (log-)softmax saved for backward and the FP32 gradient in backward; each FP32 one is 4 x tokens x
vocab/tp bytes - at micro-batch 8, sequence 1024, vocab 50304: 8 x 1024 x 50304 x 4 B = 1.6 GiB. Here at most
`chunk_tokens` rows of logits exist at a time (peak extra memory O(chunk_tokens x vocab/tp) plus one FP32
[vocab/tp, h] gradient accumulator); what is kept for backward is hidden, weight, labels and two FP32
numbers per token. The price is one extra LM-head GEMM: backward recomputes each chunk's logits. On the
CPU, where that GEMM is ~3% of a small model's iteration and memory is rarely short, an input that is a
single chunk keeps its FP32 logits for backward instead (at most chunk_tokens x vocab/tp x 4 bytes, the
bound --loss-chunk-tokens sets; tp == 1), which gives the same bits as recomputing them.

Parallelism is the plain path's: `hidden` first goes through the same mapping as `parallel_lm_logits`
(all-gather along the sequence under --sequence-parallel, else copy-to-tp-region), whose backward does
the tp reduction of the hidden gradient. The chunked core all-reduces, per chunk, the max over tp (as
VocabParallelCrossEntropy), and once at the end the target logits and the sums of exponentials; its
backward communicates nothing.

Numerics (what tests/test_lm_loss.py checks):
- Logits are computed like the plain path: F.linear in the param dtype; for BF16 on the CPU as
  cpu_bf16's FP32 GEMM of the BF16 operands rounded to BF16 (so the result equals the plain path run
  under `cpu_bf16_matmul`, whether or not this is called inside that mode); on CUDA a BF16 GEMM.
- Loss: tp == 1 takes F.log_softmax of each chunk (the kernel F.cross_entropy uses), tp > 1 repeats
  VocabParallelCrossEntropy's arithmetic (the max all-reduced per chunk, the target logits and sums of
  exponentials in one all-reduce at the end). With one chunk it is the plain loss bit for bit; with
  several, the chunk GEMMs may sum in another order (FP32 chunks of a few rows do on the CPU): within
  1e-6 relative in FP32, within one BF16 ulp of a logit in BF16 (observed bit-equal there); tp > 2 may
  differ in the last bit from the all-reduce order.
- Gradients: d loss / d logits = (softmax - onehot) * grad_out in FP32, cast to the logits dtype as the
  plain path does (tp > 1: the same formula as VocabParallelCrossEntropy; tp == 1: torch.exp instead of
  log_softmax-backward's own exp, a few FP32 ulps). The weight gradient sums chunk GEMMs in FP32 and is
  cast to the weight dtype once, where the plain path does one GEMM over all tokens: FP32 agrees to
  ~1e-6 relative, BF16 to one BF16 rounding (2^-8 relative of the element, plus FP32 reassociation).
  On CUDA each chunk's weight gradient is a BF16 GEMM summed in FP32 (one extra BF16 rounding per chunk).

Labels must be valid global ids in [0, vocab) (no ignore_index: mask through grad_out / loss_mask).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..parallel import parallel_state as ps
from ..parallel.mappings import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region


def _fp32_gemm(t: torch.Tensor) -> bool:
    """BF16 on the CPU: GEMMs run in FP32 on the BF16 operands (cpu_bf16's arithmetic)."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[c, vocab/tp] local logits in the param dtype, exactly as the plain path's F.linear."""
    if _fp32_gemm(h):
        return F.linear(h.float(), w.float()).to(h.dtype)
    return F.linear(h, w)


def _grad_hidden(grad_logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if _fp32_gemm(grad_logits):
        return grad_logits.float().mm(w.float()).to(grad_logits.dtype)
    return grad_logits.mm(w)


def _grad_weight_into(acc: torch.Tensor | None, grad_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """acc (FP32 [vocab/tp, h]) += grad_logits^T h."""
    if grad_logits.dtype == torch.float32 or _fp32_gemm(grad_logits):
        g, x = grad_logits.t().float(), h.float()
        return g.mm(x) if acc is None else acc.addmm_(g, x)
    part = grad_logits.t().mm(h).float()  # CUDA (or another device): a BF16/FP16 GEMM, summed in FP32
    return part if acc is None else acc.add_(part)


def _chunks(n: int, chunk_tokens: int):
    step = n if chunk_tokens <= 0 or chunk_tokens >= n else chunk_tokens
    for start in range(0, n, max(step, 1)):
        yield start, min(start + step, n)


class _ChunkedLMHeadCrossEntropy(torch.autograd.Function):
    """hidden [n, h] (already gathered / copied into the tp region), weight [vocab/tp, h], labels [n] -> loss [n]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        tp = ps.get_tensor_model_parallel_world_size()
        n = hidden.shape[0]
        per_rank = weight.shape[0]
        start_vocab = ps.get_tensor_model_parallel_rank() * per_rank
        logits_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # tp == 1: log(sum exp(l - max)); tp > 1: [target logit - max, sum exp(l - max)], summed over tp at the end.
        norm = torch.empty(n if tp == 1 else (2, n), dtype=torch.float32, device=hidden.device)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        ctx.kept_logits = None  # (param-dtype logits as FP32) of a single CPU chunk, instead of the recompute
        for a, b in _chunks(n, chunk_tokens):
            logits = _logits(hidden[a:b], weight)
            local = logits.float()
            target = labels[a:b]
            if tp == 1 and hidden.device.type == "cpu" and b - a == n:
                ctx.kept_logits = (local, logits.dtype)
            if tp == 1:
                # F.cross_entropy is log_softmax + nll: the same kernel on the same rows gives the same bits.
                log_probs = F.log_softmax(local, dim=-1)
                loss[a:b] = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1).neg()
                logits_max[a:b] = local.amax(dim=-1)
                # log_softmax = (l - max) - log_sum; at the argmax l - max = 0, so its max is -log_sum exactly.
                norm[a:b] = log_probs.amax(dim=-1).neg()
                continue
            chunk_max = local.amax(dim=-1)
            dist.all_reduce(chunk_max, op=dist.ReduceOp.MAX, group=group)
            logits_max[a:b] = chunk_max
            shifted = local.sub_(chunk_max.unsqueeze(-1))
            outside = (target < start_vocab) | (target >= start_vocab + per_rank)
            local_target = (target - start_vocab).masked_fill(outside, 0)
            norm[0, a:b] = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
            norm[1, a:b] = shifted.exp_().sum(dim=-1)
        if tp > 1:
            dist.all_reduce(norm, group=group)  # target logits (one rank non-zero) and sums of exponentials
            torch.sub(norm[1].log(), norm[0], out=loss)
            norm = norm[1].contiguous()
        ctx.save_for_backward(hidden, weight, labels, logits_max, norm)
        ctx.chunk_tokens, ctx.tp, ctx.start_vocab = chunk_tokens, tp, start_vocab
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, labels, logits_max, norm = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc = None
        per_rank = weight.shape[0]
        grad_loss = grad_loss.float()
        for a, b in _chunks(hidden.shape[0], ctx.chunk_tokens):
            h = hidden[a:b]
            kept, ctx.kept_logits = ctx.kept_logits, None  # used once: backward overwrites it in place
            if kept is not None:
                local, dtype = kept
            else:
                logits = _logits(h, weight)  # the recompute: one extra LM-head GEMM
                local, dtype = (logits.float() if logits.dtype != torch.float32 else logits), logits.dtype
                del logits
            target, g = labels[a:b], grad_loss[a:b].unsqueeze(-1)
            local.sub_(logits_max[a:b].unsqueeze(-1))
            if ctx.tp == 1:
                # log_softmax's backward: g * softmax, minus g at the target (nll's -g).
                grad = local.sub_(norm[a:b].unsqueeze(-1)).exp_().mul_(g)
                grad.scatter_add_(-1, target.unsqueeze(-1), g.neg())
            else:
                # VocabParallelCrossEntropy's backward: (softmax - onehot) * g on the local slice.
                outside = (target < ctx.start_vocab) | (target >= ctx.start_vocab + per_rank)
                local_target = (target - ctx.start_vocab).masked_fill(outside, 0)
                grad = local.exp_().div_(norm[a:b].unsqueeze(-1))
                grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
                grad.mul_(g)
            grad = grad.to(dtype)
            del local
            if need_hidden:
                grad_hidden[a:b] = _grad_hidden(grad, weight)
            if need_weight:
                acc = _grad_weight_into(acc, grad, h)
        grad_weight = None
        if need_weight:
            grad_weight = acc.to(weight.dtype) if acc is not None else torch.zeros_like(weight)
        return grad_hidden, grad_weight, None, None


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Per-token FP32 loss [b, s] of the (tied) vocab-parallel LM head, `chunk_tokens` tokens at a time.

    hidden: the final-layernorm output [b, s, h] (this rank's sequence shard under --sequence-parallel);
    weight: the vocab-parallel output weight [vocab/tp, h]; labels: [b, s_full] global token ids.
    Equals `vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight), labels)` (see the module
    docstring for the tolerance) without the [tokens, vocab/tp] logits; `chunk_tokens <= 0` means one chunk.
    Backward recomputes the logits chunk by chunk (one extra GEMM of the LM head's size).
    """
    if ps.get_sequence_parallel():
        hidden = gather_from_sequence_parallel_region(hidden, ps.get_sequence_dim())
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"lm_head_cross_entropy: hidden {tuple(hidden.shape)} (after the sequence gather) "
                         f"does not match labels {tuple(labels.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss = _ChunkedLMHeadCrossEntropy.apply(flat, weight, labels.reshape(-1), int(chunk_tokens))
    return loss.view(labels.shape)
