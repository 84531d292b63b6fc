"""Megatron's --tokenizer-type values in preprocess_data.py and training: the .bin ids are the libraries' own
encodings of the text, each dataset trains, and bad tokenizer flags are one line naming the flag and file."""
import json

import numpy as np
import pytest
from data_helpers import SHARED_DATA, load_tool, read_megatron_dataset, small_tokenizer_model

from megatron_sr.config import ConfigError, parse_config
from megatron_sr.data import IndexedDataset
from megatron_sr.data.tokenizers import NullTokenizer, build_tokenizer, tokenizer_flags_problem

WIKITEXT = SHARED_DATA / "wikitext-2" / "valid.txt"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
pytestmark = pytest.mark.skipif(not (WIKITEXT.is_file() and SHAKESPEARE.is_file()), reason="../shared/data absent")
TINY_TRAINING = ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
                 "--train-iters 2 --device cpu --eval-iters 1 --eval-interval 0 --split 90,10,0 --log-interval 1 "
                 "--torch-compile off").split()
NULL_VOCAB = 300


@pytest.fixture(scope="module")
def preprocess():
    return load_tool("preprocess_data").main


@pytest.fixture(scope="module")
def lines():
    """300 non-empty lines of WikiText-2 (with its ' = Title = ' headings, @-@ and unicode)."""
    text = WIKITEXT.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()][:300]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": line, "n": i}) + "\n" for i, line in enumerate(lines)), "utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A GPT-2-format vocab.json + merges.txt: byte-level BPE trained on WikiText-2 by the tokenizers library."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(WIKITEXT)], vocab_size=700, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    return out / "vocab.json", out / "merges.txt"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A tokenizer.json (BPE on tiny Shakespeare) whose post-processor adds a BOS, in a directory with a
    tokenizer_config.json naming </s> the eos, and a copy alone in another directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "</s>", "<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(SHAKESPEARE)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}))
    alone = tmp_path_factory.mktemp("hf_alone") / "tokenizer.json"
    tok.save(str(alone))
    return directory, alone


def run_ok(preprocess, argv):
    assert preprocess([*argv, "--no-progress"]) == 0


def run_failing(preprocess, argv, capsys):
    rc = preprocess([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("preprocess_data.py: error: "), err
    return err[0]


def documents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def train_two_iterations(prefix, *tokenizer_flags):
    from megatron_sr.training.pretrain import pretrain

    cfg = parse_config(["--data-path", prefix, *tokenizer_flags, *TINY_TRAINING])
    result = pretrain(cfg)
    assert len(result.train_losses) == 2 and all(np.isfinite(result.train_losses))
    return cfg


def test_gpt2_bpe_ids_are_the_libraries_byte_level_bpe(tmp_path, preprocess, jsonl, lines, gpt2_files):
    from tokenizers import ByteLevelBPETokenizer

    vocab, merges = gpt2_files
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges)]
    run_ok(preprocess, ["--input", str(jsonl), "--output-prefix", str(tmp_path / "g"), *flags, "--append-eod",
                        "--workers", "2"])
    reference = ByteLevelBPETokenizer(str(vocab), str(merges))  # the library's own GPT-2 tokenizer
    eod = json.loads(vocab.read_text())["<|endoftext|>"]
    assert documents(str(tmp_path / "g_text_document")) == [reference.encode(t).ids + [eod] for t in lines]
    # GPT-2's tokenizer has no special tokens: the text "<|endoftext|>" is bytes, and every text round-trips
    tok = build_tokenizer("GPT2BPETokenizer", None, str(vocab), str(merges))
    odd = "<|endoftext|> caf\u00e9 \u2581 \r\n\t  tabs \U0001F600"
    assert eod not in tok.tokenize(odd) and tok.detokenize(tok.tokenize(odd)) == odd
    assert tok.vocab_size == 700 and tok.eod_id == eod
    cfg = train_two_iterations(str(tmp_path / "g_text_document"), *flags)
    assert cfg.model.vocab_size == 700


@pytest.mark.parametrize("form", ["directory", "file"])
def test_hugging_face_ids_are_the_libraries_encoding(tmp_path, preprocess, jsonl, lines, hf_tokenizer, form):
    from tokenizers import Tokenizer

    directory, alone = hf_tokenizer
    model = directory if form == "directory" else alone
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(model)]
    run_ok(preprocess, ["--input", str(jsonl), "--output-prefix", str(tmp_path / "h"), *flags, "--append-eod"])
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # eos_token of tokenizer_config.json beside the directory's file; alone, the first known eos name
    eod = reference.token_to_id("</s>" if form == "directory" else "<|endoftext|>")
    got = documents(str(tmp_path / "h_text_document"))
    assert got == [reference.encode(t).ids + [eod] for t in lines]
    assert all(doc[0] == reference.token_to_id("<s>") for doc in got)  # the post-processor's BOS, as transformers
    cfg = train_two_iterations(str(tmp_path / "h_text_document"), *flags)
    assert cfg.model.vocab_size == reference.get_vocab_size() == 800


