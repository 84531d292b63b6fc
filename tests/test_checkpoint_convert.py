"""Sharded checkpoints: save at one dp size, load at another and continue with the same loss; bitwise
resume at the same layout; atomic layout on disk."""

import json

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from torch import nn

from megatron_sr.checkpoint.sharded import load_checkpoint, read_latest_iteration, save_checkpoint
from megatron_sr.config import OptimizerConfig
from megatron_sr.distributed import DDPConfig, DistributedDataParallel, DistributedOptimizer
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps

DIM_IN, HIDDEN, DIM_OUT, GLOBAL_BATCH = 10, 24, 5, 8


def _build(dtype, precision, distributed=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.GELU(), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, DIM_OUT))
    model.to(dtype)
    assign_sr_streams([model])
    grad_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=grad_dtype, use_distributed_optimizer=distributed,
                                                   bucket_size=100))
    opt = DistributedOptimizer(ddp, OptimizerConfig(lr=5e-3, weight_decay=0.1, precision=precision, clip_grad=1.0),
                               seed=1234)
    return ddp, opt


def _data(first_step, steps):
    out = []
    for s in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(100 + s)
        out.append((torch.randn(GLOBAL_BATCH, DIM_IN, generator=g), torch.randn(GLOBAL_BATCH, DIM_OUT, generator=g)))
    return out


def _steps(ddp, opt, dtype, first_step, steps):
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for x, y in _data(first_step, steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x.chunk(dp)[rank].to(dtype)).float(), y.chunk(dp)[rank])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        losses.append(total.item() / dp)
    return losses


def _save_then_continue(root):
    """At dp = world: fp32 and bf16-sr runs, saved after 2 steps, then 2 more steps."""
    ps.initialize_model_parallel(1, 1)
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16-sr", torch.bfloat16)):
        ddp, opt = _build(dtype, precision)
        _steps(ddp, opt, dtype, 0, 2)
        save_checkpoint(f"{root}/{precision}", 2, ddp, opt, common={"consumed_samples": 2 * GLOBAL_BATCH},
                        rank_state={"rank": dist.get_rank()})
        out[precision] = (_steps(ddp, opt, dtype, 2, 2), ddp.buffer.param_data.clone())
    return out


def _load_and_continue(root, precision):
    ps.initialize_model_parallel(1, 1)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    ddp, opt = _build(dtype, precision)
    iteration, common, rank_state = load_checkpoint(f"{root}/{precision}", ddp, opt)
    assert iteration == 2 and common == {"consumed_samples": 2 * GLOBAL_BATCH} and opt.step_count == 2
    return _steps(ddp, opt, dtype, 2, 2), ddp.buffer.param_data.clone(), rank_state


@pytest.mark.slow
def test_save_at_dp2_load_at_dp1_and_dp4_continues(tmp_path):
    saved = run_ranks(2, _save_then_continue, str(tmp_path))
    assert read_latest_iteration(tmp_path / "fp32") == 2
    it_dir = tmp_path / "fp32" / "iter_0000002"
    meta = json.loads((it_dir / "metadata.json").read_text())
    assert meta["dp"] == 2 and meta["distributed_optimizer"] is True
    assert sorted(p.name for p in (it_dir / "mp_rank_00").iterdir()) == [
        "model.pt", "optim_dp_000.pt", "optim_dp_001.pt", "rank_dp_000.pt", "rank_dp_001.pt"]
    assert not list(tmp_path.glob("*/*.tmp"))

    ref_losses, _ = saved[0]["fp32"]
    # dp = 4: a different sharding of the same optimizer state
    for losses, _, rank_state in run_ranks(4, _load_and_continue, str(tmp_path), "fp32"):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert rank_state is None  # per-rank state only comes back at the same dp size
    # dp = 1, in this process
    losses, _, _ = _load_and_continue(str(tmp_path), "fp32")
    ps.destroy_model_parallel()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)

    # same layout, bf16-sr: the resumed run is bit-for-bit the uninterrupted one
    resumed = run_ranks(2, _load_and_continue, str(tmp_path), "bf16-sr")
    for rank in range(2):
        losses, params, rank_state = resumed[rank]
        ref_losses, ref_params = saved[rank]["bf16-sr"]
        assert losses == ref_losses and rank_state == {"rank": rank}
        assert torch.equal(params.view(torch.int16), ref_params.view(torch.int16))


def test_load_rejects_other_tensor_parallel_size(tmp_path):
    ddp, opt = _build(torch.float32, "fp32")
    save_checkpoint(tmp_path, 5, ddp, opt)
    meta_path = tmp_path / "iter_0000005" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["tp"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="convert_checkpoint"):
        load_checkpoint(tmp_path, ddp, opt, reshard=False)
