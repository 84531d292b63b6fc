#!/usr/bin/env python3
"""Peak memory per GPU of a pretrain_gpt.py configuration, computed without a GPU.

    python3 tools/estimate_memory.py [pretrain_gpt.py flags] [--world-size N] [--fit GIB | --largest GIB] [--json]

The flags are pretrain_gpt.py's (`megatron_sr.config.parse_config`; `--mock-data` is added when there
is no `--data-path`). `--world-size` (default tp x pp) sets the data-parallel size dp = world / (tp x pp).
The loss is model/lm_loss.py's chunked LM head, `--loss-chunk-tokens` tokens at a time (0 = one chunk);
the plain [tokens, vocab] logits are modelled too (`Dims.chunked_loss=False`), as the tests compare them.
Default: the breakdown of the configuration, then the same configuration in each precision mode.
`--fit GIB`: per precision mode, the largest micro-batch and the least recompute that fit in GIB.
`--largest GIB`: per precision mode, the largest GPT of the family below that trains in GIB
(micro-batch 1, full recompute allowed).

Model states (exact: they equal the real tensors' `memory_bytes()`)
- World size 1 (SRAdamW, one tensor per parameter): params N x param bytes; grads N x grad bytes
  (p.grad, or the FP32 main grads of bf16-mp / --grad-dtype fp32); states 2 N x state bytes (+ 4 N FP32
  master in bf16-mp).
- World size > 1 (DDP + DistributedOptimizer): the stage's parameters in backward order, cut into
  buckets of --ddp-bucket-size elements (whole parameters), each padded to a multiple of dp x ALIGN,
  as param_and_grad_buffer.py lays them out. Params and grads are the padded buffers; states cover
  the real elements of this rank's shard of every bucket (--use-distributed-optimizer) or all N
  elements (without it). Reported for dp rank 0, the largest: padding sits at each bucket's end, so
  later ranks' shards hold at most as many real elements. Pipeline: every stage is computed and the
  worst stage (largest total) is reported.

Activations per micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", adapted to this implementation). The paper's layer keeps s b h (34 + 5 a s / h) bytes
in 16-bit, (34 + 5 a s / h) / t with tp t and sequence parallelism. Here each term is what torch's autograd
keeps for backward, tensor by tensor. Notation: T = b s tokens of a micro-batch; Ts = T / t under
--sequence-parallel, else T; e = activation bytes (2 BF16, 4 FP32); t = tp; f = ffn; d = h / a; Vt =
padded vocabulary / t; stat = bytes of a LayerNorm mean/rstd element (CUDA 4; CPU e: CPU layer_norm keeps
them in the input dtype); mask = bytes of a dropout-mask element (CUDA 1, a bool; CPU e: CPU dropout
multiplies by a noise tensor of the input dtype). p = 0 dropout saves nothing.

| one layer, no recompute    | bytes                          | note |
|----------------------------|--------------------------------|------|
| input LayerNorm            | Ts h e + 2 Ts stat             | input, mean, rstd |
| QKV GEMM input             | T h e                          | the LN output (under sp its all-gathered copy) |
| q, k, v                    | 3 T h e / t                    | SDPA's inputs: views of the QKV GEMM output [1] |
| RoPE                       | 2 T h e / t + 4 b s d 4        | rotated q, k [1]; FP32 cos and sin for each |
| core, flash                | T h e / t + b (a/t) s 4        | output, FP32 logsumexp [2] |
| core, memory-efficient     | T h e / t + b (a/t) s32 4      | logsumexp padded to 32 tokens (CUDA FP32) |
| core, math (CPU, p > 0)    | 3 T h 4/t + 3 b (a/t) s^2 4 + T h e/t | FP32 q k v, softmax, noise, dropped [3] |
| dropout after attention    | Ts h mask                      | |
| pre-MLP LayerNorm          | Ts h e + 2 Ts stat             | |
| fc1 input                  | T h e                          | the LN output (gathered under sp; twice with SwiGLU) |
| GELU(tanh) MLP             | 2 T f e / t                    | GELU input, fc2 input |
| SwiGLU MLP                 | 4 T f e / t                    | gate (SiLU input), SiLU output, value, fc2 input |
| dropout after the MLP      | Ts h mask                      | |

[1] Not kept on the math path (it makes FP32 copies) unless selective recompute keeps them as the
    checkpoint's inputs. [2] The output-projection input is a view of it. No a s^2 scores: flash (CUDA
    BF16, the CPU at attention dropout 0) replays its dropout from a Philox seed. [3] The output-projection
    input is then a copy. The paper's 34 = 2 + 2 + 6 + 2 + 1 + 2 + 2 + 8 + 8 + 1 at e = 2, f = 4 h, mask 1 B;
    its 5 a s / h is the score matrices of the math path, which flash attention does not store.

| other terms (a micro-batch, one stage) | bytes                                                    |
|----------------------------------------|----------------------------------------------------------|
| selective recompute                    | the layer minus the core's saved tensors but its inputs [4] |
| full uniform n                         | ceil(Ls / n) group inputs Ts h e (+ a group's layers in its backward) |
| full block n                           | n layer inputs Ts h e + (Ls - n) layers [8]              |
| full recompute: position ids           | s 8, once per stage (the checkpoint saves its inputs)    |
| embeddings (first stage)               | token ids T 8 (+ vocab mask T, tp > 1), position ids s 8, dropout T h mask |
| final LN + LM-head input (last stage)  | Ts h e + 2 Ts stat + T h e                               |
| loss saved, plain logits               | FP32 log-softmax (tp > 1: softmax) T Vt 4, target T 8, tp > 1 mask T |
| loss saved, chunked (lm_loss.py)       | FP32 max and normaliser 2 T 4 (tp > 1: 3 T 4), labels T 8 |
| the trainer's loss mask                | T 4 (+ 4)                                                |
| logits transient, plain                | forward T Vt (e + 4 copy) [+ 4, tp > 1]; backward 2 FP32 T Vt [5] |
| logits transient, chunked, C tokens    | C Vt max(e + 4, 8); backward T h e + C Vt (2 e + 4) + Vt h 4 [6] |
| backward working set                   | 2 Ts h e + 2 T f e / t (3 with SwiGLU) + largest weight grad [7] |
| pipeline 1F1B                          | stage r keeps min(pp - r, micro-batches) (+ outputs Ts h e) [9] |

[4] Flash: q, k, v and the output stay (the projection saves the output), the logsumexp goes; math: the
    FP32 copies and scores go, q, k, v stay. [5] tp > 1: the softmax clone and its cast. [6] + on CUDA
    the BF16 chunk weight-GEMM and its FP32 cast, Vt h (e + 4). [7] With tied embeddings on one stage,
    the LM head's contribution to the embedding grad, Vt h e, held by autograd to the end of backward.
    [8] A checkpointed layer is recomputed after the other layers were freed. [9] The schedule holds each
    micro-batch's stage output (not on the last stage); stage 0 holds the most micro-batches.

Peak activations = (in flight - 1) x (saved + stage output) + the largest phase of the current micro-batch
(forward end, loss forward, loss backward, LM-head backward, layer backward, recompute); the part due to
the loss phases is reported as logits / loss. Peak = params + grads + states + max(peak activations, the
optimizer step's FP32 copies of BF16 gradients: a piece's for the norm, a clipped tensor's twice)
+ allowance. The allowance is not measured: --context-gib (CUDA context, cuBLAS/cuBLASLt workspaces,
kernels; default 1.0) + --nccl-gib when world size > 1 (communicator buffers; default 0.5)
+ --fragmentation x peak activations (caching-allocator fragmentation of the per-step traffic; default 0.1).

`--device-profile cpu` computes the activations as the CPU saves them (what tests/test_estimate_memory.py
compares against the tensors autograd saves; BF16 there without model/cpu_bf16.py's FP32-GEMM mode, which
saves FP32 copies of the GEMM operands, a CPU-only artefact).

--largest family: hidden h, L layers, h / 128 heads, ffn 4 h, sequence and vocabulary from the flags
(other flags - tied embeddings, RoPE, SwiGLU with ffn 4 h, dropout, layout - as given). The shapes
scanned are GPT-3's table (Brown et al. 2020: 125M .. 175B, with 5120 for 13B's 5140) and Megatron's
(Narayanan et al. 2021: 1.7B .. 1T); then L is scaled at fixed h between the largest fitting row and
the next row (at both widths), in steps of pp.
--fit micro-batches: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5 x powers of two); with an
explicit --global-batch-size only those dividing it per dp rank. Recompute, least to most:
none < selective < full block 1 < ... < full block Ls - 1 < full uniform 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator

from megatron_sr.config import Config, ConfigError, build_parser, load_yaml, parse_config
from megatron_sr.distributed.param_and_grad_buffer import ALIGN, DEFAULT_BUCKET_SIZE
from megatron_sr.model.gpt import padded_vocab_size
from megatron_sr.precision import precision_mode

GIB = 1024 ** 3
BYTES = {"fp32": 4, "bf16": 2}


class EstimateError(ValueError):
    """A one-line error naming the flag at fault."""


# ---------------------------------------------------------------------------------------------------
# The configuration, reduced to the numbers the formulas read
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    vocab: int  # before padding
    vocab_divisible_by: int
    max_positions: int
    rope: bool
    swiglu: bool
    bias: bool
    tied: bool
    hidden_dropout: float
    attention_dropout: float
    tp: int
    pp: int
    world_size: int
    sequence_parallel: bool
    micro_batch: int
    num_microbatches: int
    recompute: str  # "none", "selective", "uniform" or "block"
    recompute_layers: int  # n of uniform / block
    precision: str
    grad_dtype: str  # the flag (applies where the precision table lets it)
    state_dtype: str
    distributed_optimizer: bool
    bucket_size: int
    clip_grad: float = 1.0
    loss_chunk_tokens: int = 0
    chunked_loss: bool = False  # lm_loss.py's chunked LM head (else the plain logits + cross entropy)
    # parameter shapes of --group-query-attention, --kv-channels, --normalization, --position-embedding-type
    # (the activation terms above are those of full multi-head attention with LayerNorm)
    query_groups: int = 0  # 0: one per head
    head_dim: int = 0  # 0: hidden / heads
    norm_bias: bool = True  # LayerNorm; RMSNorm has a weight only
    position_table: bool = True  # learned_absolute; rope and none have no position parameters

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def layers_per_stage(self) -> int:
        return self.layers // self.pp

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.vocab, self.vocab_divisible_by, self.tp)

    @property
    def act_bytes(self) -> int:
        """Activations are in the parameter dtype (BF16, or FP32 in fp32 mode)."""
        return BYTES[precision_mode(self.precision).params]

    def byte_sizes(self) -> tuple[int, int, int]:
        """(param, grad, state) bytes per element, from the precision table."""
        mode = precision_mode(self.precision)
        size = {"torch.float32": 4, "torch.bfloat16": 2}
        return (size[str(mode.param_dtype)], size[str(mode.grad_dtype(self.grad_dtype))],
                size[str(mode.state_dtype(self.state_dtype))])


def _recompute(m) -> tuple[str, int]:
    granularity = m.recompute_granularity or ("selective" if m.recompute_activations else None)
    if granularity == "full":
        return m.recompute_method, m.recompute_num_layers
    return granularity or "none", 0


def dims_from_config(cfg: Config, world_size: int, loss_chunk_tokens: int | None = None) -> Dims:
    """The numbers of `cfg` at `world_size`; `loss_chunk_tokens` overrides the config's."""
    m, o, t, p = cfg.model, cfg.optimizer, cfg.training, cfg.parallel
    if m.ffn_hidden_size % p.tensor_model_parallel_size:
        raise EstimateError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
                            f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    method, n = _recompute(m)
    if loss_chunk_tokens is None:
        loss_chunk_tokens = m.loss_chunk_tokens
    return Dims(
        layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, ffn=m.ffn_hidden_size,
        seq=m.seq_length, vocab=m.vocab_size, vocab_divisible_by=m.make_vocab_size_divisible_by,
        max_positions=m.max_position_embeddings, rope=m.position_embedding_type == "rope", swiglu=m.swiglu,
        bias=not m.disable_bias_linear, tied=not m.untie_embeddings_and_output_weights,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, world_size=world_size,
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        micro_batch=t.micro_batch_size, num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        recompute=method, recompute_layers=n or 0, precision=o.precision, grad_dtype=o.grad_dtype,
        state_dtype=o.optimizer_state_dtype, distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=p.ddp_bucket_size or DEFAULT_BUCKET_SIZE, clip_grad=o.clip_grad,
        loss_chunk_tokens=loss_chunk_tokens, chunked_loss=True, head_dim=m.head_dim,
        query_groups=m.query_groups if m.group_query_attention else 0,
        norm_bias=m.normalization == "LayerNorm", position_table=m.position_embedding_type == "learned_absolute")


