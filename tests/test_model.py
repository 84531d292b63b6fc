"""GPT model: layout-independent init, pipeline-stage pieces, causality, recompute, variants."""

import pytest
import torch

from megatron_sr.config import Config, ModelConfig, finalize
from megatron_sr.model import GPTModel


def tiny(**kw) -> ModelConfig:
    values = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                  hidden_dropout=0.0, attention_dropout=0.0)
    values.update(kw)
    cfg = Config(model=ModelConfig(**values))
    cfg.data.mock_data = True
    return finalize(cfg).model


def tokens(b=2, s=16, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (b, s + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def test_init_depends_only_on_seed_and_global_name():
    cfg = tiny()
    full = dict(GPTModel(cfg, seed=7).named_parameters())
    again = dict(GPTModel(cfg, seed=7).named_parameters())
    other = dict(GPTModel(cfg, seed=8).named_parameters())
    assert all(torch.equal(full[n], again[n]) for n in full)
    assert not torch.equal(full["decoder.0.mlp.linear_fc1.weight"], other["decoder.0.mlp.linear_fc1.weight"])
    # A last pipeline stage holding global layers 2 and 3 starts from the same numbers as one process.
    stage = GPTModel(cfg, pre_process=False, post_process=True, seed=7, layer_offset=2, num_layers=2)
    for name, p in stage.named_parameters():
        if name.startswith("decoder."):
            local = int(name.split(".")[1])
            assert torch.equal(p, full[name.replace(f"decoder.{local}.", f"decoder.{local + 2}.", 1)]), name
    # Its tied output layer is a copy of the first stage's word embedding, marked as such.
    assert torch.equal(stage.output_layer.weight, full["embedding.word_embeddings.weight"])
    assert stage.output_layer.weight.shared_embedding_copy
    # Different layers draw different numbers.
    assert not torch.equal(full["decoder.0.mlp.linear_fc1.weight"], full["decoder.1.mlp.linear_fc1.weight"])


def test_two_pipeline_stages_compute_the_full_model():
    cfg = tiny()
    full = GPTModel(cfg, seed=3)
    first = GPTModel(cfg, pre_process=True, post_process=False, seed=3, layer_offset=0, num_layers=2)
    last = GPTModel(cfg, pre_process=False, post_process=True, seed=3, layer_offset=2, num_layers=2)
    x, y = tokens()
    hidden = first(x)
    assert hidden.shape == (2, 16, 32)
    last.set_input_tensor(hidden)
    torch.testing.assert_close(last(None, labels=y), full(x, labels=y), rtol=0, atol=0)


def test_attention_is_causal():
    model = GPTModel(tiny(position_embedding_type="rope"), seed=1)
    x, _ = tokens(b=1)
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 100
    a, b = model(x), model(changed)
    assert a.shape == (1, 16, model.vocab_size) and model.vocab_size % 128 == 0
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_recompute_gives_the_same_gradients():
    x, y = tokens()
    grads = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        model = GPTModel(tiny(**recompute), seed=5)
        model(x, labels=y).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", [dict(swiglu=True), dict(position_embedding_type="rope"),
                                     dict(untie_embeddings_and_output_weights=True), dict(disable_bias_linear=True)])
def test_variants_train_a_step(variant):
    model = GPTModel(tiny(**variant), seed=2, params_dtype=torch.bfloat16)
    names = dict(model.named_parameters())
    assert ("decoder.0.mlp.linear_fc1_gate.weight" in names) == bool(variant.get("swiglu"))
    assert ("embedding.position_embeddings.weight" in names) == (variant.get("position_embedding_type") != "rope")
    assert ("output_layer.weight" in names) == bool(variant.get("untie_embeddings_and_output_weights"))
    assert ("decoder.0.mlp.linear_fc1.bias" in names) != bool(variant.get("disable_bias_linear"))
    x, y = tokens()
    loss = model(x, labels=y)
    assert loss.dtype == torch.float32 and loss.shape == y.shape
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_initial_loss_is_near_ln_vocab():
    model = GPTModel(tiny(), seed=4)
    x, y = tokens(b=4)
    with torch.no_grad():
        loss = float(model(x, labels=y).mean())
    assert abs(loss - torch.log(torch.tensor(float(model.vocab_size)))) < 0.1


def test_cpu_bf16_linear_is_an_fp32_gemm_of_bf16_operands():
    from megatron_sr.model.cpu_bf16 import cpu_bf16_matmul
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(32, 64, generator=g).bfloat16().requires_grad_()
    with cpu_bf16_matmul(x):
        y = torch.nn.functional.linear(x, w)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16())
    native = torch.nn.functional.linear(x, w)  # torch's own BF16 GEMM: same up to accumulation order
    torch.testing.assert_close(y.float(), native.float(), rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, x.float().sum(0).expand(32, -1).bfloat16())


def test_chunked_loss_in_the_model_equals_the_plain_loss():
    """--loss-chunk-tokens: the model's per-token loss and gradients with 5-token chunks vs one chunk."""
    x, y = tokens()
    out = []
    for chunk in (0, 5):
        model = GPTModel(tiny(loss_chunk_tokens=chunk), seed=5)
        loss = model(x, labels=y)
        loss.mean().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    for n, g in out[0][1].items():
        torch.testing.assert_close(g, out[1][1][n], rtol=1e-5, atol=1e-7)
