"""The precision modes: for each, the dtypes of parameters, gradients and optimizer states, and the rounding.

This table is the only place these rules live; the config, the model, both optimizers, the data-parallel
buffers and the memory benchmark read it.

| mode     | params | grads            | Adam states      | FP32 master | write-back of the update |
|----------|--------|------------------|------------------|-------------|--------------------------|
| bf16-sr  | BF16   | --grad-dtype     | --optimizer-state-dtype | no   | stochastic rounding      |
| bf16     | BF16   | --grad-dtype     | --optimizer-state-dtype | no   | round to nearest         |
| bf16-mp  | BF16   | FP32 (main grad) | FP32             | yes         | on the master; params = nearest BF16 of it |
| fp32     | FP32   | FP32             | FP32             | no          | none (FP32 throughout)   |

--grad-dtype and --optimizer-state-dtype default to bf16 and fp32; they are settable only where the
table says so (config.finalize refuses them elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the names flags use -> torch dtypes


@dataclass(frozen=True)
class Precision:
    name: str
    params: str  # "bf16" or "fp32"
    rounding: str  # the optimizer's write-back of BF16 tensors: "stochastic" or "nearest"
    fp32_master: bool  # the update runs on an FP32 copy of the params (Megatron's mixed precision)
    dtypes_settable: bool  # --grad-dtype / --optimizer-state-dtype apply (else FP32 grads and states)

    @property
    def param_dtype(self) -> torch.dtype:
        return DTYPES[self.params]

    def grad_dtype(self, requested: str = "bf16") -> torch.dtype:
        """The dtype gradients are accumulated and reduced in."""
        return DTYPES[requested] if self.dtypes_settable else torch.float32

    def state_dtype(self, requested: str = "fp32") -> torch.dtype:
        """The dtype of Adam's m and v."""
        return DTYPES[requested] if self.dtypes_settable else torch.float32


MODES = {p.name: p for p in (
    Precision("bf16-sr", "bf16", "stochastic", fp32_master=False, dtypes_settable=True),
    Precision("bf16-mp", "bf16", "nearest", fp32_master=True, dtypes_settable=False),
    Precision("bf16", "bf16", "nearest", fp32_master=False, dtypes_settable=True),
    Precision("fp32", "fp32", "nearest", fp32_master=False, dtypes_settable=False),
)}
PRECISIONS = tuple(MODES)


def precision_mode(name: str) -> Precision:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None
