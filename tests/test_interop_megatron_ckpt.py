"""Megatron-LM checkpoints in, through tools/convert_checkpoint.py --from-megatron:
- a legacy `torch` checkpoint written here from one of our models in Megatron's layout (tp 2 x pp 2 shards with
  stage-local layer numbers, SwiGLU's per-rank [gate | up] fc1, Transformer Engine's fused norm names, padded
  vocabulary, args Namespace) converts back to exactly that model;
- a real megatron-core GPTModel (local spec, CPU) saved in the legacy layout converts to a model whose logits equal
  megatron-core's own forward (1e-5 relative), GPT-style and Llama-style, and then trains here at tp 2 x pp 2;
- one-line refusals: torch_dist (with or without megatron-core), Megatron's exact-erf GELU, an option this
  model lacks, --load of a Megatron checkpoint.
"""

import argparse
import json
import sys

import pytest
import torch
from data_helpers import load_tool
from multiproc import run_ranks

from megatron_sr.config import parse_config
from megatron_sr.model import GPTModel, padded_vocab_size

TOOL = load_tool("convert_checkpoint")
GENERATE = load_tool("generate")
VOCAB = 100  # the tokenizer's; Megatron pads it to a multiple of DIVISIBLE x tp
DIVISIBLE = 64  # 128 rows at tp 1 and tp 2 alike, so that losses compare across layouts (padding rows are logits)
TRAIN = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
         "--global-batch-size 4 --train-iters 2 --mock-data --device cpu --precision fp32 --torch-compile off "
         "--hidden-dropout 0 --attention-dropout 0 --eval-iters 1 --eval-interval 0 --log-interval 100 "
         f"--vocab-size {VOCAB}").split()
GPT_STYLE: list[str] = []
LLAMA_STYLE = ("--position-embedding-type rope --rotary-base 5000 --normalization RMSNorm --swiglu "
               "--disable-bias-linear --group-query-attention --num-query-groups 2 "
               "--untie-embeddings-and-output-weights").split()


def megatron_args(m, tp: int, pp: int, **overrides) -> argparse.Namespace:
    """The fields of Megatron-LM's args that describe the model (names as in megatron/training/arguments.py)."""
    args = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                num_attention_heads=m.num_attention_heads, kv_channels=m.head_dim,
                group_query_attention=m.group_query_attention, num_query_groups=m.num_query_groups or 1,
                max_position_embeddings=m.max_position_embeddings, seq_length=m.seq_length,
                position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base, rotary_percent=1.0,
                normalization=m.normalization, norm_epsilon=m.norm_epsilon, swiglu=m.swiglu,
                add_bias_linear=not m.disable_bias_linear, bias_gelu_fusion=True, openai_gelu=False,
                untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
                apply_residual_connection_post_layernorm=False, qk_layernorm=False, num_experts=None,
                make_vocab_size_divisible_by=DIVISIBLE, padded_vocab_size=padded_vocab_size(VOCAB, DIVISIBLE, tp),
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, tokenizer_type="NullTokenizer",
                vocab_size=VOCAB - 1, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
                consumed_train_samples=40)
    args.update(overrides)
    return argparse.Namespace(**args)


def _megatron_name(ours: str, fused_norms: bool) -> str:
    """Our name -> Megatron's (written from Megatron's GPTModel state dict, independently of the converter)."""
    if ours.startswith("decoder."):
        _, n, rest = ours.split(".", 2)
        if fused_norms:
            rest = rest.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
            rest = rest.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
        return f"decoder.layers.{n}.{rest}"
    return {"final_layernorm.weight": "decoder.final_layernorm.weight",
            "final_layernorm.bias": "decoder.final_layernorm.bias"}.get(ours, ours)


def _tp_pieces(name: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return list(tensor.chunk(tp, dim=1))
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                      "word_embeddings.weight", "output_layer.weight")):
        return list(tensor.chunk(tp, dim=0))
    return [tensor] * tp