def test_sentencepiece_type_and_default_are_the_same_as_before(tmp_path, preprocess, jsonl, lines):
    import sentencepiece as spm

    model = small_tokenizer_model()
    run_ok(preprocess, ["--input", str(jsonl), "--output-prefix", str(tmp_path / "default"), "--tokenizer-model",
                        model, "--append-eod"])
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        run_ok(preprocess, ["--input", str(jsonl), "--output-prefix", str(tmp_path / kind), "--tokenizer-type", kind,
                            "--tokenizer-model", model, "--append-eod"])
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{kind}_text_document{ext}").read_bytes() == \
                (tmp_path / f"default_text_document{ext}").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=model)
    assert documents(str(tmp_path / "default_text_document")) == [sp.EncodeAsIds(t) + [sp.eos_id()] for t in lines]
    train_two_iterations(str(tmp_path / "SentencePieceTokenizer_text_document"),
                         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model)


def test_null_tokenizer_reads_ids_and_its_eod_is_vocab_size(tmp_path, preprocess):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, NULL_VOCAB, size=rng.integers(1, 40)).tolist() for _ in range(200)]
    src = tmp_path / "ids.txt"
    src.write_text("\n".join(" ".join(map(str, d)) for d in docs) + "\n")
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB)]
    run_ok(preprocess, ["--input", str(src), "--text-docs", "line", "--output-prefix", str(tmp_path / "n"), *flags,
                        "--append-eod"])
    code, seqs, _ = read_megatron_dataset(str(tmp_path / "n_text_document"))
    assert code == 8 and [s.tolist() for s in seqs] == [d + [NULL_VOCAB] for d in docs]  # Megatron: eod = N
    tok = NullTokenizer(NULL_VOCAB)
    assert tok.vocab_size == NULL_VOCAB + 1 and tok.detokenize([3, 299]) == "3 299"
    for bad in ("1 2 x", "301", "-1"):
        with pytest.raises(ValueError, match="not a token id in \\[0, 300\\]"):
            tok.tokenize(bad)
    cfg = train_two_iterations(str(tmp_path / "n_text_document"), *flags)
    assert cfg.model.vocab_size == NULL_VOCAB + 1  # the eod needs its embedding row


def test_partitions_keep_newlines_and_log_interval(tmp_path, preprocess, jsonl, gpt2_files, capsys):
    vocab, merges = gpt2_files
    flags = ["--input", str(jsonl), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
             "--merge-file", str(merges)]
    run_ok(preprocess, [*flags, "--output-prefix", str(tmp_path / "one")])
    capsys.readouterr()
    run_ok(preprocess, [*flags, "--output-prefix", str(tmp_path / "three"), "--partitions", "3", "--keep-newlines",
                        "--keep-sequential-samples", "--log-interval", "100"])
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err if line.startswith("Processed")] == \
        ["Processed 128 documents", "Processed 256 documents", "Processed 300 documents"]  # batches of 64
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"three_text_document{ext}").read_bytes() == \
            (tmp_path / f"one_text_document{ext}").read_bytes()


