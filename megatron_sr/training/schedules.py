"""forward_backward_func implementations: gradient accumulation without pipelining (the default).

Signature shared with the pipeline schedules:
    forward_backward_func(model_chunks, data_iterator, num_microbatches, forward_only) -> list[loss dict]
Each loss dict holds {"lm loss": FP32 0-d tensor (mean over the micro-batch's tokens), "num_tokens": int}.
"""

from __future__ import annotations

import torch
from torch import nn


def get_batch(data_iterator, device: torch.device) -> dict[str, torch.Tensor]:
    """tokens [b, s+1] from the loader into inputs, labels (shifted by one) and the loss mask."""
    tokens = next(data_iterator)["tokens"].to(device, non_blocking=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return {"tokens": inputs, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float32)}


def loss_func(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach(), "num_tokens": int(loss_mask.numel())}


def forward_backward_no_pipelining(model_chunks: list[nn.Module], data_iterator, num_microbatches: int,
                                   forward_only: bool) -> list[dict]:
    model = model_chunks[0]
    device = next(model.parameters()).device
    losses = []
    for _ in range(num_microbatches):
        batch = get_batch(data_iterator, device)
        with torch.set_grad_enabled(not forward_only):
            out = model(batch["tokens"], labels=batch["labels"])
            loss, stats = loss_func(out, batch["loss_mask"])
        if not forward_only:
            # Each micro-batch carries 1/num_microbatches of the global-batch mean.
            (loss / num_microbatches).backward()
        losses.append(stats)
    return losses


def average_losses(losses: list[dict], key: str = "lm loss") -> float:
    """Mean loss over micro-batches; the data-parallel all-reduce for logging plugs in here."""
    if not losses:
        return float("nan")
    return float(torch.stack([d[key].float() for d in losses]).mean())
