"""Megatron-LM's flags that are not settings of this project: accepted implementation choices and refusals.

A Megatron GPT launch script runs here with Megatron's meaning or stops with one line. Every flag of
Megatron-LM's GPT pretraining (megatron_flags.tsv, read from Megatron's own parser) is in one class:

1. honoured: a field of megatron_sr/config (sections.py), with Megatron's name, meaning and default (a few
   translations below, TRANSLATED, map a Megatron spelling onto such a field);
2. accepted: ACCEPTED below, implementation choices whose effect this code base covers another way; the
   start-up log says once what runs instead;
3. refused: every other Megatron flag, a one-line error naming it. A refused flag given its neutral
   value (Megatron's own default, or a value in NEUTRAL) changes nothing and is accepted, with a log note.

docs/megatron_flags.md is the table of all of them (tools/megatron_flag_table.py writes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TABLE = Path(__file__).with_name("megatron_flags.tsv")

_FUSIONS = "no fused kernel of its own: torch.compile fuses these element-wise operations (--torch-compile)"
_CKPT = ("checkpoints are megatron-sr's own --ckpt-format torch (one shard per rank, written atomically by every "
         "rank, resharded on load to any tp/pp/dp)")

# flag -> what runs instead (class 2)
ACCEPTED: dict[str, str] = {
    "--use-mcore-models": "megatron-sr's GPT (megatron_sr/model), the only model implementation",
    "--use-legacy-models": "megatron-sr's GPT (megatron_sr/model), the only model implementation",
    "--transformer-impl": "PyTorch layers (megatron_sr/model, megatron_sr/parallel); no Transformer Engine",
    "--attention-backend": "torch's scaled_dot_product_attention (flash or memory-efficient kernels on CUDA)",
    "--use-flash-attn": "torch's scaled_dot_product_attention, whose flash kernel runs where it applies",
    "--attention-softmax-in-fp32": "scaled_dot_product_attention accumulates the softmax in FP32",
    "--apply-query-key-layer-scaling": "no query-key layer scaling (Megatron applies it in FP16 only)",
    "--no-gradient-accumulation-fusion": "gradients are accumulated into DDP's buffer by hooks (no fused "
                                         "weight-gradient kernel)",
    "--cross-entropy-loss-fusion": "the chunked LM head + cross entropy (--loss-chunk-tokens), never the whole "
                                   "logits",
    "--cross-entropy-fusion-impl": "the chunked LM head + cross entropy (--loss-chunk-tokens)",
    "--no-masked-softmax-fusion": _FUSIONS,
    "--no-bias-gelu-fusion": _FUSIONS,
    "--no-bias-swiglu-fusion": _FUSIONS,
    "--no-bias-dropout-fusion": _FUSIONS,
    "--no-rope-fusion": _FUSIONS,
    "--no-persist-layer-norm": "torch's LayerNorm/RMSNorm kernels",
    "--deterministic-mode": "runs repeat bitwise on the CPU and for one layout (counter-based SR stream, seeded "
                            "dropout); torch.use_deterministic_algorithms is not switched on",
    "--async-save": "checkpoints are written synchronously (staged, then renamed into place)",
    "--ckpt-fully-parallel-save": _CKPT,
    "--no-ckpt-fully-parallel-save": _CKPT,
    "--ckpt-fully-parallel-load": _CKPT,
    "--ckpt-assume-constant-structure": _CKPT,
    "--dist-ckpt-strictness": _CKPT + "; a missing or unexpected tensor is always an error",
    "--auto-detect-ckpt-format": "the checkpoint format is always read from its files",
    "--no-async-tensor-model-parallel-allreduce": "the tensor-parallel all-reduces are synchronous autograd "
                                                  "functions (megatron_sr/parallel/mappings.py)",
    "--tp-comm-overlap": "tensor-parallel communication is not overlapped with the GEMMs",
    "--use-cpu-initialization": "the model is built and initialised on its device from layout-independent "
                                "generators (same weights at any layout)",
    "--no-create-attention-mask-in-dataloader": "the causal mask lives inside scaled_dot_product_attention, "
                                                "never materialised",
    "--no-mmap-bin-files": "the .bin files are always memory-mapped (numpy.memmap)",
    "--local-rank": "the device comes from torchrun's LOCAL_RANK environment variable",
    "--manual-gc": "Python's garbage collector runs as it does by default",
    "--manual-gc-interval": "Python's garbage collector runs as it does by default",
    "--no-check-for-nan-in-loss-and-grad": "an iteration with NaN/Inf gradients is skipped on every rank "
                                           "(--max-consecutive-skips stops the run)",
    "--initial-loss-scale": "no loss scaling: BF16 needs none (Megatron scales FP16 only; --fp16 is refused)",
    "--min-loss-scale": "no loss scaling: BF16 needs none (Megatron scales FP16 only; --fp16 is refused)",
    "--loss-scale-window": "no loss scaling: BF16 needs none (Megatron scales FP16 only; --fp16 is refused)",
    "--hysteresis": "no loss scaling: BF16 needs none (Megatron scales FP16 only; --fp16 is refused)",
    "--logging-level": "log lines are printed by rank 0 (megatron_sr/training/observer.py)",
    "--no-one-logger": "no one-logger telemetry",
    "--one-logger-project": "no one-logger telemetry",
    "--one-logger-run-name": "no one-logger telemetry",
    "--one-logger-async": "no one-logger telemetry",
    "--app-tag-run-name": "no one-logger telemetry",
    "--app-tag-run-version": "no one-logger telemetry",
    "--log-progress": "the log line holds the iteration, consumed samples and elapsed time",
}

# Megatron flags that are spellings of this project's settings (class 1): flag -> (field, value, note)
TRANSLATED: dict[str, tuple[str, object, str]] = {
    "--use-rotary-position-embeddings": ("position_embedding_type", "rope",
                                         "Megatron's old spelling of --position-embedding-type rope"),
    "--no-position-embedding": ("position_embedding_type", "none",
                                "Megatron's old spelling of --position-embedding-type none"),
}

# values that change nothing besides Megatron's own default: flag -> accepted values (strings as typed)
NEUTRAL: dict[str, tuple[str, ...]] = {
    "--context-parallel-size": ("1",),
    "--expert-model-parallel-size": ("1",),
    "--expert-tensor-parallel-size": ("1",),
    "--dataloader-type": ("single",),
    "--rerun-mode": ("disabled",),
    "--main-grads-dtype": ("fp32",),
    "--empty-unused-memory-level": ("0",),
    "--rotary-percent": ("1.0", "1"),
}

# refusals with a reason of their own: flag prefix -> what is not built
_REFUSAL_PREFIXES: list[tuple[str, str]] = [
    ("--fp16", "FP16 mixed precision (use --bf16 for BF16 mixed precision or --precision bf16-sr for stochastic "
               "rounding)"),
    ("--loss-scale", "a constant loss scale (BF16 needs no loss scaling)"),
    ("--fp8", "FP8 training"), ("--fp4", "FP4 training"),
    ("--num-layers-per-virtual-pipeline-stage", "the interleaved (virtual-pipeline) 1F1B schedule"),
    ("--num-virtual-stages-per-pipeline-rank", "the interleaved (virtual-pipeline) 1F1B schedule"),
    ("--context-parallel", "context parallelism (above 1)"), ("--cp-comm", "context parallelism"),
    ("--expert", "expert parallelism (above 1)"), ("--moe", "mixture of experts"),
    ("--num-experts", "mixture of experts"), ("--multi-latent-attention", "multi-latent attention (MLA)"),
    ("--q-lora-rank", "multi-latent attention (MLA)"), ("--kv-lora-rank", "multi-latent attention (MLA)"),
    ("--fim", "fill-in-the-middle data"), ("--retro", "RETRO"), ("--use-torch-fsdp2", "FSDP"),
    ("--use-custom-fsdp", "FSDP"), ("--use-megatron-fsdp", "FSDP"), ("--data-parallel-sharding-strategy", "FSDP"),
    ("--inference", "Megatron's inference engine (tools/generate.py generates from a checkpoint)"),
    ("--optimizer-cpu-offload", "optimizer CPU offload"), ("--yaml-cfg", "Megatron's YAML config (use --config)"),
    ("--spec", "custom layer specs"), ("--heterogeneous", "heterogeneous layers"),
    ("--hybrid", "hybrid (Mamba) models"), ("--mamba", "Mamba layers"), ("--mtp", "multi-token prediction"),
]
_GROUP_REASONS = {"vision": "vision models", "biencoder": "biencoder models", "rl": "reinforcement learning",
                  "sft": "supervised fine-tuning data", "moe": "mixture of experts", "mla": "multi-latent attention",
                  "retro": "RETRO", "inference": "Megatron's inference engine",
                  "In-process restart": "in-process restart", "ft_package": "the fault-tolerance package",
                  "straggler": "the straggler detector", "workload inspector": "the workload inspector",
                  "msc": "the multi-storage client", "autoresume": "ADLR autoresume",
                  "rerun engine": "the re-run engine", "experimental": "Megatron's experimental features",
                  "pretrain_gpt.py (conditional)": "model optimisation (modelopt)",
                  "kitchen (conditional)": "kitchen quantization recipes"}


@dataclass(frozen=True)
class MegatronFlag:
    name: str
    kind: str  # "switch" (no value), "value" (one) or "list" (several)
    default: str  # Megatron's default as JSON (or its source text), "-" for a switch
    group: str  # Megatron's argument group


@cache
def megatron_flags() -> dict[str, MegatronFlag]:
    """Every flag of Megatron-LM's GPT pretraining parser, from megatron_flags.tsv."""
    out = {}
    for line in TABLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind, default, group = line.split("\t")
            out[name] = MegatronFlag(name, kind, default, group)
    return out


