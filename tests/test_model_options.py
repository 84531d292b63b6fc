"""Megatron's model-architecture options: --normalization RMSNorm, --norm-epsilon (alias --layernorm-epsilon),
--group-query-attention --num-query-groups, --kv-channels, --position-embedding-type none and
--apply-residual-connection-post-layernorm.

Each is checked against an independent computation (RMSNorm's closed form, attention that repeats each k/v
head over its group with plain matmuls, a closed-form parameter count), through checkpoint resharding
tp 1 <-> tp 2, and a GQA + RMSNorm model trained at (tp 2, pp 2, dp 2) against one process (the bounds
of tests/test_layouts.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks

from megatron_sr.config import Config, ConfigError, ModelConfig, finalize, parse_config
from megatron_sr.model import GPTModel, build_model_chunks
from megatron_sr.model.transformer import SelfAttention, TransformerLayer, layer_norm
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.partition import partition
from megatron_sr.parallel.random import model_parallel_seed

BASE = "--mock-data --train-iters 10 --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16".split()
GQA = ["--group-query-attention", "--num-query-groups", "2", "--normalization", "RMSNorm"]


def model_config(tp: int = 1, **kw) -> ModelConfig:
    values = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                  hidden_dropout=0.0, attention_dropout=0.0)
    values.update(kw)
    cfg = Config(model=ModelConfig(**values))
    cfg.data.mock_data = True
    cfg.training.train_iters = 10
    cfg.parallel.tensor_model_parallel_size = tp
    return finalize(cfg).model


def tokens(b: int = 2, s: int = 16, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# ---- RMSNorm ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_closed_form_in_fp32(dtype):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in FP32 and rounded once; weight only; its eps is the flag's
    (a large one shows it is used: torch's own default would be the dtype's machine epsilon)."""
    m = model_config(normalization="RMSNorm", norm_epsilon=0.5)
    norm = layer_norm(m, dtype)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert norm.weight.tensor_model_parallel is False and norm.weight.partition_dim == -1  # replicated over tp
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(32, generator=g))
    x = (torch.randn(5, 7, 32, generator=g) * 0.7).to(dtype)
    x64, w64 = x.double(), norm.weight.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 0.5) * w64
    y = norm(x)
    assert y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    else:  # the FP32 result rounded to BF16 once (not the normalised value rounded, then scaled)
        torch.testing.assert_close(y.float(), expected.float().bfloat16().float(), rtol=0, atol=0.02)
        assert (y.float() - expected.float()).abs().max() <= expected.abs().max() * 2 ** -8


def test_model_norms_follow_normalization():
    names = dict(GPTModel(model_config(normalization="RMSNorm"), seed=1).named_parameters())
    norms = [n for n in names if "layernorm" in n]
    assert norms == ["decoder.0.input_layernorm.weight", "decoder.0.pre_mlp_layernorm.weight",
                     "decoder.1.input_layernorm.weight", "decoder.1.pre_mlp_layernorm.weight",
                     "final_layernorm.weight"]
    modules = dict(GPTModel(model_config(normalization="RMSNorm")).named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.RMSNorm) for n in norms)


# ---- grouped-query attention and kv channels ----

def reference_attention(attn: SelfAttention, x: torch.Tensor, heads: int, groups: int, d: int) -> torch.Tensor:
    """Plain-torch attention from the module's weights: rows per group [q heads of the group, k, v]; each k/v
    head repeated over the query heads of its group; causal softmax(q k^T / sqrt(d)) v; the output projection."""
    w, b = attn.linear_qkv.weight, attn.linear_qkv.bias
    per_group = heads // groups
    qkv = (x @ w.T + b).view(*x.shape[:2], groups, per_group + 2, d)
    s = x.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    outs = []
    for head in range(heads):
        group = head // per_group
        q, k, v = qkv[:, :, group, head % per_group], qkv[:, :, group, per_group], qkv[:, :, group, per_group + 1]
        scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=-1) @ attn.linear_proj.weight.T + attn.linear_proj.bias


