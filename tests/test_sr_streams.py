"""Stream assignment: canonical offsets, replicated parameters on key tp 0, tied copies on the first stage's stream."""

import torch
from torch import nn

from megatron_sr.optimizer.sr_streams import assign_sr_streams, sr_key_for
from megatron_sr.parallel import parallel_state as ps


def test_offsets_are_running_numel_sums_over_chunks():
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    assign_sr_streams([a, b])
    params = list(a.parameters()) + list(b.parameters())
    expected = 0
    for p in params:
        assert p.sr_index_base == expected
        expected += p.numel()
    assert sr_key_for(params[0], 7) == sr_key_for(params[-1], 7)


def test_replicated_and_tied_parameters(monkeypatch):
    monkeypatch.setattr(ps, "_TP_RANK", 1)
    monkeypatch.setattr(ps, "_PP_RANK", 2)
    m = nn.Linear(2, 2)
    m.weight.tensor_model_parallel = True
    m.bias.tensor_model_parallel = False
    tied = nn.Parameter(torch.zeros(5))
    tied.tensor_model_parallel = True
    tied.shared_embedding_copy = True
    holder = nn.Module()
    holder.lin, holder.tied = m, tied
    assign_sr_streams([holder])
    assert m.weight.sr_key_ranks == (1, 2) and m.bias.sr_key_ranks == (0, 2)
    assert tied.sr_index_base == 0 and tied.sr_key_ranks == (1, 0)
