"""Layout of the contiguous param/grad buffers: backward order, buckets, padding, views, shards."""

import pytest
import torch
from torch import nn

from megatron_sr.distributed import DDPConfig, DistributedDataParallel, ParamAndGradBuffer
from megatron_sr.distributed.param_and_grad_buffer import ALIGN


def _params():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).bfloat16()


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_layout_backward_order_buckets_and_shards(dp_size):
    model = _params()
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    buf = ParamAndGradBuffer(params, grad_dtype=torch.float32, dp_size=dp_size, bucket_size=20)
    # backward order: the last parameter of the model comes first in the buffer
    starts = [buf.param_range[p][0] for p in params]
    assert starts == sorted(starts, reverse=True) and buf.param_range[params[-1]][0] == 0
    assert buf.param_data.dtype == torch.bfloat16 and buf.grad_data.dtype == torch.float32
    for p, v in zip(params, values):
        assert torch.equal(p, v)  # values kept
        assert p.data_ptr() == buf.param_view(p).data_ptr()
        assert p.main_grad.data_ptr() == buf.grad_view(p).data_ptr()
    # buckets are contiguous, close at >= 20 elements and divide into equal aligned shards
    assert buf.buckets[0].start == 0 and buf.buckets[-1].end == buf.numel
    for a, b in zip(buf.buckets, buf.buckets[1:]):
        assert a.end == b.start
    for b in buf.buckets:
        assert b.numel % (dp_size * ALIGN) == 0
        assert sum(p.numel() for p in b.params[:-1]) < 20 <= sum(p.numel() for p in b.params) or b is buf.buckets[-1]
    # the shards of all ranks cover every parameter element exactly once
    covered = torch.zeros(buf.numel, dtype=torch.int32)
    for r in range(dp_size):
        for p, lo, hi, off in buf.shard_pieces(r):
            assert lo - buf.param_range[p][0] == off
            covered[lo:hi] += 1
    for p in params:
        s, e = buf.param_range[p]
        assert torch.all(covered[s:e] == 1)
    assert int(covered.sum()) == buf.numel_unpadded == sum(p.numel() for p in params)


def test_one_bucket_when_no_size():
    buf = ParamAndGradBuffer(list(_params().parameters()), grad_dtype=torch.bfloat16, dp_size=2, bucket_size=None)
    assert len(buf.buckets) == 1


def test_hooks_accumulate_into_main_grad_and_free_param_grad():
    model = _params()
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=torch.float32, bucket_size=30))
    x = torch.randn(4, 5).bfloat16()
    with ddp.no_sync():
        ddp(x).float().sum().backward()
    ddp(x).float().sum().backward()
    ddp.finish_grad_sync()
    ref = _params()
    ref(x).float().sum().backward()
    for p, q in zip(ddp.module.parameters(), ref.parameters()):
        assert p.grad is None
        torch.testing.assert_close(p.main_grad, 2 * q.grad.float(), rtol=1e-2, atol=1e-2)
    ddp.zero_grad_buffer()
    assert not ddp.buffer.grad_data.any()


def test_rejects_mixed_dtypes():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="all params must be"):
        ParamAndGradBuffer(params, grad_dtype=torch.float32, dp_size=1)


def test_late_sync_bucket_waits_for_the_callback():
    """A bucket holding a late-sync parameter (a tied embedding) starts only after before_late_sync ran."""
    model = _params()
    first = list(model.parameters())[0]  # lies in the last bucket (backward order)
    calls = []
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=torch.float32, bucket_size=10, overlap_grad_reduce=True),
                                  late_sync_params=[first], before_late_sync=lambda: calls.append(1))
    late = ddp.buffer.param_to_bucket[first].index
    ddp.event_log = []
    ddp(torch.randn(2, 5).bfloat16()).float().sum().backward()
    launched = [b for kind, b in ddp.event_log if kind == "launch"]
    assert late not in launched and len(launched) == len(ddp.buffer.buckets) - 1
    ddp.finish_grad_sync(before_late_sync=lambda: ddp.event_log.append(("callback", -1)))
    assert ddp.event_log[-2:] == [("callback", -1), ("launch", late)] and not calls
    ddp.zero_grad_buffer()
    ddp(torch.randn(2, 5).bfloat16()).float().sum().backward()
    ddp.finish_grad_sync()  # the constructor's callback
    assert calls == [1] and ddp.event_log[-1] == ("launch", late)
