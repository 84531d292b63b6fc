"""Megatron-LM GPT launch scripts, scaled down, run unchanged: each trains two iterations with Megatron's meaning,
or is refused with one line naming the flag. None is "unrecognized".

The flag sets are written in the style of Megatron's own scripts and functional-test configs (mixed
precision, tokenizer, logging, schedule, checkpoint and parallel flags together); only the sizes are small.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SHARED_DATA, load_tool

from megatron_sr.config import ConfigError, parse_config
from megatron_sr.megatron_flags import ACCEPTED, DEFAULT_DIFFERENCES, NEUTRAL, TRANSLATED, megatron_flags
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
MODEL = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 4 --device cpu").split()


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A GPT-2-format BPE (vocab.json + merges.txt from the tokenizers library) and a dataset made with it by
    tools/preprocess_data.py --tokenizer-type GPT2BPETokenizer, as a Megatron user prepares data."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("megatron_script")
    source = SHARED_DATA / "wikitext-2" / "valid.txt"
    if source.is_file():
        text = source.read_text(encoding="utf-8")[:400_000]
    else:  # no shared corpora: words enough for a small BPE
        rng = np.random.default_rng(0)
        text = "\n".join(" ".join("".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 7))) for _ in range(12))
                         for _ in range(4000))
    corpus = out / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    vocab, merges = out / "vocab.json", out / "merges.txt"
    code = load_tool("preprocess_data").main(["--input", str(corpus), "--output-prefix", str(out / "my"),
                                              "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                                              "--merge-file", str(merges), "--append-eod", "--workers", "1",
                                              "--text-docs", "paragraph"])
    assert code == 0
    return {"DATA": str(out / "my_text_document"), "VOCAB": str(vocab), "MERGES": str(merges), "DIR": out}


def _script(text: str, paths: dict, tmp: Path) -> list[str]:
    return MODEL + text.format(TMP=tmp, **paths).split()


# functional-test style: Megatron's mcore GPT with Transformer Engine, BF16, every logging switch
GPT3_MCORE = """
--use-mcore-models --transformer-impl transformer_engine --attention-backend unfused --deterministic-mode
--no-gradient-accumulation-fusion --attention-softmax-in-fp32 --bf16 --distributed-backend nccl
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1
--log-params-norm --log-num-zeros-in-grad --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard
--log-memory-to-tensorboard --timing-log-level 2 --tensorboard-dir {TMP}/tb --log-interval 1
--train-iters 2 --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --lr-warmup-fraction .01 --lr-decay-iters 320000
--weight-decay 1e-2 --clip-grad 1.0 --init-method-std 0.006
--data-path {DATA} --vocab-file {VOCAB} --merge-file {MERGES} --tokenizer-type GPT2BPETokenizer --split 949,50,1
--data-cache-path {TMP}/cache --eval-interval 1000 --eval-iters 1
--save {TMP}/ckpt --load {TMP}/ckpt --save-interval 10000 --ckpt-format torch --use-checkpoint-args
"""
# Llama-style model with GQA, RMSNorm, SwiGLU and RoPE, a WSD schedule, BF16 with stochastic rounding
LLAMA_SR = """
--normalization RMSNorm --norm-epsilon 1e-5 --swiglu --position-embedding-type rope --rotary-base 500000
--rotary-percent 1.0 --group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights
--disable-bias-linear --attention-dropout 0.0 --hidden-dropout 0.0 --use-flash-attn --no-masked-softmax-fusion
--no-bias-swiglu-fusion --no-rope-fusion --cross-entropy-loss-fusion --bf16 --precision bf16-sr
--train-iters 2 --lr 3e-4 --min-lr 3e-5 --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 1
--lr-warmup-iters 1 --lr-warmup-init 1e-6 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
--tokenizer-type NullTokenizer --vocab-size 127 --mock-data --log-interval 1 --log-throughput --eval-iters 1
--eval-interval 1000 --exit-signal-handler --overlap-grad-reduce --recompute-activations
--save {TMP}/ckpt --async-save --ckpt-fully-parallel-save --dist-ckpt-strictness log_all
"""
# sample-based training with batch ramp-up (Megatron's GPT-3 recipe shape)
SAMPLES = """
--train-samples 16 --lr-decay-samples 16 --lr-warmup-samples 4 --rampup-batch-size 2 2 4 --lr 1e-4
--lr-decay-style linear --mock-data --vocab-size 128 --log-interval 1 --eval-iters 1 --eval-interval 1000
"""
RUNS = {"gpt3-mcore-bf16": GPT3_MCORE, "llama-gqa-bf16-sr": LLAMA_SR,
        "samples-rampup": SAMPLES}

REFUSED = {
    "--ckpt-format torch_dist": (GPT3_MCORE.replace("--ckpt-format torch", "--ckpt-format torch_dist"),
                                 "^--ckpt-format torch_dist: not supported"),
    "moe": (LLAMA_SR + " --num-experts 8 --moe-router-topk 2 --expert-model-parallel-size 1",
            "^--num-experts 8: mixture of experts is not supported by megatron-sr$"),
    "context parallel": (GPT3_MCORE.replace("--context-parallel-size 1", "--context-parallel-size 2"),
                         "^--context-parallel-size 2: context parallelism .above 1. is not supported"),
    "fp16": (GPT3_MCORE.replace("--bf16", "--fp16 --loss-scale-window 1000 --initial-loss-scale 65536"),
             "^--fp16: FP16 mixed precision .* is not supported by megatron-sr$"),
    "interleaved": (GPT3_MCORE + " --num-layers-per-virtual-pipeline-stage 1",
                    "^--num-layers-per-virtual-pipeline-stage 1: the interleaved .virtual-pipeline. 1F1B schedule"),
    "fp8": (GPT3_MCORE + " --fp8-format hybrid --fp8-amax-history-len 1024", "^--fp8-format hybrid: FP8 training"),
    "mla": (LLAMA_SR + " --multi-latent-attention", "^--multi-latent-attention: multi-latent attention"),
}


class _Log(Observer):
    def __init__(self):
        self.lines = []

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.mark.parametrize("name", list(RUNS))
def test_megatron_script_trains_two_iterations(name, gpt2_data, tmp_path):
    cfg = parse_config(_script(RUNS[name], gpt2_data, tmp_path))
    observer = _Log()
    result = pretrain(cfg, observer)
    assert result.state.iteration == (2 if name != "samples-rampup" else result.state.iteration)
    assert len(result.train_losses) >= 2 and all(np.isfinite(result.train_losses))
    text = "\n".join(observer.lines)
    given = [w for w in _script(RUNS[name], gpt2_data, tmp_path) if w.startswith("--")]
    for flag in given:  # every accepted implementation choice is named once in the start-up log
        if flag in ACCEPTED:
            assert sum(line.lstrip().startswith(flag + ":") or line.lstrip().startswith(flag + " ")
                       for line in observer.lines) == 1, flag
    if name == "gpt3-mcore-bf16":
        assert cfg.optimizer.precision == "bf16-mp" and "--bf16: Megatron's BF16 mixed precision" in text
        assert "--context-parallel-size 1: Megatron's default, nothing to change" in text
        # tools/generate.py decodes with the checkpoint's own tokenizer flags (GPT-2 BPE here)
        assert load_tool("generate").main(["--load", str(tmp_path / "ckpt"), "--prompt", "The", "--max-new-tokens",
                                           "3", "--device", "cpu"]) == 0
    if name == "llama-gqa-bf16-sr":
        assert cfg.optimizer.precision == "bf16-sr" and cfg.model.recompute_granularity == "selective"
        assert cfg.model.normalization == "RMSNorm" and cfg.model.query_groups == 2


@pytest.mark.parametrize("name", list(REFUSED))
def test_megatron_script_refused_with_one_line(name, gpt2_data, tmp_path):
    text, pattern = REFUSED[name]
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_config(_script(text, gpt2_data, tmp_path))
    assert "\n" not in str(err.value) and "unrecognized" not in str(err.value)


def test_a_refusal_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *MODEL, "--mock-data", "--vocab-size", "128",
                           "--num-experts", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == ["pretrain_gpt.py: error: --num-experts 4: mixture of experts is not supported by megatron-sr"]


def test_every_megatron_flag_parses_to_a_class():
    """Each flag of Megatron's table reaches a verdict: a setting, an accepted note or a one-line refusal."""
    unrecognized = []
    for flag in megatron_flags().values():
        argv = MODEL + ["--mock-data", "--vocab-size", "128", flag.name] + (["2"] if flag.kind != "switch" else [])
        try:
            parse_config(argv)
        except ConfigError as exc:
            if "unrecognized" in str(exc) or "expected one argument" in str(exc):
                unrecognized.append(f"{flag.name}: {exc}")
            assert "\n" not in str(exc)
    assert not unrecognized, unrecognized


def test_tables_name_real_megatron_flags():
    table = megatron_flags()
    for name in [*ACCEPTED, *TRANSLATED, *NEUTRAL, *DEFAULT_DIFFERENCES]:
        assert name in table, f"{name} is not a Megatron-LM flag (typo?)"


def test_megatron_keys_in_yaml(tmp_path):
    path = tmp_path / "megatron.yaml"
    path.write_text("use-mcore-models: true\nbf16: true\ncontext-parallel-size: 1\nnum-layers: 2\n")
    cfg = parse_config(["--config", str(path), "--mock-data", "--hidden-size", "32", "--num-attention-heads", "2"])
    assert cfg.optimizer.precision == "bf16-mp" and any(n.startswith("--use-mcore-models") for n in cfg.notes)
    path.write_text("num-experts: 8\n")
    with pytest.raises(ConfigError, match=f"^{path}: --num-experts 8: mixture of experts"):
        parse_config(["--config", str(path), "--mock-data"])


def test_flag_table_doc_is_up_to_date():
    assert load_tool("megatron_flag_table").main(["--check"]) == 0
