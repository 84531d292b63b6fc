"""Point-to-point transfer of activations and their gradients between neighbouring pipeline stages.

Every call posts all of its sends and receives at once (isend/irecv) and then waits for them, so two
neighbours that both send and receive in the same step (1F1B's steady state) never deadlock, with
NCCL and with gloo alike. Activations have a fixed shape and dtype per run (the micro-batch's
[batch, seq, hidden] in the compute dtype), so the receiver allocates without a shape exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel import parallel_state as ps


@dataclass(frozen=True)
class P2PSpec:
    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _exchange(send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
              recv_next: bool = False, recv_prev: bool = False,
              spec: P2PSpec | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Post the requested sends/recvs together; returns (from_prev, from_next)."""
    ops, keep = [], []  # keep: the tensors being sent stay alive until the waits return
    from_prev = from_next = None
    if recv_prev:
        from_prev = torch.empty(spec.tensor_shape, dtype=spec.dtype, device=spec.device, requires_grad=True)
    if recv_next:
        from_next = torch.empty(spec.tensor_shape, dtype=spec.dtype, device=spec.device)
    prev_rank, next_rank = ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank()
    # Post sends before receives on every rank (the order is identical on both ends of each link).
    if send_prev is not None:
        keep.append(send_prev.detach().contiguous())
        ops.append(dist.isend(keep[-1], prev_rank))
    if send_next is not None:
        keep.append(send_next.detach().contiguous())
        ops.append(dist.isend(keep[-1], next_rank))
    if from_prev is not None:
        ops.append(dist.irecv(from_prev.data, prev_rank))
    if from_next is not None:
        ops.append(dist.irecv(from_next, next_rank))
    for op in ops:
        op.wait()
    return from_prev, from_next


def recv_forward(spec: P2PSpec) -> torch.Tensor | None:
    if ps.is_pipeline_first_stage():
        return None
    return _exchange(recv_prev=True, spec=spec)[0]


def send_forward(output: torch.Tensor) -> None:
    if not ps.is_pipeline_last_stage():
        _exchange(send_next=output)


def recv_backward(spec: P2PSpec) -> torch.Tensor | None:
    if ps.is_pipeline_last_stage():
        return None
    return _exchange(recv_next=True, spec=spec)[1]


def send_backward(input_grad: torch.Tensor | None) -> None:
    if not ps.is_pipeline_first_stage():
        _exchange(send_prev=input_grad)


def send_forward_recv_backward(output: torch.Tensor, spec: P2PSpec) -> torch.Tensor | None:
    if ps.is_pipeline_last_stage():
        return None
    return _exchange(send_next=output, recv_next=True, spec=spec)[1]


def send_backward_recv_forward(input_grad: torch.Tensor | None, spec: P2PSpec) -> torch.Tensor | None:
    if ps.is_pipeline_first_stage():
        return None
    return _exchange(send_prev=input_grad, recv_prev=True, spec=spec)[0]
