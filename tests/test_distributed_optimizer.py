"""Data parallelism and the sharded SR distributed optimizer on gloo (CPU) processes.

Each multi-process test runs its checks inside the ranks (a failed assert fails the spawn); the
single-process reference is computed in every rank from the same seeds, with no process group.
"""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from torch import nn

from megatron_sr.config import OptimizerConfig
from megatron_sr.distributed import DDPConfig, DistributedDataParallel, DistributedOptimizer
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps

DIM_IN, HIDDEN, DIM_OUT = 12, 20, 6


# ---------------------------------------------------------------- helpers
def make_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.GELU(), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, DIM_OUT))
    model.to(dtype)
    assign_sr_streams([model])
    return model


def batches(steps, global_batch):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(global_batch, DIM_IN, generator=g), torch.randn(global_batch, DIM_OUT, generator=g))
            for _ in range(steps)]


def train(dtype, grad_dtype, precision, data, *, dp_group=None, dp_rank=0, dp_size=1, distributed=True,
          bucket_size=97, micro_batches=1, clip=0.0):
    """Train a fresh model on `data` (each global batch split over dp ranks and micro-batches)."""
    model = make_model(dtype)
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=grad_dtype, use_distributed_optimizer=distributed,
                                                   bucket_size=bucket_size), dp_group=dp_group)
    opt = DistributedOptimizer(ddp, OptimizerConfig(lr=1e-2, weight_decay=0.1, precision=precision, clip_grad=clip),
                               seed=7)
    losses, norms = [], []
    for x, y in data:
        xs, ys = x.chunk(dp_size)[dp_rank].chunk(micro_batches), y.chunk(dp_size)[dp_rank].chunk(micro_batches)
        opt.zero_grad()
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            last = i == micro_batches - 1
            with (torch.enable_grad() if last else ddp.no_sync()):
                loss = nn.functional.mse_loss(ddp(xm.to(dtype)).float(), ym) / micro_batches
                loss.backward()
            total += loss.detach()
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
            total /= dp_size
        result = opt.step()
        losses.append(total.item())
        norms.append(result.grad_norm)
    return ddp, opt, losses, norms


# ---------------------------------------------------------------- multi-process checks
def _check_bf16_sr_sharded_equals_unsharded(rank, world):
    """Identical data on every dp rank: the dp-average is exact, so the sharded update must equal the
    single-process (unsharded) update bit for bit, with shards cutting through parameters."""
    group = ps.get_data_parallel_group()
    data = batches(3, 4 * world)
    same = [(x.repeat(world, 1), y.repeat(world, 1)) for x, y in data]  # every rank sees x
    for grad_dtype in (torch.bfloat16, torch.float32):
        ref, _, ref_losses, ref_norms = train(torch.bfloat16, grad_dtype, "bf16-sr", data)
        ddp, opt, losses, norms = train(torch.bfloat16, grad_dtype, "bf16-sr", same, dp_group=group,
                                        dp_rank=rank, dp_size=world)
        assert len(ddp.buffer.buckets) > 1
        # pieces that start inside a parameter exist (the shard boundary cuts it)
        assert any(pc.offset > 0 for pc in opt.pieces) or rank == 0
        for (name, p_ref), p in zip(ref.module.named_parameters(), ddp.module.parameters()):
            assert torch.equal(p_ref.view(torch.int16), p.view(torch.int16)), f"{name} differs (rank {rank})"
        assert losses == ref_losses  # the norm is summed over shards in another order: close, not bitwise
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6, atol=0)
        # the optimizer holds states for its shard only
        held = torch.tensor(opt.exp_avg.numel())
        assert held <= ddp.buffer.numel // world
        dist.all_reduce(held)
        assert held == ddp.buffer.numel_unpadded


