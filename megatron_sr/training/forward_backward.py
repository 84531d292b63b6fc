"""The iteration's forward and backward over its micro-batches, in every layout.

    forward_backward(model_chunks, data_iterator, num_microbatches, forward_only) -> list[loss dict]

It runs the pipeline package's schedule (1F1B when pp > 1, plain gradient accumulation otherwise) with
this module's forward step: every stage draws the micro-batch (the first uses the tokens, the last the
labels and loss mask). Each loss dict is {"lm loss": FP32 0-d tensor (mean over the micro-batch's
tokens), "num_tokens": int}; the losses are averaged over dp and sent from the last stage to every
stage, so each rank logs the global-batch loss. At world size 1 these collectives are skipped.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..parallel import parallel_state as ps
from ..parallel.quantized_linear import set_quant_position
from ..pipeline import get_forward_backward_func

# (model_chunks, data_iterator, num_microbatches, forward_only, *, step, batch_in_step) -> the micro-batches' losses
ForwardBackward = Callable[..., list[dict]]


def get_batch(data_iterator, device: torch.device) -> dict[str, torch.Tensor]:
    """tokens [b, s+1] from the loader into inputs, labels (shifted by one) and the loss mask."""
    tokens = next(data_iterator)["tokens"].to(device, non_blocking=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return {"tokens": inputs, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float32)}


def loss_func(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach(), "num_tokens": int(loss_mask.numel())}


def mean_loss(losses: list[dict], key: str = "lm loss") -> torch.Tensor:
    """Mean loss over the micro-batches of an iteration (already averaged over dp), left on the device."""
    if not losses:
        return torch.tensor(float("nan"))
    return torch.stack([d[key].float() for d in losses]).mean()


def average_losses(losses: list[dict], key: str = "lm loss") -> float:
    """mean_loss as a Python float (a host synchronisation)."""
    return float(mean_loss(losses, key))


def activation_shape(cfg: Config) -> tuple[int, int, int]:
    """What pipeline stages send each other: [micro batch, seq (/ tp under sequence parallelism), hidden]."""
    seq = cfg.model.seq_length
    if ps.get_sequence_parallel():
        seq //= ps.get_tensor_model_parallel_world_size()
    return (cfg.training.micro_batch_size, seq, cfg.model.hidden_size)


def _reduce_losses(stats: list[dict], num_microbatches: int, tokens: int, device) -> list[dict]:
    """Per-micro-batch losses averaged over dp, from the last stage to all stages (for logging)."""
    losses = torch.zeros(num_microbatches, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage() and stats:
        losses.copy_(torch.stack([s["lm loss"].float() for s in stats]))
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(losses, group=ps.get_data_parallel_group())
        losses /= ps.get_data_parallel_world_size()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(losses, src=ps.get_pipeline_model_parallel_global_ranks()[-1],
                       group=ps.get_pipeline_model_parallel_group())
    return [{"lm loss": loss, "num_tokens": tokens} for loss in losses]


def make_forward_backward(cfg: Config, model: nn.Module, device: torch.device,
                          no_sync: Callable[[], ContextManager] | None = None) -> ForwardBackward:
    """The iteration's forward_backward for this rank's stage `model`; `no_sync` defers DDP's gradient
    collectives to the last micro-batch."""
    schedule = get_forward_backward_func()
    dtype = next(model.parameters()).dtype
    positions = torch.arange(cfg.model.seq_length, device=device)
    tokens_per_microbatch = cfg.training.micro_batch_size * cfg.model.seq_length  # per dp rank

    micro, dp, dp_rank = cfg.training.micro_batch_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def forward_backward(model_chunks, data_iterator, num_microbatches: int, forward_only: bool, *, step: int = 0,
                         batch_in_step: int = 0) -> list[dict]:
        """step: the iteration, for the quantization points' random stream; batch_in_step: which global batch of
        the step this is (evaluation runs --eval-iters of them at one iteration)."""
        stats: list[dict] = []
        sample_base = batch_in_step * num_microbatches * micro * dp
        drawn = [0]  # micro-batches drawn so far: each stage draws them in order

        def forward_step(it, stage):
            # this micro-batch's first sample in the global batch: micro-batch j of dp rank r holds samples
            # (j * dp + r) * micro .. (the sampler's order), whatever the layout
            set_quant_position(step, sample_base + (drawn[0] * dp + dp_rank) * micro, training=not forward_only)
            drawn[0] += 1
            batch = get_batch(it, device)
            position_ids = positions.expand(batch["tokens"].shape[0], -1)
            tokens = batch["tokens"] if stage.pre_process else None
            labels = batch["labels"] if stage.post_process else None
            out = stage(tokens, position_ids=position_ids, labels=labels)
            if not stage.post_process:
                return out
            loss, stat = loss_func(out, batch["loss_mask"])
            stats.append(stat)
            return loss

        schedule(forward_step=forward_step, data_iterator=data_iterator, model=model,
                 num_microbatches=num_microbatches, tensor_shape=activation_shape(cfg), dtype=dtype, device=device,
                 forward_only=forward_only, no_sync=None if forward_only else no_sync)
        return _reduce_losses(stats, num_microbatches, tokens_per_microbatch, device)

    return forward_backward
