"""megatron-sr: Megatron-style GPT pretraining with BF16-only parameters and stochastic-rounding AdamW."""

__version__ = "0.1.0"
