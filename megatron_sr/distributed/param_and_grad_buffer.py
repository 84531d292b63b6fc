"""Contiguous parameter and gradient buffers, cut into buckets in backward order.

Every trainable parameter becomes a view into one flat parameter buffer (BF16 in bf16-sr, FP32 in
fp32 mode) and gets a `.main_grad` view into one flat gradient buffer (BF16 or FP32). Parameters are
laid out in *backward* order (the reverse of `model.parameters()`), because gradients arrive roughly
in that order: the first bucket fills first, so its collective can start while backward continues.

Buckets hold whole parameters and close once they reach `bucket_size` elements (Megatron's
`--ddp-bucket-size`). Each bucket is padded so that its length divides by `dp_size * ALIGN`: every
data-parallel rank then owns one equal, contiguous, 16-byte-aligned shard of every bucket, which is
what reduce-scatter and all-gather need. Padding elements stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Shards start on multiples of 8 elements (16 bytes of BF16): the fused kernel's vector width.
ALIGN = 8
DEFAULT_BUCKET_SIZE = 40_000_000


@dataclass
class Bucket:
    """A contiguous range [start, end) of both buffers holding whole parameters (plus padding)."""

    index: int
    start: int
    end: int
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int, dp_size: int) -> tuple[int, int]:
        """Buffer range [lo, hi) of data-parallel rank dp_rank's shard of this bucket."""
        size = self.numel // dp_size
        lo = self.start + dp_rank * size
        return lo, lo + size


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class ParamAndGradBuffer:
    """Flat param and grad storage for `params` (given in model order), bucketed in backward order.

    After construction every param's `.data` is a view into `param_data` and `param.main_grad` a view
    into `grad_data`; `param_range[param]` is its [start, end) in both buffers.
    """

    def __init__(self, params: list[nn.Parameter], *, grad_dtype: torch.dtype, dp_size: int,
                 bucket_size: int | None = DEFAULT_BUCKET_SIZE, param_dtype: torch.dtype | None = None):
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("ParamAndGradBuffer: no trainable parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("ParamAndGradBuffer: a parameter is listed twice")
        self.dp_size = dp_size
        self.params = params
        self.param_dtype = param_dtype or params[0].dtype
        self.grad_dtype = grad_dtype
        if any(p.dtype != self.param_dtype for p in params):
            raise ValueError(f"ParamAndGradBuffer: all params must be {self.param_dtype}, got "
                             f"{sorted({str(p.dtype) for p in params})}")
        limit = bucket_size if bucket_size and bucket_size > 0 else None
        self.buckets, self.param_range = self._layout(list(reversed(params)), limit)
        self.numel = self.buckets[-1].end
        self.numel_unpadded = sum(p.numel() for p in params)
        device = params[0].device
        self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_to_bucket: dict[nn.Parameter, Bucket] = {}
        for bucket in self.buckets:
            for p in bucket.params:
                self.param_to_bucket[p] = bucket
        with torch.no_grad():
            for p in params:
                view = self.param_view(p)
                view.copy_(p.data)
                p.data = view
                p.main_grad = self.grad_view(p)

    def _layout(self, ordered: list[nn.Parameter], limit: int | None):
        multiple = self.dp_size * ALIGN
        buckets: list[Bucket] = []
        ranges: dict[nn.Parameter, tuple[int, int]] = {}
        current = Bucket(0, 0, 0)
        offset = 0
        for p in ordered:
            ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
            current.params.append(p)
            if limit is not None and offset - current.start >= limit:
                current.end = _round_up(offset, multiple)
                buckets.append(current)
                offset = current.end
                current = Bucket(len(buckets), offset, offset)
        if current.params:
            current.end = _round_up(offset, multiple) if offset > current.start else current.start + multiple
            buckets.append(current)
        return buckets, ranges

    def param_view(self, p: nn.Parameter) -> torch.Tensor:
        start, end = self.param_range[p]
        return self.param_data[start:end].view(p.shape)

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        start, end = self.param_range[p]
        return self.grad_data[start:end].view(p.shape)

    def bucket_param_data(self, bucket: Bucket) -> torch.Tensor:
        return self.param_data[bucket.start:bucket.end]

    def bucket_grad_data(self, bucket: Bucket) -> torch.Tensor:
        return self.grad_data[bucket.start:bucket.end]

    def shard_pieces(self, dp_rank: int, shard_over_dp: bool = True):
        """Yield (param, lo, hi, offset_in_param) for every piece of a param inside this rank's shards.

        [lo, hi) is the piece's range in the buffers; offset_in_param its first element's flat offset in
        the parameter. Without sharding the "shard" is each whole bucket.
        """
        for bucket in self.buckets:
            s_lo, s_hi = bucket.shard_range(dp_rank, self.dp_size) if shard_over_dp else (bucket.start, bucket.end)
            for p in bucket.params:
                p_lo, p_hi = self.param_range[p]
                lo, hi = max(p_lo, s_lo), min(p_hi, s_hi)
                if lo < hi:
                    yield p, lo, hi, lo - p_lo

    def zero_grad(self) -> None:
        self.grad_data.zero_()
