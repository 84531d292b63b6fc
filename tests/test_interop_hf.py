"""Hugging Face interop through tools/convert_checkpoint.py: a model trained here (2 iterations, fp32) exported with
--export-hf and loaded by transformers offline gives this project's logits (1e-5 relative) and the same 20 greedy
tokens, GPT-style as GPT2LMHeadModel and Llama-style (GQA, RMSNorm, SwiGLU, RoPE, untied) as LlamaForCausalLM,
with a tokenizer AutoTokenizer loads; transformers' own models go HF -> here (tp 2 x pp 2) -> HF bitwise and
continue pretraining here; a tp 2 x pp 2 sharded checkpoint exports the same files as the one-process one."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from data_helpers import load_tool, small_tokenizer_model
from multiproc import run_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_sr.config import parse_config  # noqa: E402

TOOL = load_tool("convert_checkpoint")
GENERATE = load_tool("generate")
TRAIN = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
         "--train-iters 2 --mock-data --device cpu --precision fp32 --torch-compile off --lr 1e-3 "
         "--hidden-dropout 0 --attention-dropout 0 --eval-iters 1 --eval-interval 0 --log-interval 100 "
         "--make-vocab-size-divisible-by 64").split()
GPT_STYLE: list[str] = []  # learned positions, LayerNorm, GELU, biases, tied output layer
LLAMA_STYLE = ("--position-embedding-type rope --rotary-base 5000 --normalization RMSNorm --norm-epsilon 1e-6 "
               "--swiglu --disable-bias-linear --group-query-attention --num-query-groups 2 "
               "--untie-embeddings-and-output-weights").split()
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2 vocab.json + merges.txt (byte-level BPE trained on made-up text): --tokenizer-type GPT2BPETokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and runs away from the cat".split()
    text = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)]
    out = tmp_path_factory.mktemp("gpt2_tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(out))
    vocab = len(json.loads((out / "vocab.json").read_text()))
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(out / "vocab.json"),
            "--merge-file", str(out / "merges.txt"), "--vocab-size", str(vocab)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tokenizer.json whose post-processor adds a BOS, beside a tokenizer_config.json naming its eos:
    --tokenizer-type HuggingFaceTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(out),
            "--vocab-size", str(tok.get_vocab_size())]


def _quiet_pretrain(argv: list[str]) -> list[float]:
    from megatron_sr.training.observer import Observer
    from megatron_sr.training.pretrain import pretrain

    class Quiet(Observer):
        def log(self, message: str) -> None:
            pass

    return pretrain(parse_config(argv), Quiet()).train_losses


def _hf_model(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True,
                                                                    local_files_only=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / ours.abs().max())


@pytest.mark.parametrize("style,tokenizer", [("gpt", "gpt2"), ("llama", "sentencepiece"),
                                             ("gpt_untied_no_bias", "json")])
def test_trained_model_exports_to_transformers(tmp_path, gpt2_tokenizer, tokenizer_json, style, tokenizer):
    """gpt_untied_no_bias: --disable-bias-linear exports as GPT-2 with zero biases (the same function), the untied
    output layer as lm_head (tie_word_embeddings false); tied models tend to repeat their last token greedily."""
    tok_flags = {"gpt2": gpt2_tokenizer, "json": tokenizer_json,
                 "sentencepiece": ["--tokenizer-model", small_tokenizer_model(1000), "--vocab-size", "1000"]}[tokenizer]
    untied_no_bias = ["--disable-bias-linear", "--untie-embeddings-and-output-weights"]
    flags = {"gpt": GPT_STYLE, "llama": LLAMA_STYLE, "gpt_untied_no_bias": GPT_STYLE + untied_no_bias}[style]
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    losses = _quiet_pretrain(TRAIN + flags + tok_flags + ["--save", str(ckpt)])
    assert len(losses) == 2
    assert TOOL.main(["--load", str(ckpt), "--export-hf", str(hf_dir), "--dtype", "fp32"]) == 0

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == (["LlamaForCausalLM"] if style == "llama" else ["GPT2LMHeadModel"])
    assert config["torch_dtype"] == "float32"
    hf = _hf_model(hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    ours, cfg, _ = GENERATE.load_model(str(ckpt), torch.device("cpu"))
    from megatron_sr.data.tokenizers import build_tokenizer

    d = cfg.data
    our_tok = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file)
    ids = our_tok.tokenize(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == ids  # the same tokens from the exported tokenizer files
    assert hf_tok.decode(ids) == our_tok.detokenize(ids)
    vocab = cfg.model.vocab_size
    assert hf.config.vocab_size == vocab  # exported without the padding rows (ours has 1024 / 320 rows)

    batch = torch.tensor([ids, list(reversed(ids))])
    with torch.no_grad():
        our_logits = ours(batch)[..., :vocab]
        hf_logits = hf(batch).logits
    assert _relative_error(our_logits, hf_logits) <= 1e-5

    new = GENERATE.generate(ours, ids, 20, cfg.model.seq_length, 0.0, 0, vocab, None, torch.Generator())
    hf.generation_config.eos_token_id = None  # all 20 tokens, as ours without an end of document
    hf_new = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert len(new) == 20 and hf_new == new


def _tiny_hf_model(style: str, directory, gpt2_tokenizer_flags: list[str]):
    """A randomly initialised transformers model saved as a Hugging Face directory, with GPT-2 tokenizer files."""
    import shutil

    torch.manual_seed(0)
    if style == "gpt":
        config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=4, n_head=4, n_inner=48,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        bias = style == "llama_bias"  # biases on every projection (attention_bias and mlp_bias)
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=not bias,
                                          attention_bias=bias, mlp_bias=bias,
                                          bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so that a swap would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(str(directory))
    vocab_file = gpt2_tokenizer_flags[gpt2_tokenizer_flags.index("--vocab-file") + 1]
    merge_file = gpt2_tokenizer_flags[gpt2_tokenizer_flags.index("--merge-file") + 1]
    shutil.copyfile(vocab_file, directory / "vocab.json")
    shutil.copyfile(merge_file, directory / "merges.txt")
    return model


def _safetensors(path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(path))


@pytest.mark.parametrize("style", ["gpt", "llama", "llama_bias"])
def test_hf_to_here_at_tp2_pp2_and_back_is_bitwise_and_continues_pretraining(tmp_path, gpt2_tokenizer, style):
    src, ckpt, back = tmp_path / "src", tmp_path / "ckpt", tmp_path / "back"
    model = _tiny_hf_model(style, src, gpt2_tokenizer)
    assert TOOL.main(["--from-hf", str(src), "--save", str(ckpt), "--target-tensor-parallel-size", "2",
                      "--target-pipeline-model-parallel-size", "2"]) == 0
    meta = json.loads((ckpt / "iter_0000000" / "metadata.json").read_text())
    assert (meta["tp"], meta["pp"]) == (2, 2)
    assert TOOL.main(["--load", str(ckpt), "--export-hf", str(back)]) == 0

    before, after = _safetensors(src / "model.safetensors"), _safetensors(back / "model.safetensors")
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    # the weights here compute transformers' logits (read independently of the export path)
    ours, cfg, iteration = GENERATE.load_model(str(ckpt), torch.device("cpu"))
    assert iteration == 0 and cfg.data.tokenizer_type == "GPT2BPETokenizer"
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative_error(ours(batch)[..., :300], model(batch).logits) <= 1e-5

    # pretraining continues from it with --load, the model's shape from the checkpoint (--use-checkpoint-args)
    d = cfg.data
    losses = _quiet_pretrain(["--micro-batch-size", "2", "--train-iters", "1", "--mock-data", "--device", "cpu",
                              "--precision", "fp32", "--torch-compile", "off", "--eval-iters", "1",
                              "--eval-interval", "0", "--load", str(ckpt), "--use-checkpoint-args",
                              "--tokenizer-type", d.tokenizer_type, "--vocab-file", d.vocab_file,
                              "--merge-file", d.merge_file, "--vocab-size", "300"])
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()


def _save_at_iteration_zero(*argvs: list[str]) -> None:
    """The trainer's own save at iteration 0 (the layout-independent init) of each run: sharded under torchrun."""
    from megatron_sr.checkpoint import TrainState
    from megatron_sr.training.setup import build

    for argv in argvs:
        build(parse_config(argv)).save(TrainState(iteration=0))