@pytest.mark.parametrize("groups, kv_channels", [(2, None), (1, None), (2, 12), (4, 6)])
def test_gqa_attention_equals_repeated_kv_reference(groups, kv_channels):
    m = model_config(group_query_attention=True, num_query_groups=groups, kv_channels=kv_channels)
    attn = SelfAttention(m, "decoder.layers.0.self_attention", seed=3, dtype=torch.float32)
    with torch.no_grad():  # non-zero biases, so their layout is checked too
        attn.linear_qkv.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        attn.linear_proj.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    d = m.head_dim
    expected = reference_attention(attn, x, 4, groups, d)
    torch.testing.assert_close(attn(x, None), expected, rtol=1e-5, atol=1e-5)


def test_kv_channels_and_groups_set_the_projection_shapes():
    """Megatron: q projection heads x kv-channels, k and v groups x kv-channels each, proj input heads x kv-channels."""
    shapes = {n: tuple(p.shape) for n, p in GPTModel(model_config(
        group_query_attention=True, num_query_groups=2, kv_channels=16)).named_parameters()}
    assert shapes["decoder.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 32)
    assert shapes["decoder.0.self_attention.linear_qkv.bias"] == ((4 + 2 * 2) * 16,)
    assert shapes["decoder.0.self_attention.linear_proj.weight"] == (32, 4 * 16)
    plain = {n: tuple(p.shape) for n, p in GPTModel(model_config(kv_channels=16)).named_parameters()}
    assert plain["decoder.0.self_attention.linear_qkv.weight"] == (3 * 4 * 16, 32)
    default = {n: tuple(p.shape) for n, p in GPTModel(model_config()).named_parameters()}
    assert default["decoder.0.self_attention.linear_qkv.weight"] == (3 * 32, 32)


def test_one_group_per_head_is_the_plain_model():
    """--group-query-attention with as many groups as heads is multi-head attention: same weights, same logits."""
    x = tokens()
    plain = GPTModel(model_config(), seed=5)
    gqa = GPTModel(model_config(group_query_attention=True, num_query_groups=4), seed=5)
    a, b = plain.state_dict(), gqa.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(plain(x), gqa(x), rtol=0, atol=0)


def test_tp_slice_of_qkv_holds_whole_groups():
    """The rows of tp rank r are groups [r G/tp, (r+1) G/tp) of the full weight, each [q heads, k, v]."""
    m = model_config(group_query_attention=True, num_query_groups=2, kv_channels=8)
    full = SelfAttention(m, "p", seed=1, dtype=torch.float32).linear_qkv.weight
    rows_per_group = (4 // 2 + 2) * 8
    for rank in range(2):
        assert torch.equal(partition(full, 0, 2, rank), full[rank * rows_per_group:(rank + 1) * rows_per_group])


# ---- position none, post-norm residual ----

def test_position_embedding_none_has_no_position_parameters():
    model = GPTModel(model_config(position_embedding_type="none"), seed=2)
    assert not [n for n in dict(model.named_parameters()) if "position" in n]
    assert model.embedding.position_embeddings is None
    assert all(layer.self_attention.rotary is None for layer in model.decoder)
    x = tokens(b=1)
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 100
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)  # still causal
    # without positions, one layer's attention sees the earlier tokens as a set: swapping two of them
    # leaves the later outputs unchanged (with learned positions it does not)
    swapped = x.clone()
    swapped[0, [2, 5]] = x[0, [5, 2]]
    for kind in ("none", "learned_absolute"):
        one_layer = GPTModel(model_config(num_layers=1, position_embedding_type=kind), seed=2)
        same = torch.allclose(one_layer(swapped)[:, 6:], one_layer(x)[:, 6:], rtol=1e-5, atol=1e-5)
        assert same == (kind == "none"), kind


def test_residual_from_the_norm_output():
    m = model_config(apply_residual_connection_post_layernorm=True, normalization="RMSNorm")
    layer = TransformerLayer(m, 0, seed=4, dtype=torch.float32)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    ln1 = layer.input_layernorm(x)
    mid = ln1 + layer.self_attention(ln1, None)
    ln2 = layer.pre_mlp_layernorm(mid)
    torch.testing.assert_close(layer(x), ln2 + layer.mlp(ln2), rtol=0, atol=0)
    plain = TransformerLayer(model_config(normalization="RMSNorm"), 0, seed=4, dtype=torch.float32)
    assert not torch.allclose(plain(x), layer(x))


# ---- parameter counts ----

def closed_form_parameters(m: ModelConfig, padded_vocab: int) -> int:
    h, a, f, d = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.head_dim
    g = m.num_query_groups if m.group_query_attention else a
    bias = 0 if m.disable_bias_linear else 1
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    attention = (a + 2 * g) * d * (h + bias) + a * d * h + bias * h
    fc1 = 2 if m.swiglu else 1
    mlp = fc1 * f * (h + bias) + f * h + bias * h
    embedding = padded_vocab * h + (m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute"
                                    else 0)
    output = padded_vocab * h if m.untie_embeddings_and_output_weights else 0
    return m.num_layers * (2 * norm + attention + mlp) + embedding + norm + output


def _estimate_memory():
    if "estimate_memory" in sys.modules:
        return sys.modules["estimate_memory"]
    path = Path(__file__).resolve().parents[1] / "tools" / "estimate_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimate_memory"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


VARIANTS = [[], GQA, GQA + ["--kv-channels", "16", "--swiglu", "--disable-bias-linear"],
            ["--group-query-attention", "--position-embedding-type", "none", "--untie-embeddings-and-output-weights"],
            GQA + ["--position-embedding-type", "rope", "--kv-channels", "6"]]


@pytest.mark.parametrize("extra", VARIANTS)
def test_parameter_count_is_the_closed_form(extra):
    cfg = parse_config(BASE + ["--vocab-size", "100"] + extra)
    model = GPTModel(cfg.model, seed=1)
    assert sum(p.numel() for p in model.parameters()) == closed_form_parameters(cfg.model, model.vocab_size)
    em = _estimate_memory()
    d = em.dims_from_config(cfg, 1)
    assert em.stage_params(d, 0) == [(n, p.numel()) for n, p in model.named_parameters()]


# ---- configuration ----

@pytest.mark.parametrize("extra, message", [
    (["--num-query-groups", "2"], "--num-query-groups needs --group-query-attention"),
    (["--group-query-attention", "--num-query-groups", "3"],
     "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--group-query-attention", "--num-query-groups", "0"], "--num-query-groups must be positive"),
    (["--kv-channels", "0"], "--kv-channels must be positive"),
    (["--position-embedding-type", "rope", "--kv-channels", "5"], "rope needs an even head size"),
    (["--num-attention-heads", "5"], "--hidden-size 32 is not divisible by --num-attention-heads 5"),
    (["--norm-epsilon", "0"], "--norm-epsilon must be in"),
    (["--normalization", "L2Norm"], "invalid choice"),
    (["--norm-epsilon", "1e-5", "--layernorm-epsilon", "1e-6"], "--layernorm-epsilon 1e-06 and --norm-epsilon"),
])
def test_inconsistent_model_options_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(BASE + extra)
    assert "\n" not in str(err.value)


