"""Typed configuration: one dataclass per component, Megatron-LM's flag names, YAML files that mirror them.

    cfg = parse_config(sys.argv[1:])   # flags (and --config FILE.yaml) -> a validated Config

- sections.py: the dataclasses (every field a flag), FLAGS and aliases;
- parsing.py: command line and YAML, Megatron's other flags (megatron_flags.py), --bf16;
- checks.py: finalize(cfg), the consistency checks, what a resume compares;
- batch.py: training length and batch-size ramp-up in Megatron's arithmetic.

Precedence: dataclass default < `--config FILE.yaml` < command line. An unknown key, a bad value or an
inconsistent setting raises ConfigError with one line naming it.
"""

from .batch import DEFAULT_TRAIN_ITERS, global_batch_size_at, iterations_for_samples, rampup_batches, schedule_samples
from .checks import MODEL_SHAPE_FIELDS, TOKENIZER_TYPE_FLAGS, apply_checkpoint_args, finalize, resume_differences
from .parsing import MEGATRON_DEST, build_parser, config_from_values, load_yaml, megatron_extras, parse_config
from .sections import (
    ALIASES,
    FLAGS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    resolve_aliases,
)

__all__ = ["ALIASES", "DEFAULT_TRAIN_ITERS", "FLAGS", "MEGATRON_DEST", "MODEL_SHAPE_FIELDS", "TOKENIZER_TYPE_FLAGS",
           "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "TrainingConfig",
           "apply_checkpoint_args", "build_parser", "config_from_values", "finalize", "global_batch_size_at",
           "iterations_for_samples", "load_yaml", "megatron_extras", "parse_config", "rampup_batches",
           "resolve_aliases", "resume_differences", "schedule_samples"]
