"""On the real GPT model: DDP + DistributedOptimizer at dp = 1 is bit for bit the single-process
SRAdamW in every precision mode (same SR streams, same math); at dp = 2 with the same data on both
ranks the sharded bf16-sr update is still bit for bit the single-process one."""

import pytest
import torch
from multiproc import run_ranks

from megatron_sr.config import Config, ModelConfig, finalize
from megatron_sr.distributed.factory import build_data_parallel
from megatron_sr.model import GPTModel
from megatron_sr.optimizer.sr_adamw import SRAdamW
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps

VOCAB, SEQ, STEPS = 96, 16, 3


def _cfg(precision, grad_dtype="bf16", state_dtype="fp32"):
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                                   vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0))
    cfg.data.mock_data = True
    cfg = finalize(cfg)
    o = cfg.optimizer
    o.precision, o.grad_dtype, o.optimizer_state_dtype = precision, grad_dtype, state_dtype
    o.lr, o.weight_decay, o.clip_grad = 3e-3, 0.1, 0.0
    return cfg


def _model(cfg):
    dtype = torch.float32 if cfg.optimizer.precision == "fp32" else torch.bfloat16
    model = GPTModel(cfg.model, seed=cfg.training.seed, params_dtype=dtype)
    assign_sr_streams([model])
    return model


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (4, SEQ + 1), generator=g) for _ in range(STEPS)]


def _train(model, forward_model, opt):
    losses = []
    for tokens in _batches():
        opt.zero_grad()
        loss = forward_model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
        loss.backward()
        result = opt.step()
        assert result.updated
        losses.append((loss.item(), result.grad_norm))
    return losses, [p.detach().clone() for p in model.parameters()]


def _reference(cfg):
    model = _model(cfg)
    o = cfg.optimizer
    opt = SRAdamW([model], o, seed=cfg.training.seed)
    return _train(model, model, opt)


def _distributed(cfg):
    model = _model(cfg)
    ddp, opt = build_data_parallel(model, cfg.optimizer, seed=cfg.training.seed, use_distributed_optimizer=True,
                                   bucket_size=3000)
    return _train(model, ddp, opt)


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", [
    ("bf16-sr", "bf16", "fp32"), ("bf16-sr", "fp32", "fp32"), ("bf16-sr", "bf16", "bf16"),
    ("bf16", "bf16", "fp32"), ("bf16-mp", "bf16", "fp32"), ("fp32", "bf16", "fp32")])
def test_dp1_distributed_optimizer_equals_sr_adamw(precision, grad_dtype, state_dtype):
    cfg = _cfg(precision, grad_dtype, state_dtype)
    (ref_losses, ref_params), (losses, params) = _reference(cfg), _distributed(cfg)
    assert [l for l, _ in losses] == [l for l, _ in ref_losses]
    torch.testing.assert_close(torch.tensor([n for _, n in losses]), torch.tensor([n for _, n in ref_losses]),
                               rtol=1e-6, atol=0)  # summed in another order (buffer vs model order)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert torch.equal(_bits(p), _bits(q)), f"parameter {i} differs"


def _dp2_same_data():
    ps.initialize_model_parallel(1, 1)
    cfg = _cfg("bf16-sr")
    (ref_losses, ref_params), (losses, params) = _reference(cfg), _distributed(cfg)  # each rank: the same data
    assert [l for l, _ in losses] == [l for l, _ in ref_losses]
    return all(torch.equal(_bits(p), _bits(q)) for p, q in zip(params, ref_params))


@pytest.mark.slow
def test_dp2_sharded_update_is_the_single_process_update():
    assert run_ranks(2, _dp2_same_data) == [True, True]


def test_sharded_checkpoint_resumes_bitwise_in_the_single_process_trainer(tmp_path):
    """A DistributedOptimizer checkpoint (dp = 1) loads through the trainer's load_checkpoint into
    SRAdamW, and the two continue bit for bit alike."""
    from megatron_sr.checkpoint import load_checkpoint
    from megatron_sr.checkpoint.sharded import save_checkpoint

    cfg = _cfg("bf16-sr", state_dtype="fp32")
    model = _model(cfg)
    ddp, opt = build_data_parallel(model, cfg.optimizer, seed=cfg.training.seed, use_distributed_optimizer=True,
                                   bucket_size=3000)
    batches = _batches()

    def step(forward_model, optimizer, tokens):
        optimizer.zero_grad()
        forward_model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
        optimizer.step()

    step(ddp, opt, batches[0])
    save_checkpoint(tmp_path, 1, ddp, opt, common={"consumed_train_samples": 4, "skipped_iters": 0,
                                                   "config": {"marker": 1}})
    for tokens in batches[1:]:
        step(ddp, opt, tokens)

    single = _model(cfg)
    o = cfg.optimizer
    sr = SRAdamW([single], o, seed=cfg.training.seed)
    state, config = load_checkpoint(str(tmp_path), [single], sr)
    assert (state.iteration, state.consumed_train_samples, config, sr.step_count) == (1, 4, {"marker": 1}, 1)
    for tokens in batches[1:]:
        step(single, sr, tokens)
    for p, q in zip(model.parameters(), single.parameters()):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