def test_gqa_defaults_follow_megatron():
    m = parse_config(BASE).model
    assert (m.normalization, m.norm_epsilon, m.group_query_attention, m.num_query_groups, m.kv_channels,
            m.query_groups, m.apply_residual_connection_post_layernorm) == ("LayerNorm", 1e-5, False, None, 8, 4,
                                                                            False)
    m = parse_config(BASE + ["--group-query-attention"]).model
    assert m.num_query_groups == 1 and m.query_groups == 1  # Megatron's default: one k/v head
    m = parse_config(BASE + ["--num-attention-heads", "5", "--kv-channels", "8"]).model  # h need not divide
    assert m.head_dim == 8


def test_layernorm_epsilon_is_an_alias_on_the_command_line_in_yaml_and_in_saved_configs(tmp_path):
    assert parse_config(BASE + ["--layernorm-epsilon", "1e-6"]).model.norm_epsilon == 1e-6
    assert parse_config(BASE + ["--layernorm-epsilon", "1e-6", "--norm-epsilon", "1e-6"]).model.norm_epsilon == 1e-6
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("layernorm-epsilon: 1.0e-6\n")
    assert parse_config(["--config", str(yaml_file)] + BASE).model.norm_epsilon == 1e-6
    # across sources the command line wins, whichever spelling each uses
    assert parse_config(["--config", str(yaml_file)] + BASE + ["--norm-epsilon", "1e-4"]).model.norm_epsilon == 1e-4
    yaml_file.write_text("layernorm_epsilon: 1.0e-6\nnorm_epsilon: 1.0e-4\n")
    with pytest.raises(ConfigError, match="c.yaml: --layernorm-epsilon 1e-06 and --norm-epsilon 0.0001 disagree"):
        parse_config(["--config", str(yaml_file)] + BASE)
    yaml_file.write_text("layernorm_epsilon: fast\n")
    with pytest.raises(ConfigError, match="norm-epsilon expects float"):
        parse_config(["--config", str(yaml_file)] + BASE)
    saved = {"model": {"num_layers": 2, "layernorm_epsilon": 1e-6}}  # a config saved before the rename
    assert Config.from_dict(saved).model.norm_epsilon == 1e-6