def test_one_line_errors_name_the_flag_and_file(tmp_path, preprocess, jsonl, gpt2_files, hf_tokenizer, capsys):
    vocab, merges = gpt2_files
    base = ["--input", str(jsonl), "--output-prefix", str(tmp_path / "out" / "o")]
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer"]
    missing = tmp_path / "missing.txt"
    err = run_failing(preprocess, [*base, *gpt2, "--vocab-file", str(missing), "--merge-file", str(merges)], capsys)
    assert err.endswith(f"--vocab-file {missing}: no such file")
    err = run_failing(preprocess, [*base, *gpt2, "--vocab-file", str(vocab), "--merge-file", str(missing)], capsys)
    assert err.endswith(f"--merge-file {missing}: no such file")
    err = run_failing(preprocess, [*base, *gpt2, "--vocab-file", str(vocab)], capsys)
    assert err.endswith("--tokenizer-type GPT2BPETokenizer needs --merge-file")
    err = run_failing(preprocess, [*base, *gpt2, "--vocab-file", str(merges), "--merge-file", str(merges)], capsys)
    assert f"--vocab-file {merges}: not a GPT-2 vocab.json" in err
    err = run_failing(preprocess, [*base, "--tokenizer-type", "WordPieceish", "--tokenizer-model", "x"], capsys)
    assert "--tokenizer-type: unknown type 'WordPieceish'" in err and "GPT2BPETokenizer" in err
    err = run_failing(preprocess, [*base, "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "x"], capsys)
    assert "--tokenizer-type TikTokenizer: needs the tiktoken package" in err
    err = run_failing(preprocess, [*base, *gpt2, "--vocab-file", str(vocab), "--merge-file", str(merges),
                                   "--vocab-size", "500"], capsys)
    assert err.endswith(f"--vocab-size 500 is smaller than the GPT2BPETokenizer vocabulary of 700 tokens ({vocab})")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    err = run_failing(preprocess, [*base, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(empty)],
                      capsys)
    assert f"--tokenizer-model {empty}: no tokenizer.json in this directory" in err
    err = run_failing(preprocess, [*base, "--tokenizer-model", str(hf_tokenizer[0])], capsys)
    assert "pass --tokenizer-type HuggingFaceTokenizer" in err
    err = run_failing(preprocess, [*base, "--tokenizer-model", small_tokenizer_model(), "--split-sentences"], capsys)
    assert "--split-sentences: not supported" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_training_flags_and_errors(tmp_path, gpt2_files):
    from megatron_sr.training.setup import build_tokenizer as setup_build_tokenizer

    vocab, merges = gpt2_files
    data = ["--data-path", str(tmp_path / "d"), *TINY_TRAINING]
    with pytest.raises(ConfigError, match="^--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file$"):
        parse_config([*data, "--tokenizer-type", "GPT2BPETokenizer"])
    with pytest.raises(ConfigError, match="^--tokenizer-type NullTokenizer needs --vocab-size$"):
        parse_config([*data, "--tokenizer-type", "NullTokenizer"])
    with pytest.raises(ConfigError, match="^--vocab-file/--merge-file need --tokenizer-type GPT2BPETokenizer$"):
        parse_config([*data, "--vocab-file", str(vocab), "--merge-file", str(merges)])
    with pytest.raises(ConfigError, match="^--vocab-file not used by --tokenizer-type SentencePieceTokenizer$"):
        parse_config([*data, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "m",
                      "--vocab-file", "v"])
    with pytest.raises(ConfigError, match="^--tokenizer-type: unknown type 'Bogus'"):
        parse_config([*data, "--tokenizer-type", "Bogus", "--tokenizer-model", "m"])
    with pytest.raises(ConfigError, match="^--tokenizer-model \\(or --tokenizer-type with its files, or --vocab-size"):
        parse_config(data)
    cfg = parse_config([*data, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file",
                        str(merges), "--vocab-size", "600"])
    with pytest.raises(ValueError, match="^--vocab-size 600 is smaller than the GPT2BPETokenizer vocabulary of 700"):
        setup_build_tokenizer(cfg)
    cfg = parse_config([*data, "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"])
    for _ in range(2):  # a second call does not grow the vocabulary again
        assert setup_build_tokenizer(cfg).eod_id == 128 and cfg.model.vocab_size == 129


@pytest.mark.parametrize("kind", [None, "GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                                  "GPTSentencePieceTokenizer", "NullTokenizer", "TikTokenizer", "Unknown"])
def test_config_and_factory_agree_on_the_flags(kind):
    """config.py keeps a copy of the factory's table (it cannot import megatron_sr.data)."""
    from megatron_sr import config
    from megatron_sr.data import tokenizers

    assert config.TOKENIZER_TYPE_FLAGS == tokenizers.TOKENIZER_TYPE_FLAGS
    for model in (None, "m.model"):
        for files in ((None, None), ("v.json", None), ("v.json", "m.txt")):
            for size in (None, 50000):
                argv = ["--data-path", "d", *TINY_TRAINING] + (["--tokenizer-type", kind] if kind else [])
                argv += ["--tokenizer-model", model] if model else []
                argv += ["--vocab-file", files[0]] if files[0] else []
                argv += ["--merge-file", files[1]] if files[1] else []
                argv += ["--vocab-size", str(size)] if size else []
                problem = tokenizer_flags_problem(kind, model, *files, size)
                try:
                    parse_config(argv)
                    complaint = None
                except ConfigError as e:
                    complaint = str(e)
                no_tokenizer = kind is None and model is None and size is None and files == (None, None)
                assert complaint == problem or (no_tokenizer and problem is None and "is required" in complaint)
