"""The GPT model, built from megatron_sr.parallel.layers so tensor parallelism can be swapped in underneath."""

from .gpt import GPTModel, build_model_chunks, padded_vocab_size, stage_layer_range
from .init import init_method_for

__all__ = ["GPTModel", "build_model_chunks", "padded_vocab_size", "stage_layer_range", "init_method_for"]
