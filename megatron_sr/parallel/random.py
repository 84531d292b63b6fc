"""A tracked RNG so dropout is independent across tensor-parallel ranks where it must be, identical elsewhere.

Two random streams per process:
- the default torch generator, seeded with the same value on every tp rank: dropout on activations
  that every tp rank holds in full (the residual stream without sequence parallelism) draws the same
  mask on every tp rank, as it must, since the ranks hold replicas of the same tensor;
- the tracked "model-parallel" stream, seeded with seed + 2718 + tp_rank: dropout on a tp rank's own
  slice (attention heads, or the sequence shard under --sequence-parallel) runs inside
  `with get_rng_tracker().fork():` so each rank draws its own mask, as one process would for the
  whole tensor.

Like Megatron, pipeline stages get different seeds (seed + 100 * pp_rank), so the same layer code on
two stages does not draw correlated masks. The tracker swaps the device generator's state in and out
(dropout has no generator argument), on CUDA when the model runs there, otherwise on the CPU.

Activation recomputation must replay the same masks: torch's checkpoint restores the default
generator, and `checkpoint` here also restores the tracked states for the recomputation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint

from . import parallel_state as ps

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int, device_type: str) -> torch.Tensor:
    saved = _get_state(device_type)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    state = _get_state(device_type)
    _set_state(saved, device_type)
    return state


class RNGStatesTracker:
    """Named generator states that `fork(name)` swaps in for the duration of a block."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: dict[str, int] = {}
        self.device_type = "cpu"

    def reset(self) -> None:
        self.states.clear()
        self.seeds.clear()

    def add(self, name: str, seed: int, device_type: str | None = None) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self.seeds.values():
            raise ValueError(f"seed {seed} is already used by another tracked RNG state")
        self.device_type = device_type or self.device_type
        self.seeds[name] = seed
        self.states[name] = _seeded_state(seed, self.device_type)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} is not tracked: call model_parallel_seed(seed) first")
        saved = _get_state(self.device_type)
        _set_state(self.states[name], self.device_type)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(saved, self.device_type)

    def get_states(self) -> dict[str, torch.Tensor]:
        """For checkpoints: the tracked states (copies)."""
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, device_type: str | None = None) -> None:
    """Seed the default generator (same on all tp ranks) and the tracked tp stream (different per tp rank)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)  # seeds the CPU generator and every CUDA device
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, stage_seed + _TP_SEED_OFFSET + ps.get_tensor_model_parallel_rank(),
                 device_type)


@contextlib.contextmanager
def _tracker_states(states: dict[str, torch.Tensor]) -> Iterator[None]:
    current = _TRACKER.get_states()
    _TRACKER.set_states(states)
    try:
        yield
    finally:
        _TRACKER.set_states(current)


def checkpoint(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """torch.utils.checkpoint (non-reentrant) that also replays the tracked RNG states when recomputing."""
    saved = _TRACKER.get_states()

    def context_fn():
        return contextlib.nullcontext(), _tracker_states(saved)

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