def _check_fp32_matches_single_process(rank, world):
    group = ps.get_data_parallel_group()
    data = batches(4, 4 * world)
    _, _, ref_losses, ref_norms = train(torch.float32, torch.float32, "fp32", data, clip=0.05)
    ref_params = None
    for distributed in (True, False):
        ddp, _, losses, norms = train(torch.float32, torch.float32, "fp32", data, dp_group=group, dp_rank=rank,
                                      dp_size=world, distributed=distributed, micro_batches=2, clip=0.05)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        params = ddp.buffer.param_data.clone()
        if ref_params is not None:
            torch.testing.assert_close(params, ref_params, rtol=1e-5, atol=1e-7)
        ref_params = params


def _check_bf16_sr_replicas_identical(rank, world):
    group = ps.get_data_parallel_group()
    data = batches(3, 4 * world)
    for distributed in (True, False):
        ddp, _, losses, _ = train(torch.bfloat16, torch.bfloat16, "bf16-sr", data, dp_group=group, dp_rank=rank,
                                  dp_size=world, distributed=distributed, micro_batches=2)
        mine = ddp.buffer.param_data.view(torch.int16).to(torch.int32)  # gloo has no int16
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"replicas drifted (distributed={distributed})"


def _check_overlap(rank, world):
    """A bucket's reduce-scatter is launched while backward still has gradients to produce."""
    model = make_model(torch.bfloat16)
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=torch.bfloat16, use_distributed_optimizer=True,
                                                   bucket_size=50, overlap_grad_reduce=True),
                                  dp_group=ps.get_data_parallel_group())
    assert len(ddp.buffer.buckets) >= 3
    ddp.event_log = []
    x, y = batches(1, 4)[0]
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    log = ddp.event_log
    first_launch = next(i for i, e in enumerate(log) if e[0] == "launch")
    last_grad = max(i for i, e in enumerate(log) if e[0] == "grad")
    assert first_launch < last_grad, log
    assert [e[1] for e in log if e[0] == "launch"] == list(range(len(ddp.buffer.buckets))), log
    ddp.finish_grad_sync()
    overlapped = ddp.buffer.grad_data.clone()
    # Megatron's default (no --overlap-grad-reduce): nothing starts during backward, the same result after it
    ddp = DistributedDataParallel(make_model(torch.bfloat16), DDPConfig(
        grad_dtype=torch.bfloat16, use_distributed_optimizer=True, bucket_size=50),
        dp_group=ps.get_data_parallel_group())
    ddp.event_log = []
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    assert not any(kind == "launch" for kind, _ in ddp.event_log), ddp.event_log
    ddp.finish_grad_sync()
    assert torch.equal(ddp.buffer.grad_data, overlapped)


def _run_all(world):
    ps.initialize_model_parallel(1, 1)  # all ranks data-parallel
    rank = ps.get_data_parallel_rank()
    _check_overlap(rank, world)
    _check_bf16_sr_sharded_equals_unsharded(rank, world)
    _check_fp32_matches_single_process(rank, world)
    _check_bf16_sr_replicas_identical(rank, world)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_and_distributed_optimizer(world):
    run_ranks(world, _run_all, world)


# ---------------------------------------------------------------- single process
def test_fp32_matches_torch_adamw():
    """With dp = 1 in fp32 the optimizer is AdamW (decay only on matrices)."""
    data = batches(3, 8)
    ddp, _, _, _ = train(torch.float32, torch.float32, "fp32", data)
    model = make_model(torch.float32)
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-2, eps=1e-8)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), ddp.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_nan_gradient_skips_the_step():
    model = make_model(torch.bfloat16)
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=torch.float32))
    opt = DistributedOptimizer(ddp, OptimizerConfig(precision="bf16-sr", weight_decay=0.0, clip_grad=0.0), seed=1234)
    before = ddp.buffer.param_data.clone()
    x, y = batches(1, 4)[0]
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    ddp.buffer.grad_data[3] = float("nan")
    result = opt.step()
    assert result.skipped and not result.updated and opt.step_count == 0
    assert torch.equal(before.view(torch.int16), ddp.buffer.param_data.view(torch.int16))