def refusal_reason(flag: MegatronFlag) -> str:
    for prefix, reason in _REFUSAL_PREFIXES:
        if flag.name.startswith(prefix):
            return reason
    return _GROUP_REASONS.get(flag.group, f"Megatron's {flag.name} ({flag.group} options)")


def _megatron_default(flag: MegatronFlag) -> list[str]:
    """Megatron's default spelled as a command line would give it (empty when it is not a literal)."""
    try:
        value = json.loads(flag.default)
    except ValueError:
        return []
    if value is None or isinstance(value, (dict, bool)):
        return []
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values]


def is_neutral(flag: MegatronFlag, given: list[str]) -> bool:
    if flag.kind == "switch":
        return False
    if given == _megatron_default(flag):
        return True
    if len(given) == 1 and given[0] in NEUTRAL.get(flag.name, ()):
        return True
    try:  # 1 and 1.0, 1e-05 and 0.00001
        return [float(g) for g in given] == [float(d) for d in _megatron_default(flag)] != []
    except ValueError:
        return False


def classify(name: str, given: list[str] | bool) -> tuple[str, str]:
    """("accepted", note) or ("refused", one-line error) for a Megatron flag this project has no field for.
    `given`: the values on the command line (True for a switch)."""
    flag = megatron_flags()[name]
    values = [] if given is True else [str(v) for v in given]
    shown = name if not values else f"{name} {' '.join(values)}"
    if name in ACCEPTED:
        return "accepted", f"{shown}: accepted; {ACCEPTED[name]}"
    if is_neutral(flag, values):
        return "accepted", f"{shown}: Megatron's default, nothing to change"
    return "refused", f"{shown}: {refusal_reason(flag)} is not supported by megatron-sr"


