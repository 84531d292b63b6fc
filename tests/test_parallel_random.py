"""The tracked RNG: forks leave the default stream alone, and recomputation replays the tracked masks."""

import torch
import torch.nn.functional as F

from megatron_sr.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed


def _block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = F.dropout(x @ w, 0.5)  # default stream
    with get_rng_tracker().fork():
        h = F.dropout(torch.tanh(h), 0.5)  # tracked stream
    return h


def _grads(recompute: bool):
    model_parallel_seed(7)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for _ in range(2):  # twice: the tracked state must advance identically in both variants
        out = checkpoint(_block, x, w) if recompute else _block(x, w)
        out.square().sum().backward()
    return w.grad.clone(), get_rng_tracker().get_states(), torch.get_rng_state()


def test_checkpoint_replays_tracked_dropout():
    g_plain, tracked_plain, default_plain = _grads(False)
    g_ckpt, tracked_ckpt, default_ckpt = _grads(True)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)
    assert all(torch.equal(tracked_plain[k], tracked_ckpt[k]) for k in tracked_plain)
    assert torch.equal(default_plain, default_ckpt)


def test_tracker_rejects_unknown_and_duplicate_states():
    import pytest

    model_parallel_seed(3)
    with pytest.raises(KeyError):
        with get_rng_tracker().fork("nope"):
            pass
    with pytest.raises(ValueError):
        get_rng_tracker().add("model-parallel-rng", 5)
