"""1F1B over gloo: the order of forwards/backwards, losses and gradients equal to one process, tied embeddings."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks
from torch import nn

from megatron_sr.model import stage_layer_range
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.pipeline import (
    allreduce_tied_embedding_grads,
    forward_backward_no_pipelining,
    get_forward_backward_func,
    sync_tied_embedding_weights,
)

V, H, S, MBS, LAYERS = 12, 6, 5, 2, 4


def _init(name: str, shape) -> torch.Tensor:
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))  # from the global name only
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.4


class _Stage(nn.Module):
    """A toy GPT stage: tied embedding on the first/last stage, tanh(linear) layers in between."""

    def __init__(self, pp: int, rank: int):
        super().__init__()
        self.first, self.last = rank == 0, rank == pp - 1
        self.layers = nn.ModuleList()
        for i in stage_layer_range(LAYERS, pp, rank):
            layer = nn.Linear(H, H)
            with torch.no_grad():
                layer.weight.copy_(_init(f"layers.{i}.weight", (H, H)))
                layer.bias.copy_(_init(f"layers.{i}.bias", (H,)))
            self.layers.append(layer)
        if self.first:
            self.embedding = nn.Parameter(_init("embedding", (V, H)))
            self.embedding.shared_embedding = pp > 1
        if self.last and not self.first:  # the output layer's copy, overwritten by the sync
            self.output_copy = nn.Parameter(torch.zeros(V, H))
            self.output_copy.shared_embedding_copy = True
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, tokens, labels):
        h = F.embedding(tokens, self.embedding) if self.first else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if not self.last:
            return h
        weight = self.embedding if self.first else self.output_copy
        return F.cross_entropy(F.linear(h, weight).reshape(-1, V), labels.reshape(-1))


def _microbatches(n: int):
    gen = torch.Generator().manual_seed(11)
    return [(torch.randint(0, V, (MBS, S), generator=gen), torch.randint(0, V, (MBS, S), generator=gen))
            for _ in range(n)]


def _step(data_iterator, model):
    tokens, labels = next(data_iterator)
    return model(tokens, labels)


def _grads(model: _Stage) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            name = f"layers.{model.global_layers[int(index)]}.{rest}"
        out[name] = p.grad.clone()
    return out


def _run(pp: int, num_microbatches: int, forward_only: bool = False) -> dict:
    rank = ps.get_pipeline_model_parallel_rank()
    model = _Stage(pp, rank)
    model.global_layers = list(stage_layer_range(LAYERS, pp, rank))
    sync_tied_embedding_weights(model)
    weights_synced = (not model.last or model.first
                      or torch.equal(model.output_copy.data, _init("embedding", (V, H))))
    events: list = []
    func = get_forward_backward_func()
    losses = func(forward_step=_step, data_iterator=iter(_microbatches(num_microbatches)), model=model,
                  num_microbatches=num_microbatches, tensor_shape=(MBS, S, H), dtype=torch.float32,
                  forward_only=forward_only, events=events)
    if forward_only:
        return {"losses": losses, "events": events}
    allreduce_tied_embedding_grads(model)
    return {"losses": losses, "events": events, "grads": _grads(model), "rank": rank, "synced": weights_synced}


def _body() -> list:
    results = []
    for pp, ms in [(4, [6, 2]), (2, [3])]:
        ps.initialize_model_parallel(1, pp)
        for m in ms:
            results.append(((pp, m), _run(pp, m)))
        results.append(((pp, "fwd"), _run(pp, 3, forward_only=True)))
        ps.destroy_model_parallel()
        dist.barrier()
    return results


def _expected_events(pp: int, rank: int, m: int) -> list:
    warmup = min(pp - rank - 1, m)
    events = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        events += [("F", warmup + i), ("B", i)]
    return events + [("B", m - warmup + i) for i in range(warmup)]


@pytest.mark.slow
def test_1f1b_matches_one_process():
    references = {}
    for m in (6, 2, 3):
        model = _Stage(1, 0)
        model.global_layers = list(range(LAYERS))
        events: list = []
        losses = forward_backward_no_pipelining(forward_step=_step, data_iterator=iter(_microbatches(m)),
                                                model=model, num_microbatches=m, events=events)
        assert events == [(k, i) for i in range(m) for k in "FB"]
        references[m] = (torch.stack(losses), _grads(model))

    fwd_ref = torch.stack(forward_backward_no_pipelining(
        forward_step=_step, data_iterator=iter(_microbatches(3)), model=_Stage(1, 0), num_microbatches=3,
        forward_only=True))
    last_stage_losses = 0
    for ranks in run_ranks(4, _body):
        for (pp, m), res in ranks:
            if m == "fwd":  # forward only: 3 forwards, losses on the last stage only
                assert res["events"] == [("F", i) for i in range(3)]
                if res["losses"]:
                    torch.testing.assert_close(torch.stack(res["losses"]), fwd_ref, rtol=1e-6, atol=0)
                continue
            ref_losses, ref_grads = references[m]
            stage = res["rank"]
            assert res["events"] == _expected_events(pp, stage, m), (pp, m, stage)
            assert res["synced"]
            if stage == pp - 1:
                last_stage_losses += 1
                torch.testing.assert_close(torch.stack(res["losses"]), ref_losses, rtol=1e-6, atol=0)
            else:
                assert res["losses"] == []
            for name, grad in res["grads"].items():
                key = "embedding" if name == "output_copy" else name
                torch.testing.assert_close(grad, ref_grads[key], rtol=1e-5, atol=1e-7, msg=f"{pp} {m} {name}")
            expected_names = {f"layers.{i}.{w}" for i in stage_layer_range(LAYERS, pp, stage)
                              for w in ("weight", "bias")}
            assert expected_names <= set(res["grads"])
    assert last_stage_losses == 1 * 2 + 2 * 1  # pp=4: 1 last-stage rank x 2 runs; pp=2 (dp=2): 2 ranks x 1 run


def test_stage_layer_range():
    assert list(stage_layer_range(8, 4, 2)) == [4, 5]
    assert list(stage_layer_range(3, 1, 0)) == [0, 1, 2]
    with pytest.raises(ValueError, match="not divisible"):
        stage_layer_range(6, 4, 0)


def _untied_pp2_trains():
    from megatron_sr.config import parse_config
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Quiet(Observer):
        def log(self, message):
            pass

    argv = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
            "--micro-batch-size 1 --global-batch-size 2 --train-iters 2 --eval-interval 0 --eval-iters 1 "
            "--device cpu --pipeline-model-parallel-size 2 --untie-embeddings-and-output-weights").split()
    return pretrain(parse_config(argv), Quiet()).state.iteration


def test_untied_embeddings_train_with_pipeline_parallelism():
    assert run_ranks(2, _untied_pp2_trains) == [2, 2]