# honoured flags whose default differs from Megatron's on purpose: flag -> why (tools/megatron_flag_table.py
# fails on a difference missing here)
_REQUIRED = ("Megatron requires it (no default); here it defaults to GPT-2 small's shape and a short run, so "
             "that a command needs only what it changes")
DEFAULT_DIFFERENCES: dict[str, str] = {
    "--num-layers": _REQUIRED, "--hidden-size": _REQUIRED, "--num-attention-heads": _REQUIRED,
    "--seq-length": _REQUIRED, "--micro-batch-size": _REQUIRED, "--lr": _REQUIRED,
    "--split": "Megatron leaves it unset and then uses 969,30,1 when no per-split data paths are given; the "
               "same value is written out here",
    "--ckpt-format": "torch_dist is Megatron's distributed-checkpoint package, not built here; torch (Megatron's "
                     "iter_*/mp_rank_* names) is the one format megatron-sr reads and writes",
    "--distributed-backend": "Megatron's nccl cannot run on a CPU; unset picks nccl on CUDA and gloo on the CPU",
    "--num-workers": "the memory-mapped datasets index in microseconds; worker processes cost more start-up "
                     "and memory than they save on the small CPU machines the tests and quick start use",
    "--num-query-groups": "unset means Megatron's 1 under --group-query-attention (and is refused without it)",
    "--wandb-project": "unset either way (Megatron's empty string)",
    "--wandb-exp-name": "unset either way (Megatron's empty string)",
    "--wandb-save-dir": "unset either way (Megatron's empty string)",
    "--wandb-entity": "unset either way (Megatron's empty string)",
}