def test_new_shape_fields_refuse_a_different_model_on_resume():
    from megatron_sr.config import resume_differences

    saved = parse_config(BASE).to_dict()
    shape, _ = resume_differences(saved, parse_config(BASE + GQA + ["--kv-channels", "16"]))
    assert sorted(line.split()[0] for line in shape) == ["--group-query-attention", "--kv-channels",
                                                         "--normalization", "--num-query-groups"]
    shape, other = resume_differences(parse_config(BASE + ["--position-embedding-type", "none"]).to_dict(),
                                      parse_config(BASE + ["--position-embedding-type", "none",
                                                           "--max-position-embeddings", "64"]))
    assert shape == [] and other == []  # no position table: its size is no shape


def test_flops_follow_megatron_with_gqa():
    from megatron_sr.training.throughput import flops_per_iteration, model_shape

    B, s, L, h, V = 4, 256, 8, 512, 1000
    plain = flops_per_iteration(B, s, L, h, V)
    assert plain == pytest.approx(72 * B * s * L * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V)
    m = parse_config(["--mock-data", "--train-iters", "1", "--num-layers", str(L), "--hidden-size", str(h),
                      "--num-attention-heads", "8", "--seq-length", str(s), "--group-query-attention",
                      "--num-query-groups", "2", "--kv-channels", "32", "--swiglu", "--ffn-hidden-size", "1024"]).model
    gqa = flops_per_iteration(B, s, L, h, V, **model_shape(m))
    a, g, d, f = 8, 2, 32, 1024
    per_layer_forward = 2 * B * s * (h * (a + 2 * g) * d + 2 * s * a * d + a * d * h + 3 * h * f)
    assert gqa == pytest.approx(3 * (L * per_layer_forward + 2 * B * s * h * V))


# ---- checkpoint resharding tp 1 <-> tp 2 ----

CKPT_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                  make_vocab_size_divisible_by=64, hidden_dropout=0.0, attention_dropout=0.0,
                  group_query_attention=True, num_query_groups=2, kv_channels=12, normalization="RMSNorm",
                  swiglu=True, position_embedding_type="rope", untie_embeddings_and_output_weights=True)


def _ckpt_cfg(tp: int) -> Config:
    cfg = Config(model=ModelConfig(**CKPT_MODEL))
    cfg.data.mock_data = True
    cfg.training.train_iters = 1
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.optimizer.precision = "fp32"  # FP32 weights: the logits then agree to the order of FP32 sums
    return finalize(cfg)


def _perturbed_model(cfg: Config, seed: int) -> GPTModel:
    """Built, then every weight moved off its initial value: tp slices by a per-rank stream, replicated
    parameters by one stream shared by the tp ranks (they must stay equal)."""
    (model,) = build_model_chunks(cfg)
    sliced = torch.Generator().manual_seed(seed + ps.get_tensor_model_parallel_rank())
    shared = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            gen = sliced if p.tensor_model_parallel else shared
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _logits(model: GPTModel) -> torch.Tensor:
    model_parallel_seed(1, "cpu")  # the tracked tp stream attention forks (no dropout here)
    with torch.no_grad():
        return model(tokens(vocab=128, seed=9))  # this tp rank's vocabulary slice


def _save_tp2(root: str) -> torch.Tensor:
    from megatron_sr.checkpoint.sharded import save_checkpoint

    ps.initialize_model_parallel(2, 1)
    cfg = _ckpt_cfg(2)
    model = _perturbed_model(cfg, seed=11)
    save_checkpoint(root, 3, model, None, common={"config": cfg.to_dict()})
    return _logits(model)