@contextlib.contextmanager
def world_size_env(world_size: int) -> Iterator[None]:
    """config.ParallelConfig reads WORLD_SIZE from the environment; set it for parse_config only."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def _given_settings(argv: list[str]) -> dict:
    """The flags (and YAML keys) the user set, without defaults: for --mock-data and --global-batch-size."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    return values


def config_from_argv(argv: list[str], world_size: int | None = None,
                     family: bool = False) -> tuple[Config, int, bool]:
    """(Config, world size, whether --global-batch-size was given) for pretrain_gpt.py's flags.

    `family` (--largest): the shape comes from the family, so a shape the layout accepts stands in for
    the defaults (12 heads would not divide by tp 8); flags given on the command line still win.
    """
    given = _given_settings(argv)
    if family:
        tp, pp = (int(given.get(f"{k}_model_parallel_size", 1)) for k in ("tensor", "pipeline"))
        argv = ["--num-layers", str(pp), "--hidden-size", str(128 * tp), "--num-attention-heads", str(tp), *argv]
    if not given.get("data_path") and not given.get("mock_data"):
        argv = [*argv, "--mock-data"]  # the data never changes the memory; only the vocabulary does
    if world_size is None:
        world_size = (int(given.get("tensor_model_parallel_size", 1))
                      * int(given.get("pipeline_model_parallel_size", 1)))
    if world_size < 1:
        raise EstimateError(f"--world-size must be positive, got {world_size}")
    with world_size_env(world_size):
        cfg = parse_config(argv)
    if cfg.model.vocab_size is None:  # --data-path with --tokenizer-model: the tokenizer's size, as the trainer
        from megatron_sr.training.setup import build_tokenizer

        build_tokenizer(cfg)
    return cfg, world_size, "global_batch_size" in given


