"""Bad input to the data tools and reader: one clear line naming the file, non-zero exit, no output left."""
import struct
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import REPO, load_tool, small_tokenizer_model, write_synthetic

from megatron_sr.data import IndexedDataset, IndexedDatasetError, SentencePieceTokenizer


@pytest.fixture(scope="module")
def tok_model():
    return small_tokenizer_model()


@pytest.fixture(scope="module")
def preprocess():
    return load_tool("preprocess_data").main


def run_failing(main, argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(("preprocess_data.py: error: ", "train_tokenizer.py: error: ")), err
    return err[0]


def good_file(tmp_path):
    p = tmp_path / "in" / "a.txt"
    p.parent.mkdir(exist_ok=True)
    p.write_text("a perfectly fine document\n", encoding="utf-8")
    return p


def outputs(tmp_path):
    return sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []


def pp_args(inputs, tmp_path, tok_model, *extra):
    return ["--input", *map(str, inputs), "--output-prefix", str(tmp_path / "out" / "o"),
            "--tokenizer-model", tok_model, "--no-progress", *extra]


def test_missing_input(tmp_path, tok_model, preprocess, capsys):
    missing = tmp_path / "nope.jsonl"
    err = run_failing(preprocess, pp_args([good_file(tmp_path), missing], tmp_path, tok_model), capsys)
    assert str(missing) in err and "no such file" in err
    assert outputs(tmp_path) == []


def test_glob_without_matches(tmp_path, tok_model, preprocess, capsys):
    err = run_failing(preprocess, pp_args([tmp_path / "*.jsonl"], tmp_path, tok_model), capsys)
    assert "no files match" in err


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_corpus(tmp_path, tok_model, preprocess, capsys, content):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.txt").write_text(content)
    err = run_failing(preprocess, pp_args([tmp_path / "e"], tmp_path, tok_model, "--text-docs", "line"), capsys)
    assert "empty corpus" in err
    assert outputs(tmp_path) == []


def test_empty_directory(tmp_path, tok_model, preprocess, capsys):
    (tmp_path / "e").mkdir()
    err = run_failing(preprocess, pp_args([tmp_path / "e"], tmp_path, tok_model), capsys)
    assert str(tmp_path / "e") in err and "no files" in err


@pytest.mark.parametrize("bad_line,message", [
    ('{"text": "unterminated}', "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"body": "x"}', "no key 'text'"),
    ('{"text": 3}', "not a string"),
])
def test_invalid_jsonl_line_reported_as_file_and_line(tmp_path, tok_model, preprocess, capsys, bad_line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n' + bad_line + '\n{"text": "four"}\n', encoding="utf-8")
    # a valid file first, so the failure comes after output has started
    err = run_failing(preprocess, pp_args([good_file(tmp_path), path], tmp_path, tok_model, "--workers", "2"), capsys)
    assert f"{path}:3:" in err and message in err
    assert outputs(tmp_path) == []


def test_undecodable_file_is_an_error_not_mojibake(tmp_path, tok_model, preprocess, capsys):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    err = run_failing(preprocess, pp_args([path], tmp_path, tok_model), capsys)
    assert str(path) in err and "not valid utf-8" in err and "--encoding" in err
    assert outputs(tmp_path) == []
    assert preprocess(pp_args([path], tmp_path, tok_model, "--encoding", "latin-1")) == 0
    tok = SentencePieceTokenizer(tok_model)
    assert tok.detokenize(IndexedDataset(str(tmp_path / "out" / "o_text_document"))[0]) == "caf\u00e9 cr\u00e8me\n"


def test_unknown_encoding(tmp_path, tok_model, preprocess, capsys):
    err = run_failing(preprocess, pp_args([good_file(tmp_path)], tmp_path, tok_model, "--encoding", "nope-8"), capsys)
    assert "--encoding" in err


def test_bad_tokenizer_model(tmp_path, preprocess, capsys):
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    for model in (bogus, tmp_path / "missing.model"):
        err = run_failing(preprocess, pp_args([good_file(tmp_path)], tmp_path, str(model)), capsys)
        assert str(model) in err
    assert outputs(tmp_path) == []


def big_vocab_model(tmp_path, tok_model, size=66000):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(open(tok_model, "rb").read())
    for i in range(size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<extra_{i}>", -1e9, pb.ModelProto.SentencePiece.USER_DEFINED
    path = tmp_path / "big.model"
    path.write_bytes(proto.SerializeToString())
    return str(path)


def test_vocabulary_too_large_for_dtype(tmp_path, tok_model, preprocess, capsys):
    model = big_vocab_model(tmp_path, tok_model)
    assert SentencePieceTokenizer(model).vocab_size == 66000
    err = run_failing(preprocess, pp_args([good_file(tmp_path)], tmp_path, model, "--dtype", "uint16"), capsys)
    assert model in err and "66000" in err and "uint16" in err
    assert outputs(tmp_path) == []
    assert preprocess(pp_args([good_file(tmp_path)], tmp_path, model)) == 0  # auto picks int32
    assert IndexedDataset(str(tmp_path / "out" / "o_text_document")).dtype == np.int32


@pytest.fixture()
def dataset(tmp_path):
    prefix = str(tmp_path / "d")
    write_synthetic(prefix, [7, 3, 11])
    return prefix


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage,needle,which", [
    (lambda p: open(p + ".bin", "r+b").truncate(30), "truncated", ".bin"),
    (lambda p: open(p + ".bin", "ab").write(b"\0\0"), "describes", ".bin"),
    (lambda p: _corrupt(p + ".idx", 0, b"XXIDIDX"), "magic", ".idx"),
    (lambda p: _corrupt(p + ".idx", 9, struct.pack("<Q", 2)), "version 2", ".idx"),
    (lambda p: _corrupt(p + ".idx", 17, struct.pack("<B", 99)), "dtype code 99", ".idx"),
    (lambda p: open(p + ".idx", "r+b").truncate(40), "needs", ".idx"),
    (lambda p: open(p + ".idx", "r+b").truncate(12), "truncated header", ".idx"),
    (lambda p: _corrupt(p + ".idx", 34 + 12, struct.pack("<q", 1)), "pointers", ".idx"),
])
def test_reader_rejects_damaged_files(dataset, damage, needle, which):
    damage(dataset)
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(dataset)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(dataset + which) and needle in msg


def test_reader_cli_exits_nonzero_with_one_line(dataset):
    ok = subprocess.run([sys.executable, "-m", "megatron_sr.data", dataset], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "3 sequences" in ok.stdout and "21 tokens" in ok.stdout
    open(dataset + ".bin", "r+b").truncate(10)
    bad = subprocess.run([sys.executable, "-m", "megatron_sr.data", dataset], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and dataset + ".bin" in bad.stderr


def test_preprocess_cli_as_a_script(tmp_path, tok_model):
    """Runnable as `python3 tools/preprocess_data.py` from the repo root; errors exit 2 with one line."""
    src = good_file(tmp_path)
    ok = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix",
                         str(tmp_path / "out" / "o"), "--tokenizer-model", tok_model, "--workers", "2",
                         "--append-eod"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 documents" in ok.stdout and "MB/s" in ok.stderr  # the progress bar
    bad = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "x.txt"),
                          "--output-prefix", str(tmp_path / "o2"), "--tokenizer-model", tok_model],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        f"preprocess_data.py: error: {tmp_path / 'x.txt'}: no such file or directory"


def test_train_tokenizer_cli(tmp_path, capsys):
    train = load_tool("train_tokenizer").main
    (tmp_path / "c").mkdir()
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "tre", "sun", "pa", "ver", "ox", "el", "du", "ri", "zan"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(4000)]
    text = "\n".join(" ".join(words[i:i + 9]) + "." for i in range(0, 4000, 9))
    (tmp_path / "c" / "a.txt").write_text(text + "\r\n\ttab \u2581 end", encoding="utf-8")
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "json doc \\u00e9"}\n', encoding="utf-8")
    for model_type in ("bpe", "unigram"):
        prefix = tmp_path / f"tok_{model_type}"
        assert train(["--input", str(tmp_path / "c"), "--vocab-size", "400", "--output-prefix", str(prefix),
                      "--model-type", model_type]) == 0
        tok = SentencePieceTokenizer(str(prefix) + ".model")
        assert tok.vocab_size == 400 and (tok.eod_id, tok.pad_id) == (2, 3)
        assert (tmp_path / f"tok_{model_type}.vocab").read_text().count("\n") == 400
        sample = text[:500] + "\r\n\ttab \u2581 end json doc \u00e9 \u4e2d"
        assert tok.detokenize(tok.tokenize(sample)) == sample
    capsys.readouterr()
    err = run_failing(train, ["--input", str(tmp_path / "c"), "--vocab-size", "100", "--output-prefix",
                              str(tmp_path / "small")], capsys)
    assert "vocab" in err.lower() and not (tmp_path / "small.model").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    err = run_failing(train, ["--input", str(tmp_path / "empty"), "--vocab-size", "400", "--output-prefix",
                              str(tmp_path / "e")], capsys)
    assert "empty corpus" in err