def test_lr_is_set_per_step_both_ways():
    ddp = DistributedDataParallel(make_model(torch.float32), DDPConfig())
    opt = DistributedOptimizer(ddp, OptimizerConfig(lr=1.0, precision="fp32", weight_decay=0.0, clip_grad=0.0),
                               seed=1234)
    opt.lr = 0.5
    assert opt.param_groups[0]["lr"] == 0.5
    opt.param_groups[0]["lr"] = 0.0  # a zero learning rate: the step leaves the params alone (no decay)
    before = ddp.buffer.param_data.clone()
    x, y = batches(1, 4)[0]
    nn.functional.mse_loss(ddp(x), y).backward()
    assert opt.step().updated and torch.equal(before, ddp.buffer.param_data)
    assert opt.state_dict()["lr"] == 0.0


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", [
    ("bf16-sr", torch.bfloat16, torch.bfloat16), ("bf16-mp", torch.float32, torch.float32),
    ("bf16", torch.bfloat16, torch.float32)])
def test_factory_maps_the_trainer_config(precision, grad_dtype, state_dtype):
    from types import SimpleNamespace

    from megatron_sr.distributed.factory import build_data_parallel

    cfg = SimpleNamespace(lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
                          precision=precision, grad_dtype="bf16",
                          optimizer_state_dtype="bf16" if precision == "bf16-sr" else "fp32")
    ddp, opt = build_data_parallel(make_model(torch.bfloat16), cfg, seed=3, use_distributed_optimizer=True)
    assert ddp.buffer.grad_data.dtype == grad_dtype and opt.exp_avg.dtype == state_dtype
    assert (opt.master is not None) == (precision == "bf16-mp")
    assert opt.rounding == ("stochastic" if precision == "bf16-sr" else "nearest")
    before = ddp.buffer.param_data.clone()
    x, y = batches(1, 4)[0]
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    assert opt.step().updated and not torch.equal(before, ddp.buffer.param_data)
    if opt.master is not None:  # bf16-mp: the BF16 params are the rounded FP32 masters
        for pc in opt.pieces:
            master = opt.master[pc.state_offset:pc.state_offset + pc.hi - pc.lo]
            assert torch.equal(ddp.buffer.param_data[pc.lo:pc.hi], master.bfloat16())


def test_setting_the_seed_changes_the_sr_stream():
    x, y = batches(1, 4)[0]
    results = []
    for seed in (None, 99):
        ddp = DistributedDataParallel(make_model(torch.bfloat16), DDPConfig(grad_dtype=torch.bfloat16))
        opt = DistributedOptimizer(ddp, OptimizerConfig(lr=1e-2, weight_decay=0.0, clip_grad=0.0), seed=7)
        if seed is not None:
            opt.seed = seed
        nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
        opt.step()
        results.append(ddp.buffer.param_data.clone())
    assert opt.seed == 99 and not torch.equal(results[0], results[1])


def test_load_state_checks_coverage_and_round_trips():
    ddp = DistributedDataParallel(make_model(torch.bfloat16), DDPConfig(bucket_size=50))
    opt = DistributedOptimizer(ddp, OptimizerConfig(weight_decay=0.0, clip_grad=0.0), seed=1234)
    x, y = batches(1, 4)[0]
    nn.functional.mse_loss(ddp(x.bfloat16()).float(), y).backward()
    opt.step()
    state = opt.state_dict()
    other = DistributedOptimizer(DistributedDataParallel(make_model(torch.bfloat16), DDPConfig(bucket_size=1000)),
                                 OptimizerConfig(weight_decay=0.0, clip_grad=0.0), seed=1234)
    other.load_state_dict(state)  # another bucket layout: matched by parameter name and offset
    assert other.step_count == 1
    assert torch.equal(torch.sort(other.exp_avg_sq).values, torch.sort(opt.exp_avg_sq).values)
    state["pieces"] = state["pieces"][1:]
    with pytest.raises(ValueError, match="not all in the checkpoint"):
        other.load_state_dict(state)
