"""Activation recomputation with Megatron's flags and meanings: full (uniform / block) and selective.

Every setting must give bitwise the gradients of no recomputation (dropout on, so the random streams
must replay), and must recompute what Megatron's flag says: selective (= --recompute-activations)
only the attention core, full/uniform every group of N layers, full/block the first N layers.
"""

import pytest
import torch

from megatron_sr.config import Config, ConfigError, ModelConfig, finalize, parse_config
from megatron_sr.model import GPTModel
from megatron_sr.model.transformer import MLP, SelfAttention
from megatron_sr.parallel.random import model_parallel_seed

SETTINGS = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "alias": dict(recompute_activations=True),
    "uniform1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "uniform3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "block2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def _model(setting: str, dtype=torch.float32) -> GPTModel:
    cfg = Config(model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                                   vocab_size=100, hidden_dropout=0.1, attention_dropout=0.1,
                                   **SETTINGS[setting]))
    cfg.data.mock_data = True
    return GPTModel(finalize(cfg).model, seed=5, params_dtype=dtype)


def _grads_and_calls(setting: str, dtype=torch.float32):
    model = _model(setting, dtype).train()
    calls = {"core": 0, "mlp": [0] * 4}
    for i, layer in enumerate(model.decoder):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls["mlp"].__setitem__(i, calls["mlp"][i] + 1))
        original = layer.self_attention.core

        def counted(*args, original=original):
            calls["core"] += 1
            return original(*args)

        layer.self_attention.core = counted
    model_parallel_seed(3)
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (2, 17), generator=g)
    model(t[:, :-1], labels=t[:, 1:]).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "none"])
def test_every_recompute_setting_gives_bitwise_the_gradients_of_none(setting, dtype):
    plain, _ = _grads_and_calls("none", dtype)
    recomputed, _ = _grads_and_calls(setting, dtype)
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain), setting


def test_what_each_setting_recomputes():
    expected = {  # attention-core calls over 4 layers, MLP forward calls per layer
        "none": (4, [1, 1, 1, 1]),
        "selective": (8, [1, 1, 1, 1]),
        "alias": (8, [1, 1, 1, 1]),  # --recompute-activations is selective, as in Megatron
        "uniform1": (8, [2, 2, 2, 2]),
        "uniform3": (8, [2, 2, 2, 2]),  # groups of 3 layers, then the last one alone
        "block2": (6, [2, 2, 1, 1]),  # the first two layers only
    }
    for setting, (core, mlp) in expected.items():
        _, calls = _grads_and_calls(setting)
        assert (calls["core"], calls["mlp"]) == (core, mlp), setting


def test_no_recompute_in_eval_or_without_grad():
    model = _model("uniform1").eval()
    assert isinstance(model.decoder[0].mlp, MLP) and isinstance(model.decoder[0].self_attention, SelfAttention)
    with torch.no_grad():
        out = model(torch.zeros(1, 16, dtype=torch.long))
    assert out.shape[:2] == (1, 16)


@pytest.mark.parametrize("flags, message", [
    ("--recompute-granularity full", "needs --recompute-method uniform or block"),
    ("--recompute-granularity full --recompute-method block", "needs --recompute-num-layers between 1 and the 4"),
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 5", "between 1 and the 4"),
    ("--recompute-granularity selective --recompute-num-layers 1", "takes no --recompute-method"),
    ("--recompute-method uniform", "need --recompute-granularity full"),
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 2 "
     "--pipeline-model-parallel-size 2", "between 1 and the 2 layers per pipeline stage"),
])
def test_recompute_flags_are_checked_like_megatron(flags, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2" if "pipeline" in flags else "1")
    base = "--mock-data --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 ".split()
    if "pipeline" in flags:
        with pytest.raises(ConfigError, match="between 1 and the 2"):
            parse_config(base + (flags.replace("--recompute-num-layers 2", "--recompute-num-layers 3")).split())
        assert parse_config(base + flags.split()).model.recompute_num_layers == 2
        return
    with pytest.raises(ConfigError, match=message):
        parse_config(base + flags.split())


def test_recompute_activations_is_megatrons_selective_alias():
    cfg = parse_config("--mock-data --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
                       "--recompute-activations".split())
    assert cfg.model.recompute_granularity == "selective" and cfg.model.recompute_method is None
