"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

No rank ever holds a full row of logits. Per token, three all-reduces over tp combine the pieces:
the max (for a stable softmax), the target's logit (only the rank owning the target's vocabulary
range contributes a non-zero), and the sum of exponentials. loss = log(sum exp(l - max)) - (l_t - max).
The backward needs no communication: d loss / d l = softmax(l) - onehot(t) on the local slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import parallel_state as ps


class VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        group = ps.get_tensor_model_parallel_group()
        local = logits.float()
        logits_max = local.amax(dim=-1)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = local - logits_max.unsqueeze(-1)

        per_rank = local.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * per_rank
        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None
