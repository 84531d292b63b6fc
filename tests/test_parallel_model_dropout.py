"""GPT with tp = 2, --sequence-parallel and dropout: recomputation replays every dropout mask.

Attention dropout (tracked tp stream), residual dropout under sequence parallelism (tracked stream)
and embedding dropout (default stream) must all be redrawn identically when a layer is recomputed in
backward, or the gradients silently change. The check: gradients with full-layer recompute equal
those without, bit for bit, while dropout is really active (they differ from a dropout-free run).
"""

import pytest
import torch
from multiproc import run_ranks

from megatron_sr.config import ModelConfig
from megatron_sr.model.gpt import GPTModel
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.random import model_parallel_seed
from megatron_sr.training.setup import apply_sequence_parallel

RECOMPUTE_FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _grads(recompute: bool, dropout: float) -> dict:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                      max_position_embeddings=16, vocab_size=64, make_vocab_size_divisible_by=32,
                      hidden_dropout=dropout, attention_dropout=dropout,
                      # whole layers recomputed: every dropout stream (residual, attention, embedding) replays
                      **(RECOMPUTE_FULL if recompute else {}))
    model = GPTModel(cfg, seed=5)
    apply_sequence_parallel(model)
    model.train()
    model_parallel_seed(42)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)
    for _ in range(2):  # two micro-batches: the streams must also advance alike
        model(tokens, labels=labels).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _body():
    ps.initialize_model_parallel(2, 1)
    ps.set_sequence_parallel(True)
    plain, recomputed, no_dropout = _grads(False, 0.2), _grads(True, 0.2), _grads(False, 0.0)
    same = all(torch.equal(plain[n], recomputed[n]) for n in plain)
    active = any(not torch.equal(plain[n], no_dropout[n]) for n in plain)
    return same, active, sorted(plain)


@pytest.mark.slow
def test_recompute_replays_dropout_under_tp_and_sequence_parallel():
    for same, active, names in run_ranks(2, _body):
        assert active, "dropout had no effect: the test would prove nothing"
        assert same, "recomputation changed the gradients"
        assert any("layernorm" in n for n in names)
