"""Forward and backward over the micro-batches of one iteration: plain, or pipelined with 1F1B.

Both entry points take the same arguments, so the training step picks one with
`get_forward_backward_func()` and never looks at the pipeline size itself:

    losses = forward_backward(forward_step=fs, data_iterator=it, model=stage_model,
                              num_microbatches=M, tensor_shape=(mbs, seq, hidden), dtype=torch.bfloat16)

- `forward_step(data_iterator, model) -> tensor` runs this stage's model on the next micro-batch
  (every stage draws a micro-batch; the first uses the tokens, the last the labels). On the last
  stage it returns the micro-batch's scalar loss, elsewhere the hidden states to send on.
- Non-first stages receive their input with `model.set_input_tensor(t)` before `forward_step`.
- Backward runs on `loss / num_microbatches` (the iteration's loss is the mean over micro-batches).
- `no_sync` (e.g. DDP's `no_sync`) wraps every backward but the last, so data-parallel gradient
  collectives start only in the last micro-batch's backward, overlapping it.
- Returns the detached per-micro-batch losses on the last stage, [] on the others.

1F1B (PipeDream-flush, Megatron's non-interleaved schedule): stage r first runs pp - r - 1 warm-up
forwards, then alternates one forward and one backward, then drains the remaining backwards. At
most pp - r micro-batches' activations are alive on stage r, instead of all M with GPipe.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from ..parallel import parallel_state as ps
from . import p2p

ForwardStep = Callable[[Iterator[Any], nn.Module], torch.Tensor]


def _set_input(model: nn.Module, tensor: torch.Tensor | None) -> None:
    if tensor is not None or not ps.is_pipeline_first_stage():
        target = model.module if hasattr(model, "module") and not hasattr(model, "set_input_tensor") else model
        target.set_input_tensor(tensor)


def _forward(forward_step: ForwardStep, data_iterator, model, input_tensor, num_microbatches: int,
             losses: list[torch.Tensor], events: list | None, index: int) -> torch.Tensor:
    if not ps.is_pipeline_first_stage():
        _set_input(model, input_tensor)
    output = forward_step(data_iterator, model)
    if events is not None:
        events.append(("F", index))
    if ps.is_pipeline_last_stage():
        losses.append(output.detach())
        output = output / num_microbatches
    return output


def _backward(input_tensor, output, output_grad, sync: ContextManager, events: list | None,
              index: int) -> torch.Tensor | None:
    with sync:
        if output_grad is None:
            output.backward()
        else:
            torch.autograd.backward(output, grad_tensors=output_grad)
    if events is not None:
        events.append(("B", index))
    return input_tensor.grad if input_tensor is not None else None


def _sync_context(no_sync: Callable[[], ContextManager] | None, index: int, num_microbatches: int):
    if no_sync is None or index == num_microbatches - 1:
        return contextlib.nullcontext()
    return no_sync()


def forward_backward_no_pipelining(*, forward_step: ForwardStep, data_iterator, model: nn.Module,
                                   num_microbatches: int, tensor_shape=None, dtype=None, device=None,
                                   forward_only: bool = False, no_sync=None, events: list | None = None
                                   ) -> list[torch.Tensor]:
    """Gradient accumulation over micro-batches on one stage (pp = 1)."""
    losses: list[torch.Tensor] = []
    for i in range(num_microbatches):
        with torch.set_grad_enabled(not forward_only):
            output = _forward(forward_step, data_iterator, model, None, num_microbatches, losses, events, i)
        if not forward_only:
            _backward(None, output, None, _sync_context(no_sync, i, num_microbatches), events, i)
    return losses


def forward_backward_pipelining(*, forward_step: ForwardStep, data_iterator, model: nn.Module,
                                num_microbatches: int, tensor_shape, dtype: torch.dtype,
                                device: torch.device | str | None = None, forward_only: bool = False,
                                no_sync=None, events: list | None = None) -> list[torch.Tensor]:
    """The 1F1B schedule over pp stages (see the module docstring)."""
    if device is None:
        device = next(model.parameters()).device
    spec = p2p.P2PSpec(tuple(tensor_shape), dtype, torch.device(device))
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    num_warmup = min(pp - rank - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    losses: list[torch.Tensor] = []
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []
    fwd_index = bwd_index = 0

    def forward(input_tensor):
        nonlocal fwd_index
        with torch.set_grad_enabled(not forward_only):
            out = _forward(forward_step, data_iterator, model, input_tensor, num_microbatches, losses, events,
                           fwd_index)
        if not ps.is_pipeline_last_stage() and (tuple(out.shape) != spec.tensor_shape or out.dtype != spec.dtype):
            # The receiver allocates from the spec: a mismatch would corrupt or hang the transfer.
            raise ValueError(f"pipeline stage {rank} produced {tuple(out.shape)} {out.dtype}, but stages exchange "
                             f"{spec.tensor_shape} {spec.dtype} (tensor_shape/dtype of the schedule)")
        fwd_index += 1
        return out

    def backward(output_grad):
        nonlocal bwd_index
        input_tensor, output = inputs.pop(0), outputs.pop(0)
        grad = _backward(input_tensor, output, output_grad, _sync_context(no_sync, bwd_index, num_microbatches),
                         events, bwd_index)
        bwd_index += 1
        return grad

    for _ in range(num_warmup):
        input_tensor = p2p.recv_forward(spec)
        output = forward(input_tensor)
        p2p.send_forward(output)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)

    input_tensor = p2p.recv_forward(spec) if num_steady > 0 else None
    for i in range(num_steady):
        last = i == num_steady - 1
        output = forward(input_tensor)
        if forward_only:
            p2p.send_forward(output)
            input_tensor = None if last else p2p.recv_forward(spec)
            continue
        output_grad = p2p.send_forward_recv_backward(output, spec)
        inputs.append(input_tensor)
        outputs.append(output)
        input_grad = backward(output_grad)
        if last:
            input_tensor = None
            p2p.send_backward(input_grad)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, spec)

    if not forward_only:
        for _ in range(num_warmup):
            output_grad = p2p.recv_backward(spec)
            p2p.send_backward(backward(output_grad))
    return losses


def get_forward_backward_func() -> Callable[..., list[torch.Tensor]]:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        return forward_backward_pipelining
    return forward_backward_no_pipelining
