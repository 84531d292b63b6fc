"""Stochastic-rounding AdamW: random stream, rounding, the reference step, and the optimizers built on them."""

from ..numerics.philox import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, STREAM_PARAM, SRKey, random_bits16
from .adamw_reference import AdamWConstants, Rounding, adamw_reference_, step_scalars
from .rounding import round_nearest_bf16, stochastic_round_bf16, stochastic_round_bf16_at

__all__ = [
    "AdamWConstants", "Rounding", "adamw_reference_", "step_scalars", "SRKey", "random_bits16",
    "STREAM_PARAM", "STREAM_EXP_AVG", "STREAM_EXP_AVG_SQ",
    "round_nearest_bf16", "stochastic_round_bf16", "stochastic_round_bf16_at",
]
