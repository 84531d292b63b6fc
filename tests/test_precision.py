"""Precision modes of SRAdamW: bytes per parameter from the real tensors (megatron_sr/precision.py), FP32 grad
accumulation, bf16-mp masters, no decay on 1-D params, NaN skip, clipping, wiring to the reference step."""

import pytest
import torch

from megatron_sr.config import Config, ModelConfig, OptimizerConfig, finalize
from megatron_sr.model import GPTModel
from megatron_sr.numerics.philox import SRKey
from megatron_sr.optimizer.adamw_reference import AdamWConstants, adamw_reference_, step_scalars
from megatron_sr.optimizer.sr_adamw import SRAdamW
from megatron_sr.optimizer.sr_streams import assign_sr_streams


def model_cfg():
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                                   vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0))
    cfg.data.mock_data = True
    return finalize(cfg).model


def make(precision, seed=0, **opt):
    model = GPTModel(model_cfg(), seed=seed,
                     params_dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    assign_sr_streams([model])
    renamed = {"state_dtype": "optimizer_state_dtype"}
    config = OptimizerConfig(**{"lr": 1e-3, "weight_decay": 0.0, "clip_grad": 0.0, "precision": precision,
                                **{renamed.get(k, k): v for k, v in opt.items()}})
    return model, SRAdamW([model], config, seed=1234)


def backward(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 100, (2, 17), generator=g)
    (model(t[:, :-1], labels=t[:, 1:]).mean() * scale).backward()


# megatron_sr/precision.py (and docs/distributed.md at dp = 1): bytes per parameter for params, grads, optimizer states
# (FP32 master weights count as optimizer state, as in Megatron's accounting).
TABLE = [
    ("bf16-sr", {}, (2, 2, 8)),
    ("bf16-sr", {"state_dtype": "bf16"}, (2, 2, 4)),
    ("bf16-sr", {"grad_dtype": "fp32"}, (2, 4, 8)),
    ("bf16", {}, (2, 2, 8)),
    ("bf16-mp", {}, (2, 4, 12)),
    ("fp32", {}, (4, 4, 8)),
]


@pytest.mark.parametrize("precision, opts, expected", TABLE)
def test_bytes_per_parameter_match_design_table(precision, opts, expected):
    model, opt = make(precision, **opts)
    backward(model)
    mem = opt.memory_bytes()
    n = mem["num_params"]
    assert n == sum(p.numel() for p in model.parameters())
    measured = (mem["params"] / n, mem["grads"] / n, mem["optimizer_states"] / n)
    assert measured == expected
    # And the tensors are what the mode says, independent of memory_bytes' bookkeeping.
    p = next(model.parameters())
    assert p.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    if opt.main_grads is None:
        assert p.grad.dtype == p.dtype
    else:
        assert p.grad is None and opt.main_grads[0].dtype == torch.float32
    assert opt.step().updated


def test_fp32_grad_accumulation_sums_microbatches_in_fp32():
    model, opt = make("bf16-sr", grad_dtype="fp32")
    ref, _ = make("bf16-sr")
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in ref.parameters()]
    for mb in range(3):
        backward(model, seed=mb)
        backward(ref, seed=mb)
        for e, p in zip(expected, ref.parameters()):
            e.add_(p.grad.float())  # each micro-batch's BF16 gradient, summed in FP32
            p.grad = None
    for e, g in zip(expected, opt.main_grads):
        assert torch.equal(e, g)


def test_bf16_mp_keeps_fp32_masters_and_casts_them():
    model, opt = make("bf16-mp", lr=1e-6)
    before = [m.clone() for m in opt.master]
    backward(model)
    opt.step()
    for p, m, _ in zip(model.parameters(), opt.master, before):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))
    # Steps far below a BF16 ulp accumulate in the master only.
    assert any(not torch.equal(m, b) for m, b in zip(opt.master, before))


def test_weight_decay_only_on_matrices():
    model, opt = make("fp32", lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decoupled decay can move a weight
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() > 1:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_step_is_the_reference_step_with_canonical_indices():
    model, opt = make("bf16-sr", seed=1, lr=1e-2, weight_decay=0.1)
    backward(model)
    expected = []
    consts = AdamWConstants.make(0.9, 0.999, 1e-8)
    scalars = step_scalars(1e-2, 1, 0.9, 0.999, "cpu")
    offset = 0
    for p in model.parameters():
        q = p.detach().clone()
        adamw_reference_(q, p.grad.clone(), torch.zeros_like(q, dtype=torch.float32),
                         torch.zeros_like(q, dtype=torch.float32), scalars=scalars, step=1, consts=consts,
                         weight_decay=0.1 if p.dim() > 1 else 0.0, rounding="stochastic",
                         key=SRKey.from_seed(1234, tp_rank=0, pp_rank=0), base_index=offset)
        offset += p.numel()
        expected.append(q)
    opt.step()
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p.detach().view(torch.int16), q.view(torch.int16))


def test_nan_gradient_skips_the_step():
    model, opt = make("bf16-sr")
    backward(model)
    next(model.parameters()).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    result = opt.step()
    assert result.skipped and not result.updated and opt.step_count == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_clipping_scales_grads_to_the_max_norm():
    model, opt = make("fp32", clip_grad=0.01)
    backward(model, scale=100.0)
    norm_before = float(opt.grad_norm())
    result = opt.step()
    assert result.grad_norm == pytest.approx(norm_before) and norm_before > 0.01
    assert float(opt.grad_norm()) == pytest.approx(0.01, rel=1e-4)