def write_megatron_checkpoint(root, state: dict[str, torch.Tensor], m, tp: int, pp: int, iteration: int,
                              fused_norms: bool, latest: str | None = None, **arg_overrides) -> None:
    """Our whole model's state dict as Megatron-LM's legacy checkpoint at (tp, pp)."""
    padded = padded_vocab_size(VOCAB, DIVISIBLE, tp)
    state = dict(state)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:  # Megatron's padding rows: values nothing may read
            extra = torch.full((padded - VOCAB, m.hidden_size), 7.0)
            state[name] = torch.cat([state[name][:VOCAB], extra])
    per = m.num_layers // pp
    for p in range(pp):
        for t in range(tp):
            shard = {}
            for ours, tensor in state.items():
                if ours.endswith("linear_fc1_gate.weight") or ours.endswith("linear_fc1_gate.bias"):
                    continue  # fused into linear_fc1 below
                if ours.startswith("decoder."):
                    layer = int(ours.split(".")[1])
                    if layer // per != p:
                        continue
                    ours_local = ours.replace(f"decoder.{layer}.", f"decoder.{layer - p * per}.", 1)
                elif ours.startswith("embedding.") and p != 0 or ours.startswith(("final_", "output_")) and p != pp - 1:
                    continue
                else:
                    ours_local = ours
                name = _megatron_name(ours_local, fused_norms)
                if m.swiglu and ours.endswith(("linear_fc1.weight", "linear_fc1.bias")):
                    gate = state[ours.replace("linear_fc1.", "linear_fc1_gate.")].chunk(tp, dim=0)[t]
                    shard[name] = torch.cat([gate, tensor.chunk(tp, dim=0)[t]])  # this rank's [gate | up]
                else:
                    shard[name] = _tp_pieces(name, tensor, tp)[t].clone()
                if name.endswith("linear_qkv.weight"):
                    shard[name.replace(".weight", "._extra_state")] = None  # Transformer Engine's FP8 metadata
            if p == pp - 1 and pp > 1 and not m.untie_embeddings_and_output_weights:
                shard["output_layer.weight"] = state["embedding.word_embeddings.weight"].chunk(tp)[t].clone()
            folder = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            directory = root / ("release" if latest == "release" else f"iter_{iteration:07d}") / folder
            directory.mkdir(parents=True)
            torch.save({"model": shard, "args": megatron_args(m, tp, pp, **arg_overrides), "iteration": iteration,
                        "checkpoint_version": 3.0, "rng_state": [], "opt_param_scheduler": {}}, directory /
                       "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(latest or str(iteration))


def _our_model(flags: list[str], seed: int = 3) -> tuple[GPTModel, object]:
    cfg = parse_config(TRAIN + flags + ["--seed", str(seed)])
    model = GPTModel(cfg.model, seed=seed).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a swap would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model, cfg


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("style,fused_norms,latest", [("gpt", False, None), ("llama", True, None),
                                                      ("llama", False, "release")])
def test_legacy_checkpoint_at_tp2_pp2_converts_to_the_same_model(tmp_path, style, fused_norms, latest):
    flags = GPT_STYLE if style == "gpt" else LLAMA_STYLE
    model, cfg = _our_model(flags)
    write_megatron_checkpoint(tmp_path / "megatron", model.state_dict(), cfg.model, 2, 2, 5, fused_norms, latest)
    out = tmp_path / "ours"
    assert TOOL.main(["--from-megatron", str(tmp_path / "megatron"), "--save", str(out)]) == 0
    converted, saved_cfg, iteration = GENERATE.load_model(str(out), torch.device("cpu"))
    assert iteration == (0 if latest == "release" else 5)
    common = torch.load(out / f"iter_{iteration:07d}" / "common.pt", weights_only=False)
    assert common["consumed_train_samples"] == 40
    ours, theirs = model.state_dict(), converted.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        rows = min(tensor.shape[0], VOCAB) if name.endswith(("word_embeddings.weight", "output_layer.weight")) else None
        assert torch.equal(theirs[name][:rows], tensor[:rows]), name
    batch = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(batch)[..., :VOCAB], model(batch)[..., :VOCAB])