@pytest.mark.slow
def test_export_of_a_tp2_pp2_checkpoint_equals_the_one_process_one(tmp_path, gpt2_tokenizer):
    """GPT-style (the tied embedding's copy on the last stage) and Llama-style (k/v groups split over tp, SwiGLU's
    gate, the untied output layer): the trainer's tp 2 x pp 2 shards export the one-process model's files."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]
    runs = {style: TRAIN + flags + gpt2_tokenizer for style, flags in (("gpt", GPT_STYLE), ("llama", LLAMA_STYLE))}
    for style, argv in runs.items():
        _save_at_iteration_zero(argv + ["--save", str(tmp_path / f"{style}_one")])
    run_ranks(4, _save_at_iteration_zero, *[argv + ["--save", str(tmp_path / f"{style}_four")] + layout
                                            for style, argv in runs.items()])
    for style in runs:
        one, four = tmp_path / f"{style}_one", tmp_path / f"{style}_four"
        assert (four / "iter_0000000" / "mp_rank_01_001" / "model.pt").is_file()
        for ckpt in (one, four):
            assert TOOL.main(["--load", str(ckpt), "--export-hf", f"{ckpt}_hf"]) == 0
        a, b = _safetensors(f"{one}_hf/model.safetensors"), _safetensors(f"{four}_hf/model.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), style
        assert json.loads(Path(f"{one}_hf/config.json").read_text()) == \
            json.loads(Path(f"{four}_hf/config.json").read_text())


@pytest.mark.parametrize("flags,option", [
    (["--normalization", "RMSNorm"], "--normalization RMSNorm"),
    (["--position-embedding-type", "rope", "--normalization", "RMSNorm"], "GELU MLP (no --swiglu)"),
    (["--position-embedding-type", "learned_absolute", "--swiglu"], "--swiglu"),
    (["--apply-residual-connection-post-layernorm"], "--apply-residual-connection-post-layernorm"),
    (["--position-embedding-type", "none"], "--position-embedding-type none"),
    (["--kv-channels", "16"], "--kv-channels 16"),
])
def test_architecture_without_hf_equivalent_is_one_line_naming_the_option(tmp_path, capsys, flags, option):
    from megatron_sr.checkpoint.hf import hf_architecture
    from megatron_sr.checkpoint.interop import model_config

    cfg = parse_config(TRAIN + flags)
    with pytest.raises(ValueError, match="no faithful Hugging Face equivalent") as err:
        hf_architecture(model_config(cfg.to_dict()))
    assert str(err.value).startswith(option) and "\n" not in str(err.value)
    if option == "--normalization RMSNorm":  # through the tool: exit 2, one line, nothing written
        ckpt = tmp_path / "ckpt"
        _quiet_pretrain(TRAIN + flags + ["--train-iters", "1", "--save", str(ckpt)])
        capsys.readouterr()
        assert TOOL.main(["--load", str(ckpt), "--export-hf", str(tmp_path / "hf")]) == 2
        assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "hf").exists()


def test_parameter_layout_is_the_models(tmp_path):
    """interop.parameter_layout (names, shapes, tp dims the converters use) equals what GPTModel builds."""
    from megatron_sr.checkpoint.interop import parameter_layout
    from megatron_sr.model import GPTModel

    for flags in (GPT_STYLE, LLAMA_STYLE, ["--disable-bias-linear", "--untie-embeddings-and-output-weights"]):
        m = parse_config(TRAIN + flags).model
        model = GPTModel(m)
        built = {n: (tuple(p.shape), p.partition_dim) for n, p in model.named_parameters()}
        layout = parameter_layout(m)
        layout["embedding.word_embeddings.weight"] = (model.embedding.word_embeddings.weight.shape, 0)
        if "output_layer.weight" in layout:
            layout["output_layer.weight"] = (model.output_layer.weight.shape, 0)
        assert list(layout) == list(built)
        assert {k: (tuple(s), d) for k, (s, d) in layout.items()} == built