def _load_tp2(root: str) -> torch.Tensor:
    from megatron_sr.checkpoint.sharded import load_checkpoint

    ps.initialize_model_parallel(2, 1)
    (model,) = build_model_chunks(_ckpt_cfg(2))
    load_checkpoint(root, model.eval(), None)
    return _logits(model)


@pytest.mark.slow
def test_gqa_checkpoint_reshards_between_tp1_and_tp2_keeping_the_function(tmp_path):
    from megatron_sr.checkpoint.sharded import load_checkpoint, save_checkpoint

    # tp 2 -> tp 1
    slices = run_ranks(2, _save_tp2, str(tmp_path / "tp2"))
    one = _ckpt_cfg(1)
    model = GPTModel(one.model, seed=99).eval()  # another seed: everything must come from the checkpoint
    load_checkpoint(tmp_path / "tp2", model, None)
    torch.testing.assert_close(_logits(model), torch.cat(slices, dim=-1), rtol=1e-5, atol=1e-5)
    # tp 1 -> tp 2
    model = _perturbed_model(one, seed=21)
    save_checkpoint(tmp_path / "tp1", 3, model, None, common={"config": one.to_dict()})
    slices = run_ranks(2, _load_tp2, str(tmp_path / "tp1"))
    torch.testing.assert_close(torch.cat(slices, dim=-1), _logits(model), rtol=1e-5, atol=1e-5)


# ---- (tp 2, pp 2, dp 2) against one process ----

MODEL_FLAGS = GQA + ["--kv-channels", "16", "--swiglu", "--position-embedding-type", "rope",
                     "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
DIST = ["--use-distributed-optimizer"]
RUNS = [(2, 2, 2, "fp32", MODEL_FLAGS + DIST), (2, 2, 2, "fp32", MODEL_FLAGS + DIST + ["--sequence-parallel"]),
        (2, 2, 2, "bf16-sr", MODEL_FLAGS + DIST)]


@pytest.mark.slow
def test_gqa_rmsnorm_model_trains_the_same_at_tp2_pp2_dp2():
    """The bounds of tests/test_layouts.py: fp32 within 1e-5 relative (only the order of FP32 sums changes);
    bf16-sr within 4 x the distance between two one-process runs that differ in the SR seed (a parallel run is
    another random realisation). --sequence-parallel checks that the RMSNorm weights' gradients are summed
    over tp like LayerNorm's. Data-parallel replicas end bitwise equal."""
    from test_layouts import _all_runs, _argv, _max_rel, _train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {prec: _train(_argv(1, 1, prec, MODEL_FLAGS)) for prec in ("fp32", "bf16-sr")}
        other_seed = _train(_argv(1, 1, "bf16-sr", MODEL_FLAGS), sr_seed=98765)
    finally:
        torch.set_num_threads(threads)
    assert other_seed["losses"] != ref["bf16-sr"]["losses"]
    noise_loss = _max_rel(other_seed["losses"], ref["bf16-sr"]["losses"])
    noise_norm = _max_rel(other_seed["norms"], ref["bf16-sr"]["norms"])
    tol = {"fp32": (1e-5, 1e-5), "bf16-sr": (max(4 * noise_loss, 1e-4), 4 * noise_norm)}

    per_rank = run_ranks(8, _all_runs, RUNS, timeout=600)
    failures = []
    for i, (*_, precision, extra) in enumerate(RUNS):
        results = [res for rank in per_rank for j, res in rank if j == i]
        assert len(results) == 8
        loss_tol, norm_tol = tol[precision]
        name = f"{precision} {' '.join(extra[len(MODEL_FLAGS):])}"
        for res in results:
            assert len(res["losses"]) == 10
            if _max_rel(res["losses"], ref[precision]["losses"]) > loss_tol:
                failures.append(f"{name}: loss {res['losses']} vs {ref[precision]['losses']} (tol {loss_tol:.1e})")
            if _max_rel(res["norms"], ref[precision]["norms"]) > norm_tol:
                failures.append(f"{name}: grad norm {res['norms']} vs {ref[precision]['norms']} (tol {norm_tol:.1e})")
        replicas: dict = {}
        for res in results:
            replicas.setdefault((res["coords"][0], res["coords"][2]), set()).add(res["digest"])
        assert all(len(d) == 1 for d in replicas.values()), f"{name}: dp replicas differ"
    assert not failures, "\n".join(failures)