def test_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    model, cfg = _our_model(GPT_STYLE)
    # Megatron's exact GELU (no bias-GELU fusion): refused by default, converted on request
    write_megatron_checkpoint(tmp_path / "erf", model.state_dict(), cfg.model, 1, 1, 3, False, bias_gelu_fusion=False)
    assert TOOL.main(["--from-megatron", str(tmp_path / "erf"), "--save", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--accept-gelu-approximation" in err and not (tmp_path / "a").exists()
    assert TOOL.main(["--from-megatron", str(tmp_path / "erf"), "--save", str(tmp_path / "a"),
                      "--accept-gelu-approximation"]) == 0
    # a Megatron option this model does not have
    write_megatron_checkpoint(tmp_path / "moe", model.state_dict(), cfg.model, 1, 1, 3, False, num_experts=8)
    assert TOOL.main(["--from-megatron", str(tmp_path / "moe"), "--save", str(tmp_path / "b")]) == 2
    assert "--num-experts (MoE) 8" in capsys.readouterr().err
    # --load of a Megatron checkpoint, by the tool and by pretraining: both name --from-megatron
    assert TOOL.main(["--load", str(tmp_path / "erf"), "--save", str(tmp_path / "c")]) == 2
    assert "--from-megatron" in capsys.readouterr().err
    from megatron_sr.training.pretrain import pretrain

    with pytest.raises(ValueError, match="not a megatron-sr checkpoint .*--from-megatron"):
        pretrain(parse_config(TRAIN + ["--load", str(tmp_path / "erf")]))
    # torch_dist: refused (megatron-core cannot write one on a CPU to test a reader against), with or without
    # megatron-core installed, naming Megatron's own conversion to the legacy format
    dist_dir = tmp_path / "dist" / "iter_0000007"
    dist_dir.mkdir(parents=True)
    (dist_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                         "common_backend": "torch", "common_backend_version": 1}))
    (dist_dir.parent / "latest_checkpointed_iteration.txt").write_text("7")
    for installed in (True, False):
        if not installed:  # as if megatron-core were not installed
            monkeypatch.setitem(sys.modules, "megatron.core", None)
            monkeypatch.setitem(sys.modules, "megatron", None)
        capsys.readouterr()
        assert TOOL.main(["--from-megatron", str(tmp_path / "dist"), "--save", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "torch_dist checkpoint" in err and "--ckpt-convert-format torch" in err
        assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------------
# megatron-core's own GPTModel


def _mcore_model(style: str):
    """A tiny megatron-core GPTModel on the CPU (local spec: no Transformer Engine, no apex)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel as McoreGPT
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    llama = style == "llama"
    common = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                  params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
                  persist_layer_norm=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                  apply_rope_fusion=False)
    if llama:
        config = TransformerConfig(**common, num_query_groups=2, ffn_hidden_size=48, normalization="RMSNorm",
                                   gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                                   bias_activation_fusion=False)
    else:  # Megatron's default GPT: biases and the fused (tanh) bias-GELU
        config = TransformerConfig(**common, ffn_hidden_size=128, add_bias_linear=True, bias_activation_fusion=True)
    torch.manual_seed(11)
    model = McoreGPT(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm" if llama else "LayerNorm"), vocab_size=128, max_sequence_length=16,
        position_embedding_type="rope" if llama else "learned_absolute", rotary_base=5000,
        share_embeddings_and_output_weights=not llama)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), config


def _mcore_on_cpu() -> None:
    """megatron-core 0.16's CPU blockers, each a hard-coded CUDA call: RoPE moves its inv_freq to
    torch.cuda.current_device() and attention forks the CUDA RNG tracker (even without dropout); the causal mask
    is built on "cuda" unless one is passed (the forward below passes it)."""
    import contextlib

    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"  # in the child process only
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def _save_mcore_legacy(root: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """In a one-rank gloo world: build each model, save it as Megatron's legacy checkpoint, return its logits."""
    from pathlib import Path

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    _mcore_on_cpu()
    logits = {}
    try:
        for style in ("gpt", "llama"):
            model, config = _mcore_model(style)
            s = batch.shape[1]
            with torch.no_grad():
                logits[style] = model(batch, torch.arange(s).expand_as(batch),
                                      attention_mask=torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1))
            llama = style == "llama"
            m = argparse.Namespace(num_layers=4, hidden_size=32, num_attention_heads=4, head_dim=8,
                                   ffn_hidden_size=config.ffn_hidden_size, group_query_attention=llama,
                                   num_query_groups=config.num_query_groups, max_position_embeddings=16, seq_length=16,
                                   position_embedding_type="rope" if llama else "learned_absolute", rotary_base=5000,
                                   normalization=config.normalization, norm_epsilon=1e-5, swiglu=llama,
                                   disable_bias_linear=llama, untie_embeddings_and_output_weights=llama)
            directory = Path(root) / style / "iter_0000020" / "mp_rank_00"
            directory.mkdir(parents=True)
            torch.save({"model": model.state_dict(), "args": megatron_args(m, 1, 1), "iteration": 20,
                        "checkpoint_version": 3.0}, directory / "model_optim_rng.pt")
            (Path(root) / style / "latest_checkpointed_iteration.txt").write_text("20")
        return logits
    finally:
        parallel_state.destroy_model_parallel()


def _pretrain_losses(argv: list[str]) -> list[float]:
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Quiet(Observer):
        def log(self, message: str) -> None:
            pass

    return pretrain(parse_config(argv), Quiet()).train_losses


@pytest.mark.slow
def test_megatron_core_gpt_model_converts_to_its_logits_and_trains_at_tp2_pp2(tmp_path):
    pytest.importorskip("megatron.core")
    batch = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = run_ranks(1, _save_mcore_legacy, str(tmp_path / "megatron"), batch)[0]
    for style in ("gpt", "llama"):
        out = tmp_path / f"{style}_ours"
        assert TOOL.main(["--from-megatron", str(tmp_path / "megatron" / style), "--save", str(out),
                          "--vocab-size", str(VOCAB)]) == 0
        model, cfg, iteration = GENERATE.load_model(str(out), torch.device("cpu"))
        assert iteration == 20 and cfg.model.swiglu == (style == "llama")
        with torch.no_grad():
            ours = model(batch)[..., :VOCAB]
        assert _relative_error(ours, logits[style][..., :VOCAB]) <= 1e-5, style

    # the Llama-style one at tp 2 x pp 2: the converted checkpoint trains on, as it does in one process
    four = tmp_path / "llama_tp2_pp2"
    assert TOOL.main(["--from-megatron", str(tmp_path / "megatron" / "llama"), "--save", str(four), "--vocab-size",
                      str(VOCAB), "--target-tensor-parallel-size", "2",
                      "--target-pipeline-model-parallel-size", "2"]) == 0
    argv = TRAIN + ["--train-iters", "22", "--use-checkpoint-args", "--load", str(four), "--use-distributed-optimizer"]
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    at_four = run_ranks(4, _pretrain_losses, argv + layout)[0]
    at_one = _pretrain_losses(argv)
    assert len(at_four) == 2 and torch.isfinite(torch.tensor(at_four)).all()
    torch.testing.assert_close(torch.tensor(at_four), torch.tensor(at_one), rtol=1e-5, atol=0)
