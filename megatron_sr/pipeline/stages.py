"""Which global transformer layers a pipeline stage holds."""

from __future__ import annotations


def stage_layer_range(num_layers: int, pipeline_size: int, pipeline_rank: int) -> range:
    """Global layer numbers of one stage: an even split, an error when it does not divide."""
    if pipeline_size < 1 or not 0 <= pipeline_rank < pipeline_size:
        raise ValueError(f"pipeline rank {pipeline_rank} is outside a pipeline of size {pipeline_size}")
    if num_layers % pipeline_size:
        raise ValueError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                         f"{pipeline_size}: layers are split evenly over pipeline stages")
    per_stage = num_layers // pipeline_size
    return range(pipeline_rank * per_stage, (pipeline_rank + 1) * per_stage)