# ---------------------------------------------------------------------------------------------------
# Parameters and model states
# ---------------------------------------------------------------------------------------------------

def stage_params(d: Dims, pp_rank: int, *, unsharded: bool = False) -> list[tuple[str, int]]:
    """(name, numel) of the stage's parameters in model.parameters() order, this tp rank's slices.

    `unsharded`: the whole model on one stage without tp slices (the vocabulary still padded for tp).
    """
    h, t = d.hidden, 1 if unsharded else d.tp
    first, last = unsharded or pp_rank == 0, unsharded or pp_rank == d.pp - 1
    vocab = d.padded_vocab // t
    out: list[tuple[str, int]] = []
    if first:
        out.append(("embedding.word_embeddings.weight", vocab * h))
        if d.position_table:
            out.append(("embedding.position_embeddings.weight", d.max_positions * h))
    mlp = ["linear_fc1", "linear_fc1_gate", "linear_fc2"] if d.swiglu else ["linear_fc1", "linear_fc2"]
    head_dim, groups = d.head_dim or h // d.heads, d.query_groups or d.heads
    qkv, proj = (d.heads + 2 * groups) * head_dim, d.heads * head_dim  # rows of the fused qkv; proj inputs

    def norm(name: str) -> list[tuple[str, int]]:
        return [(name + ".weight", h)] + ([(name + ".bias", h)] if d.norm_bias else [])

    for i in range(d.layers if unsharded else d.layers_per_stage):
        pre = f"decoder.{i}."
        out += norm(pre + "input_layernorm")
        out.append((pre + "self_attention.linear_qkv.weight", qkv // t * h))
        out += [(pre + "self_attention.linear_qkv.bias", qkv // t)] if d.bias else []
        out.append((pre + "self_attention.linear_proj.weight", h * (proj // t)))
        out += [(pre + "self_attention.linear_proj.bias", h)] if d.bias else []
        out += norm(pre + "pre_mlp_layernorm")
        for name in mlp:
            column = name != "linear_fc2"
            out.append((f"{pre}mlp.{name}.weight", d.ffn // t * h))
            out += [(f"{pre}mlp.{name}.bias", d.ffn // t if column else h)] if d.bias else []
    if last:
        out += norm("final_layernorm")
        if not d.tied or not first:  # untied, or the last stage's copy of the tied embedding
            out.append(("output_layer.weight", vocab * h))
    return out


def num_parameters(d: Dims) -> int:
    """Parameters of the whole model (a tied embedding once)."""
    return sum(n for _, n in stage_params(d, 0, unsharded=True))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def bucket_layout(numels: list[int], dp: int, bucket_size: int | None):
    """As ParamAndGradBuffer._layout: ([(start, end of real elements, padded end)] per bucket, and per
    parameter in backward order (start, end, bucket index)). `numels` in model order."""
    multiple = dp * ALIGN
    limit = bucket_size if bucket_size and bucket_size > 0 else None
    buckets: list[tuple[int, int, int]] = []
    ranges: list[tuple[int, int, int]] = []
    start = offset = 0
    count = 0
    for n in reversed(numels):
        ranges.append((offset, offset + n, len(buckets)))
        offset += n
        count += 1
        if limit is not None and offset - start >= limit:
            end = _round_up(offset, multiple)
            buckets.append((start, offset, end))
            start = offset = end
            count = 0
    if count:
        buckets.append((start, offset, _round_up(offset, multiple) if offset > start else start + multiple))
    return buckets, ranges


def model_state_bytes(d: Dims, pp_rank: int = 0, dp_rank: int = 0) -> dict[str, int]:
    """Bytes of params, grads and optimizer states (FP32 master included) on one rank: memory_bytes()'s keys,
    plus `step_transient`: what the optimizer step allocates for a while (FP32 copies of BF16 gradients:
    one piece's for the norm, then one clipped tensor's twice, its .float() and the product)."""
    numels = [n for _, n in stage_params(d, pp_rank)]
    pe, ge, se = d.byte_sizes()
    master = 4 if precision_mode(d.precision).fp32_master else 0
    total = sum(numels)
    if d.world_size == 1:  # SRAdamW: one tensor per parameter
        pieces = clipped = numels
        padded = owned = total
    else:
        buckets, ranges = bucket_layout(numels, d.dp, d.bucket_size)
        padded = buckets[-1][2]
        shards = [_shard(b, dp_rank, d.dp) if d.distributed_optimizer else (b[0], b[2]) for b in buckets]
        pieces = [max(0, min(hi, shards[i][1]) - max(lo, shards[i][0])) for lo, hi, i in ranges]
        clipped = [hi - lo for lo, hi in shards]
        owned = sum(pieces)
    step = 0 if ge == 4 else max(4 * max(pieces), 8 * max(clipped) if d.clip_grad > 0 else 0)
    return {"params": padded * pe, "grads": padded * ge, "optimizer_states": owned * (2 * se + master),
            "num_params": total, "step_transient": step}


def _shard(bucket: tuple[int, int, int], dp_rank: int, dp: int) -> tuple[int, int]:
    """Bucket.shard_range: rank dp_rank's equal piece of the padded bucket."""
    size = (bucket[2] - bucket[0]) // dp
    lo = bucket[0] + dp_rank * size
    return lo, lo + size


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """How the device stores what autograd saves (see the module docstring)."""

    name: str  # "cuda" or "cpu"

    def stat_bytes(self, d: Dims) -> int:
        return 4 if self.name == "cuda" else d.act_bytes

    def mask_bytes(self, d: Dims) -> int:
        return 1 if self.name == "cuda" else d.act_bytes

    def attention(self, d: Dims) -> str:
        if self.name == "cuda":
            return "flash" if d.act_bytes == 2 else "mem_efficient"
        return "math" if d.attention_dropout > 0 else "flash"


CUDA, CPU = Profile("cuda"), Profile("cpu")


def _tokens(d: Dims) -> tuple[int, int]:
    """(T, Ts): tokens of a micro-batch, and those a tp rank holds outside the tp regions."""
    t = d.micro_batch * d.seq
    return t, t // d.tp if d.sequence_parallel else t


def layer_terms(d: Dims, prof: Profile = CUDA, selective: bool = False) -> dict[str, int]:
    """Bytes one transformer layer saves for backward (no full recompute), by term."""
    T, Ts = _tokens(d)
    h, t, e, f = d.hidden, d.tp, d.act_bytes, d.ffn
    heads, head_dim, stat, mask = d.heads // t, d.hidden // d.heads, prof.stat_bytes(d), prof.mask_bytes(d)
    path = prof.attention(d)
    keeps_qkv = path != "math" or selective  # flash saves q, k, v; a checkpointed core keeps its inputs
    terms = {"ln1": Ts * h * e + 2 * Ts * stat, "qkv_input": T * h * e,
             "qkv": 3 * T * h // t * e if keeps_qkv else 0}
    if d.rope:
        terms["rope"] = 4 * d.micro_batch * d.seq * head_dim * 4 + (2 * T * h // t * e if keeps_qkv else 0)
    if path == "math":
        scores = 0 if selective else 3 * T * h // t * 4 + 3 * d.micro_batch * heads * d.seq * d.seq * 4
        terms["attention_core"] = scores + T * h // t * e  # + the projection's copy of the output
    else:
        lse_seq = d.seq if path == "flash" else _round_up(d.seq, 32)
        terms["attention_core"] = T * h // t * e + (0 if selective else d.micro_batch * heads * lse_seq * 4)
    drop = Ts * h * mask if d.hidden_dropout > 0 else 0
    # under sp SwiGLU's two column-parallel layers (fc1, gate) each all-gather and save their own copy
    gathered = 2 if d.swiglu and d.sequence_parallel else 1
    terms.update(attention_dropout_mask=drop, ln2=Ts * h * e + 2 * Ts * stat, fc1_input=gathered * T * h * e,
                 mlp=(4 if d.swiglu else 2) * T * f // t * e, mlp_dropout_mask=drop)
    return terms


def layer_bytes(d: Dims, prof: Profile = CUDA, selective: bool = False) -> int:
    return sum(layer_terms(d, prof, selective).values())


def layer_input_bytes(d: Dims) -> int:
    return _tokens(d)[1] * d.hidden * d.act_bytes


def embedding_terms(d: Dims, prof: Profile = CUDA) -> dict[str, int]:
    T, _ = _tokens(d)
    return {"token_ids": T * 8 + (T if d.tp > 1 else 0),
            "dropout_mask": T * d.hidden * prof.mask_bytes(d) if d.hidden_dropout > 0 else 0}


def head_terms(d: Dims, prof: Profile = CUDA) -> dict[str, int]:
    """Final LayerNorm, LM-head input and what the loss saves (the trainer's loss mask included)."""
    T, Ts = _tokens(d)
    vocab = d.padded_vocab // d.tp
    if d.chunked_loss:  # lm_loss.py: per-token max and normaliser, labels; at tp > 1 the normaliser is
        loss = T * 4 + T * (4 if d.tp == 1 else 8) + T * 8  # norm[1] of a [2, T] tensor: a view of its storage
    else:
        loss = T * vocab * 4 + T * 8 + (T if d.tp > 1 else 4)  # FP32 log-softmax / softmax, target, mask / weight
    return {"final_ln": Ts * d.hidden * d.act_bytes + 2 * Ts * prof.stat_bytes(d),
            "head_input": T * d.hidden * d.act_bytes, "loss": loss, "loss_mask": T * 4 + 4}


def layers_saved(d: Dims, prof: Profile = CUDA) -> int:
    """What the stage's layers keep for backward through a micro-batch, by the recompute setting."""
    n, ls = d.recompute_layers, d.layers_per_stage
    if d.recompute == "uniform":
        return -(-ls // n) * layer_input_bytes(d)
    if d.recompute == "block":
        return n * layer_input_bytes(d) + (ls - n) * layer_bytes(d, prof)
    return ls * layer_bytes(d, prof, selective=d.recompute == "selective")


def position_ids_bytes(d: Dims, pp_rank: int) -> int:
    """The position-id storage (s int64, shared by all micro-batches): saved by the learned position
    embedding on the first stage and by full recompute's checkpoints."""
    saved = (pp_rank == 0 and d.position_table) or d.recompute in ("uniform", "block")
    return d.seq * 8 if saved else 0


def saved_bytes(d: Dims, pp_rank: int = 0, prof: Profile = CUDA) -> dict[str, int]:
    """Bytes autograd keeps for backward at the end of one micro-batch's forward on stage pp_rank, by part
    (position ids once; what tests/test_estimate_memory.py compares with the tensors saved on the CPU)."""
    parts = {"layers": layers_saved(d, prof), "position_ids": position_ids_bytes(d, pp_rank)}
    if pp_rank == 0:
        parts["embedding"] = sum(embedding_terms(d, prof).values())
    if pp_rank == d.pp - 1:
        parts.update(head_terms(d, prof))
    return parts


def _loss_transients(d: Dims) -> tuple[int, int, int]:
    """Extra bytes over what is saved: (forward of the loss, backward of the loss, backward of the LM head)."""
    T, _ = _tokens(d)
    e, vocab, h = d.act_bytes, d.padded_vocab // d.tp, d.hidden
    cast = 4 if e != 4 else 0  # .float() is a copy unless the logits are FP32
    if d.chunked_loss:  # lm_loss.py: one chunk of C tokens at a time
        c = T if d.loss_chunk_tokens <= 0 else min(d.loss_chunk_tokens, T)
        # forward: the chunk's logits and FP32 copy, then (tp 1) its log-softmax next to the copy
        forward = c * vocab * max(e + cast, 8 if d.tp == 1 else 0)
        # backward: grad-hidden T h e throughout; per chunk the recomputed logits, their FP32 copy (the
        # gradient, in place) and its cast back; the FP32 weight-grad accumulator (+ on CUDA the BF16 chunk
        # GEMM and its FP32 cast); at the end the accumulator and its cast to the weight dtype
        acc = vocab * h * 4 if c < T else 0  # exists from the second chunk on
        chunk = c * vocab * (e + cast + (e if cast else 0)) + acc
        gemm = c * vocab * e + vocab * h * (4 + (e + 4 if cast else 0))
        backward = T * h * e + max(chunk, gemm, vocab * h * (4 + (e if cast else 0)))
        return forward, backward, 0
    if d.tp == 1:
        forward, backward = T * vocab * (e + cast), 8 * T * vocab  # logits + FP32 copy; two FP32 grads
    else:
        forward, backward = T * vocab * (e + cast + 4), T * vocab * (4 + e)  # + shifted; grad clone + cast
    head = T * vocab * e + T * h * e  # grad of the logits, grad of the LM-head input (weight: grad_in_flight)
    return forward, backward, head


def _grad_in_flight(d: Dims, pp_rank: int) -> int:
    """A weight gradient alive during backward on top of the grads, in the param dtype: the largest weight's.
    (With tied embeddings on one stage that is the LM head's contribution to the embedding gradient, which
    autograd holds until the embedding's own backward, at the end.)"""
    numels = [n for _, n in stage_params(d, pp_rank)]
    return max(numels) * d.act_bytes


def _grad_working_set(d: Dims) -> int:
    T, Ts = _tokens(d)
    return 2 * Ts * d.hidden * d.act_bytes + (3 if d.swiglu else 2) * T * d.ffn // d.tp * d.act_bytes


def activation_peak(d: Dims, pp_rank: int = 0, prof: Profile = CUDA) -> dict[str, int]:
    """Saved bytes per micro-batch, micro-batches in flight, the phases of the current one, and the peak.

    `logits_loss` is how much the loss and LM-head phases raise the peak above the other phases.
    """
    saved = saved_bytes(d, pp_rank, prof)
    once = saved.pop("position_ids")
    per_mb = sum(saved.values())
    last = pp_rank == d.pp - 1
    in_flight = min(d.pp - pp_rank, d.num_microbatches) if d.pp > 1 else 1
    stage_output = 0 if last else layer_input_bytes(d)  # the schedule holds each micro-batch's output
    others = (in_flight - 1) * (per_mb + stage_output) + stage_output + once
    grad = _grad_in_flight(d, pp_rank)
    backward = per_mb - saved.get("loss", 0) + grad + _grad_working_set(d)
    phases = {"forward": per_mb, "layer_backward": backward}
    full, inp, ls, n = layer_bytes(d, prof), layer_input_bytes(d), d.layers_per_stage, d.recompute_layers
    if d.recompute == "selective":  # one layer's attention core recomputed
        phases["recompute"] = backward + full - layer_bytes(d, prof, selective=True)
    elif d.recompute == "uniform":  # the last group recomputed while every group input is still kept
        phases["recompute"] = backward + min(n, ls) * full - inp
    elif d.recompute == "block":  # a checkpointed layer recomputed after the other layers were freed
        phases["recompute"] = backward - (ls - n) * full + full - inp
    loss_phases = {}
    if last:
        forward, loss_backward, head = _loss_transients(d)
        loss_phases = {"loss_forward": per_mb + forward, "loss_backward": per_mb + loss_backward,
                       "head_backward": per_mb - saved.get("loss", 0) + head + grad}
    peak = others + max(*phases.values(), *loss_phases.values())
    return {"saved_per_microbatch": per_mb + once, "in_flight": in_flight, "peak": peak,
            "logits_loss": peak - (others + max(phases.values())),
            **{f"phase_{k}": v for k, v in {**phases, **loss_phases}.items()}}


# ---------------------------------------------------------------------------------------------------
# The whole estimate
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowance:
    context_gib: float = 1.0
    nccl_gib: float = 0.5
    fragmentation: float = 0.10

    def bytes(self, d: Dims, peak_activations: int) -> int:
        fixed = self.context_gib + (self.nccl_gib if d.world_size > 1 else 0.0)
        return int(fixed * GIB + self.fragmentation * peak_activations)


def stage_estimate(d: Dims, pp_rank: int, prof: Profile = CUDA, allowance: Allowance = Allowance(),
                   states: dict[str, int] | None = None) -> dict[str, int]:
    states = states or model_state_bytes(d, pp_rank)
    act = activation_peak(d, pp_rank, prof)
    working = max(act["peak"], states["step_transient"])  # the step runs after backward freed the activations
    extra = allowance.bytes(d, act["peak"])
    model = states["params"] + states["grads"] + states["optimizer_states"]
    return {"stage": pp_rank, "params": states["params"], "grads": states["grads"],
            "optimizer_states": states["optimizer_states"], "activations": working - act["logits_loss"],
            "logits_loss": act["logits_loss"], "allowance": extra, "total": model + working + extra,
            "num_params_stage": states["num_params"], "in_flight": act["in_flight"],
            "saved_per_microbatch": act["saved_per_microbatch"]}


def estimate(d: Dims, prof: Profile = CUDA, allowance: Allowance = Allowance(),
             states_cache: dict | None = None) -> dict[str, int]:
    """The worst pipeline stage's breakdown (bytes)."""
    worst = None
    for r in range(d.pp):
        states = None
        if states_cache is not None:
            key = (_states_key(d), r)
            states = states_cache.get(key) or states_cache.setdefault(key, model_state_bytes(d, r))
        est = stage_estimate(d, r, prof, allowance, states)
        if worst is None or est["total"] > worst["total"]:
            worst = est
    return worst


def _states_key(d: Dims) -> Dims:
    """Model states do not depend on the batch or recompute: one cache entry per shape and mode."""
    return dataclasses.replace(d, micro_batch=1, num_microbatches=1, recompute="none", recompute_layers=0,
                               loss_chunk_tokens=0, chunked_loss=False)


# ---------------------------------------------------------------------------------------------------
# Scans: precision modes, --fit, --largest
# ---------------------------------------------------------------------------------------------------

# label -> (precision, --optimizer-state-dtype); the grad dtype is the flag's where the mode allows it
MODES = {"bf16-sr (FP32 states)": ("bf16-sr", "fp32"), "bf16-sr (BF16 states)": ("bf16-sr", "bf16"),
         "bf16-mp": ("bf16-mp", "fp32"), "bf16": ("bf16", "fp32")}


def in_mode(d: Dims, label: str) -> Dims:
    precision, states = MODES[label]
    settable = precision_mode(precision).dtypes_settable
    return dataclasses.replace(d, precision=precision, state_dtype=states if settable else "fp32",
                               grad_dtype=d.grad_dtype if settable else "bf16")


def recompute_options(d: Dims) -> list[tuple[str, int]]:
    """Least recompute first: none, selective, full block 1 .. Ls - 1, full uniform 1."""
    ls = d.layers_per_stage
    return [("none", 0), ("selective", 0), *[("block", n) for n in range(1, ls)], ("uniform", 1)]


def recompute_label(method: str, n: int) -> str:
    return {"none": "none", "selective": "selective"}.get(method) or f"full {method} {n}"


def micro_batch_candidates(limit: int = 1 << 16) -> Iterator[int]:
    yield 1
    p = 2
    while p <= limit:
        yield p
        if p * 3 // 2 <= limit and p >= 2:
            yield p * 3 // 2
        p *= 2


def _with_batch(d: Dims, mbs: int, global_batch: int | None) -> Dims | None:
    if global_batch is None:
        return dataclasses.replace(d, micro_batch=mbs, num_microbatches=1)
    if global_batch % (mbs * d.dp):
        return None
    return dataclasses.replace(d, micro_batch=mbs, num_microbatches=global_batch // (mbs * d.dp))


@dataclass
class Search:
    """What a scan compares against: the budget, the allowance, the device profile, cached model states."""

    budget: int
    allowance: Allowance = Allowance()
    prof: Profile = CUDA
    cache: dict = dataclasses.field(default_factory=dict)

    def total(self, d: Dims) -> int:
        return estimate(d, self.prof, self.allowance, self.cache)["total"]

    def fits(self, d: Dims, method: str | None = None, n: int = 0) -> bool:
        if method is not None:
            d = dataclasses.replace(d, recompute=method, recompute_layers=n)
        return self.total(d) <= self.budget


def least_recompute(d: Dims, search: Search) -> tuple[str, int] | None:
    """The least recompute that fits (bisection over block n: memory falls as n grows)."""
    options = recompute_options(d)
    for option in options[:2]:
        if search.fits(d, *option):
            return option
    if not search.fits(d, *options[-1]):
        return None
    lo, hi = 2, len(options) - 1  # options[hi] fits: the first fitting index in [2, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if search.fits(d, *options[mid]):
            hi = mid
        else:
            lo = mid + 1
    return options[lo]


def fit(d: Dims, budget_gib: float, global_batch: int | None, allowance: Allowance = Allowance(),
        prof: Profile = CUDA) -> list[dict]:
    """Per mode: the largest micro-batch at each recompute level, the overall largest and the least
    recompute for it, and the least recompute at the configured micro-batch."""
    rows = []
    for label in MODES:
        dm, search = in_mode(d, label), Search(int(budget_gib * GIB), allowance, prof)
        best: dict[str, int] = {}
        for level in (("none", 0), ("selective", 0), ("uniform", 1)):
            best[recompute_label(*level)] = 0
            for mbs in micro_batch_candidates():
                db = _with_batch(dm, mbs, global_batch)
                if db is None:
                    continue
                if not search.fits(db, *level):
                    break  # memory grows with the micro-batch
                best[recompute_label(*level)] = mbs
        top = max(best.values())
        at_top = least_recompute(_with_batch(dm, top, global_batch), search) if top else None
        configured = least_recompute(dm, search)
        rows.append({"mode": label, "largest_micro_batch_by_recompute": best, "largest_micro_batch": top,
                     "least_recompute_at_largest": recompute_label(*at_top) if at_top else None,
                     "configured_micro_batch": d.micro_batch,
                     "least_recompute_at_configured": recompute_label(*configured) if configured else None})
    return rows


# (name, layers, hidden): GPT-3 (Brown et al. 2020, 13B at h 5120) and Megatron (Narayanan et al. 2021)
FAMILY = [("125M", 12, 768), ("350M", 24, 1024), ("760M", 24, 1536), ("1.3B", 24, 2048), ("1.7B", 24, 2304),
          ("2.7B", 32, 2560), ("3.6B", 30, 3072), ("6.7B", 32, 4096), ("7.5B", 36, 4096), ("13B", 40, 5120),
          ("18B", 40, 6144), ("39B", 48, 8192), ("76B", 60, 10240), ("145B", 80, 12288), ("175B", 96, 12288),
          ("310B", 96, 16384), ("530B", 105, 20480), ("1T", 128, 25600)]


def family_shape(d: Dims, layers: int, hidden: int) -> Dims | None:
    """The family member (h/128 heads of size 128, ffn 4h, micro-batch 1) with the flags' other settings
    (--num-query-groups kept); None when the layout cannot hold it (heads not divisible by tp or by the
    query groups, layers not by pp)."""
    heads = hidden // 128
    if heads % d.tp or layers % d.pp or layers < d.pp or (4 * hidden) % d.tp:
        return None
    if d.query_groups and heads % d.query_groups:
        return None
    return dataclasses.replace(d, layers=layers, hidden=hidden, heads=heads, ffn=4 * hidden, micro_batch=1,
                               head_dim=0)


Found = tuple[int, Dims, tuple[str, int]]  # (parameters, shape, least recompute that fits)


def _trainable(d: Dims | None, search: Search) -> Found | None:
    if d is None:
        return None
    option = least_recompute(d, search)
    return (num_parameters(d), d, option) if option else None


def _scan_layers(d: Dims, lo: int, hi: int, search: Search) -> Found | None:
    """The deepest member in [lo, hi] layers (multiples of pp) at d's width that trains (memory grows with L)."""
    best, a, b = None, max(1, lo // d.pp), hi // d.pp
    while a <= b:
        mid = (a + b) // 2
        found = _trainable(family_shape(d, mid * d.pp, d.hidden), search)
        if found:
            best, a = found, mid + 1
        else:
            b = mid - 1
    return best


def largest(d: Dims, budget_gib: float, allowance: Allowance = Allowance(), prof: Profile = CUDA) -> list[dict]:
    """Per mode: the largest table row that trains, then L scaled at fixed width towards the next row."""
    rows = []
    for label in MODES:
        dm, search = in_mode(d, label), Search(int(budget_gib * GIB), allowance, prof)
        members = sorted((num_parameters(s), name, s) for name, layers, hidden in FAMILY
                         if (s := family_shape(dm, _round_up(layers, dm.pp), hidden)) is not None)
        best_row, next_row = None, None
        for _, name, s in members:
            found = _trainable(s, search)
            if not found:
                next_row = (name, s)
                break
            best_row = (name, found)
        best = best_row[1] if best_row else None
        if best is not None and next_row is not None:
            base, top = best[1], next_row[1]
            deeper = _scan_layers(base, base.layers, max(base.layers, top.layers * top.hidden ** 2 // base.hidden ** 2),
                                  search)
            shallower = _scan_layers(top, top.pp, top.layers, search)
            best = max((g for g in (best, deeper, shallower) if g), key=lambda g: g[0])
        rows.append(_largest_row(label, best_row, next_row, best, search))
    return rows


def _largest_row(label: str, best_row, next_row, best: Found | None, search: Search) -> dict:
    row = {"mode": label, "largest_table_row": best_row[0] if best_row else None,
           "first_table_row_not_fitting": next_row[0] if next_row else None}
    if best is None:
        return {**row, "largest": None}
    params, s, (method, n) = best
    total = search.total(dataclasses.replace(s, recompute=method, recompute_layers=n))
    return {**row, "largest": {"num_params": params, "layers": s.layers, "hidden": s.hidden, "heads": s.heads,
                               "ffn": s.ffn, "recompute": recompute_label(method, n), "total_bytes": total}}


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe(d: Dims) -> str:
    return (f"GPT {_human(num_parameters(d))} parameters: {d.layers} layers, hidden {d.hidden}, {d.heads} heads, "
            f"ffn {d.ffn}{' SwiGLU' if d.swiglu else ''}, seq {d.seq}, vocab {d.vocab} (padded {d.padded_vocab}), "
            f"{'RoPE' if d.rope else 'learned positions' if d.position_table else 'no positions'}, "
            f"{'tied' if d.tied else 'untied'} embeddings; "
            f"tp {d.tp} pp {d.pp} dp {d.dp}{' sp' if d.sequence_parallel else ''}"
            f"{' distributed optimizer' if d.distributed_optimizer and d.world_size > 1 else ''}; "
            f"micro-batch {d.micro_batch} x {d.num_microbatches} per iteration; recompute "
            f"{recompute_label(d.recompute, d.recompute_layers)}; loss {_loss_label(d)}")


def _loss_label(d: Dims) -> str:
    if not d.chunked_loss:
        return "plain (whole logits)"
    return f"chunked, {d.loss_chunk_tokens or 'all'} tokens per chunk"


COLUMNS = ("params", "grads", "optimizer_states", "activations", "logits_loss", "allowance", "total")


def breakdown_report(d: Dims, allowance: Allowance = Allowance(), prof: Profile = CUDA) -> dict:
    config = estimate(d, prof, allowance)
    modes = {label: estimate(in_mode(d, label), prof, allowance) for label in MODES}
    return {"model": describe(d), "num_params": num_parameters(d), "config": {"precision": d.precision, **config},
            "modes": modes, "allowance": dataclasses.asdict(allowance)}


def print_breakdown(rep: dict, d: Dims) -> None:
    print(rep["model"])
    c = rep["config"]
    print(f"peak per GPU, worst pipeline stage {c['stage']} ({c['in_flight']} micro-batch(es) in flight), "
          f"--precision {d.precision} (grads {d.grad_dtype if precision_mode(d.precision).dtypes_settable else 'fp32'},"
          f" states {d.state_dtype if precision_mode(d.precision).dtypes_settable else 'fp32'}):")
    labels = {"params": "parameters", "grads": "gradients", "optimizer_states": "optimizer states (m, v, master)",
              "activations": "activations (saved + backward working set)", "logits_loss": "logits / loss transient",
              "allowance": "allowance (context, workspaces, NCCL, fragmentation)", "total": "total"}
    for key in COLUMNS:
        print(f"  {labels[key]:55s}{_gib(c[key])} GiB")
    print("same configuration per precision mode (GiB):")
    short = ("params", "grads", "states", "activations", "logits/loss", "allowance", "total")
    print(f"  {'mode':24s}" + "".join(f"{k:>12s}" for k in short))
    for label, est in rep["modes"].items():
        print(f"  {label:24s}" + "".join(f"{est[k] / GIB:12.2f}" for k in COLUMNS))


def print_fit(rows: list[dict], budget: float) -> None:
    print(f"fit in {budget:g} GiB per GPU (micro-batches 1, 2, 3, 4, 6, 8, 12, ...):")
    for r in rows:
        by = ", ".join(f"{k} {v}" for k, v in r["largest_micro_batch_by_recompute"].items())
        print(f"  {r['mode']:24s} largest micro-batch {r['largest_micro_batch']} "
              f"(least recompute for it: {r['least_recompute_at_largest']}); by recompute: {by}; "
              f"at micro-batch {r['configured_micro_batch']}: {r['least_recompute_at_configured'] or 'does not fit'}")


def print_largest(rows: list[dict], budget: float, d: Dims) -> None:
    print(f"largest GPT per precision mode in {budget:g} GiB per GPU (h/128 heads, ffn 4h, seq {d.seq}, "
          f"vocab {d.vocab}, micro-batch 1, tp {d.tp} pp {d.pp} dp {d.dp}, loss {_loss_label(d)}):")
    for r in rows:
        g = r["largest"]
        if g is None:
            print(f"  {r['mode']:24s} nothing in the family fits")
            continue
        print(f"  {r['mode']:24s} {_human(g['num_params'])} (L {g['layers']}, h {g['hidden']}, {g['heads']} heads),"
              f" recompute {g['recompute']}, {g['total_bytes'] / GIB:.1f} GiB; largest table row "
              f"{r['largest_table_row']}, first not fitting {r['first_table_row_not_fitting']}")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like config.py's
        raise EstimateError(message)


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a number, got {text!r}") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {text!r}")
        return value

    return parse


def _non_negative(flag: str, kind=float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {kind.__name__}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 0, got {text!r}")
        return value

    return parse


def build_tool_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="estimate_memory.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                 epilog="Every other flag is pretrain_gpt.py's (--loss-chunk-tokens included). Precision modes "
                        "compared: bf16-sr with FP32 states, bf16-sr with BF16 states, bf16-mp, "
                        "bf16. --fit tries micro-batches 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 x), "
                        "recompute none < selective < full block 1 .. Ls-1 < full uniform 1. --largest family: "
                        "hidden h, L layers, h/128 heads, ffn 4h, seq and vocab from the flags; GPT-3's and "
                        "Megatron's table shapes, then L scaled at fixed h; micro-batch 1, full recompute allowed. "
                        "Terms and assumptions: the module docstring.",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=None, help="GPUs (default tp x pp); dp = world / (tp x pp)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fit", type=_positive_float("--fit"), metavar="GIB",
                      help="per precision mode: the largest micro-batch and least recompute that fit")
    mode.add_argument("--largest", type=_positive_float("--largest"), metavar="GIB",
                      help="per precision mode: the largest GPT of the family that trains at micro-batch 1")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--device-profile", choices=("cuda", "cpu"), default="cuda",
                    help="activations as CUDA (flash attention, bool masks) or the CPU saves them (tests)")
    ap.add_argument("--context-gib", type=_non_negative("--context-gib"), default=Allowance.context_gib,
                    help="CUDA context + cuBLAS workspaces per GPU (default %(default)s)")
    ap.add_argument("--nccl-gib", type=_non_negative("--nccl-gib"), default=Allowance.nccl_gib,
                    help="NCCL buffers when world size > 1 (default %(default)s)")
    ap.add_argument("--fragmentation", type=_non_negative("--fragmentation"), default=Allowance.fragmentation,
                    help="allocator fragmentation as a fraction of peak activations (default %(default)s)")
    return ap


def run(argv: list[str]) -> tuple[dict, Dims, bool]:
    """Parse and compute: (the report as --json prints it, the configuration's Dims, whether --json)."""
    args, rest = build_tool_parser().parse_known_args(argv)
    cfg, world, global_given = config_from_argv(rest, args.world_size, family=args.largest is not None)
    d = dims_from_config(cfg, world)
    allowance = Allowance(args.context_gib, args.nccl_gib, args.fragmentation)
    prof = CPU if args.device_profile == "cpu" else CUDA
    if args.fit is not None:
        gbs = cfg.training.global_batch_size if global_given else None
        rep = {"model": describe(d), "fit_gib": args.fit, "modes": fit(d, args.fit, gbs, allowance, prof)}
    elif args.largest is not None:
        rep = {"model": describe(d), "largest_gib": args.largest,
               "modes": largest(d, args.largest, allowance, prof)}
    else:
        rep = breakdown_report(d, allowance, prof)
    return rep, d, args.json


def main(argv: list[str] | None = None) -> int:
    try:
        rep, d, as_json = run(sys.argv[1:] if argv is None else argv)
    except (EstimateError, ConfigError, ValueError) as exc:  # ConfigError is a ValueError too
        print(f"estimate_memory: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(rep, indent=1))
    elif "fit_gib" in rep:
        print(rep["model"])
        print_fit(rep["modes"], rep["fit_gib"])
    elif "largest_gib" in rep:
        print_largest(rep["modes"], rep["largest_gib"], d)
    else:
        print_breakdown(rep, d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
