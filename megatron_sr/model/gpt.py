"""GPT: embeddings, a range of pre-norm transformer layers, final norm and the (tied) output layer.

One GPTModel can be a whole model or one pipeline stage: `pre_process` (holds the embeddings),
`post_process` (holds the final norm, output layer and loss) and the global layer range
[layer_offset, layer_offset + num_layers). A non-first stage gets its input through
`set_input_tensor`, as in Megatron. Forward returns the per-token loss (FP32, [b, s]) when this is
the last stage and labels are given, logits when labels are None, else the hidden states.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig
from ..parallel import parallel_state as ps
from ..parallel.layers import VocabParallelEmbedding, mark_parallel, parallel_lm_logits
from ..parallel.random import checkpoint  # torch's, also replaying the tracked tp RNG
from ..precision import precision_mode
from .cpu_bf16 import cpu_bf16_matmul
from .init import init_method_for
from .lm_loss import lm_head_cross_entropy
from .transformer import TransformerLayer, layer_norm, recompute_granularity

WORD_EMBEDDING = "embedding.word_embeddings.weight"


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int = 1) -> int:
    """Megatron pads the vocabulary so every tensor-parallel slice has the same, aligned size."""
    multiple = divisible_by * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig, vocab: int, seed: int, dtype: torch.dtype):
        super().__init__()
        std = config.init_method_std
        self.dropout = config.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(vocab, config.hidden_size, dtype=dtype,
                                                      init_method=init_method_for(seed, WORD_EMBEDDING, std))
        self.position_embeddings = None  # rope acts in the attention; none has no position parameters at all
        if config.position_embedding_type == "learned_absolute":
            weight = torch.empty(config.max_position_embeddings, config.hidden_size, dtype=torch.float32)
            init_method_for(seed, "embedding.position_embeddings.weight", std)(weight)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
            with torch.no_grad():
                self.position_embeddings.weight.copy_(weight)
            mark_parallel(self.position_embeddings.weight, -1)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(position_ids)
        return F.dropout(h, self.dropout if self.training else 0.0)


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, pre_process: bool = True, post_process: bool = True, *,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32,
                 layer_offset: int = 0, num_layers: int | None = None):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set (take it from the tokenizer)")
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.params_dtype = params_dtype
        self.vocab_size = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by,
                                            ps.get_tensor_model_parallel_world_size())
        num_layers = config.num_layers - layer_offset if num_layers is None else num_layers
        self.layer_offset = layer_offset
        # --recompute-granularity full: which layers run under activation checkpointing (selective
        # recompute lives inside the attention layer)
        self.recompute_full = recompute_granularity(config) == "full"
        self.recompute_method, self.recompute_num_layers = config.recompute_method, config.recompute_num_layers
        self.input_tensor: torch.Tensor | None = None
        self.tied = not config.untie_embeddings_and_output_weights

        if pre_process:
            self.embedding = Embedding(config, self.vocab_size, seed, params_dtype)
        self.decoder = nn.ModuleList(TransformerLayer(config, layer_offset + i, seed, params_dtype)
                                     for i in range(num_layers))
        if post_process:
            self.final_layernorm = layer_norm(config, params_dtype)
            self.output_layer = None
            if not self.tied or not pre_process:
                # Untied: its own weight. Tied on a last stage without the embedding: a copy that starts
                # equal to the embedding (same init name); the pipeline code keeps the two in sync.
                name = "output_layer.weight" if not self.tied else WORD_EMBEDDING
                self.output_layer = VocabParallelEmbedding(self.vocab_size, config.hidden_size, dtype=params_dtype,
                                                           init_method=init_method_for(seed, name,
                                                                                       config.init_method_std))
                if self.tied:
                    self.output_layer.weight.shared_embedding_copy = True

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Hidden states from the previous pipeline stage (Megatron's convention; a list of one is accepted)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _run_layers(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        layers = list(self.decoder)
        if not (self.recompute_full and self.training and torch.is_grad_enabled()):
            return _run(layers, h, position_ids)
        n = self.recompute_num_layers
        if self.recompute_method == "uniform":  # every group of n layers: keep its input, recompute it
            for start in range(0, len(layers), n):
                h = checkpoint(functools.partial(_run, layers[start:start + n]), h, position_ids)
            return h
        for i, layer in enumerate(layers):  # block: the first n layers of this stage, the rest not
            h = checkpoint(layer, h, position_ids) if i < n else layer(h, position_ids)
        return h

    def output_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight

    def forward(self, tokens: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_process:
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            h = self.embedding(tokens, position_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("GPTModel without pre_process: call set_input_tensor first")
            h = self.input_tensor
            if position_ids is None:
                position_ids = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        h = self._run_layers(h, position_ids)
        if not self.post_process:
            return h
        with cpu_bf16_matmul(h):
            if labels is None:  # logits for generation
                return parallel_lm_logits(self.final_layernorm(h), self.output_weight())
            loss = lm_head_cross_entropy(self.final_layernorm(h), self.output_weight(), labels,
                                         self.config.loss_chunk_tokens)  # never the whole [tokens, vocab] logits
        return loss if loss_mask is None else loss * loss_mask


def _run(layers: list[nn.Module], h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        h = layer(h, position_ids)
    return h


def stage_layer_range(num_layers: int, pipeline_size: int, pipeline_rank: int) -> range:
    """Global layer numbers of one stage: an even split, an error when it does not divide."""
    if pipeline_size < 1 or not 0 <= pipeline_rank < pipeline_size:
        raise ValueError(f"pipeline rank {pipeline_rank} is outside a pipeline of size {pipeline_size}")
    if num_layers % pipeline_size:
        raise ValueError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                         f"{pipeline_size}: layers are split evenly over pipeline stages")
    per_stage = num_layers // pipeline_size
    return range(pipeline_rank * per_stage, (pipeline_rank + 1) * per_stage)


def build_model_chunks(cfg: Config, device: torch.device | str = "cpu") -> list[nn.Module]:
    """The model chunks this rank holds (one per pipeline stage it owns), on `device`.

    Pipeline parallelism plugs in here: the stage's layer range and pre/post flags come from parallel_state.
    """
    layers = stage_layer_range(cfg.model.num_layers, ps.get_pipeline_model_parallel_world_size(),
                               ps.get_pipeline_model_parallel_rank())
    with torch.device(device):  # built and initialised where it trains (init.py: the generators follow)
        model = GPTModel(cfg.model, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), seed=cfg.training.seed,
                         params_dtype=precision_mode(cfg.optimizer.precision).param_dtype,
                         layer_offset=layers.start, num_layers=len(layers))
    return [model]
