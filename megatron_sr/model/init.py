"""Layout-independent initialisation: a parameter's full initial value depends only on (seed, global name).

Each weight is drawn from its own generator seeded by a stable hash of the seed and the parameter's
global name (layer numbers counted over the whole model), so a pipeline stage, a tensor-parallel
slice or a single process all start from the same numbers. The generator lives on the device of the
tensor being filled: a model built on a GPU draws there (a 13B model initialises in seconds, not the
minutes a CPU takes), with numbers that differ from a CPU-built model's but not between GPU layouts.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch


def stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_method_for(seed: int, name: str, std: float) -> Callable[[torch.Tensor], None]:
    """init_method(full_tensor): normal(0, std) from the generator of (seed, name)."""

    def init(full: torch.Tensor) -> None:
        gen = torch.Generator(device=full.device).manual_seed(stable_seed(seed, name))
        with torch.no_grad():
            full.normal_(0.0, std, generator=gen)

    return init


def output_layer_std(std: float, num_layers: int) -> float:
    """Megatron's scaled init for the projections that write into the residual stream."""
    return std / math.sqrt(2.0 * num_layers)
