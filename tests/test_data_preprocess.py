"""preprocess_data.py on the real corpora: exact round trips, worker-independent bytes, the format."""
import json

import numpy as np
import pytest
from data_helpers import SHARED_DATA, decode_like_a_user, load_tool, read_megatron_dataset, small_tokenizer_model

from megatron_sr.data import IndexedDataset, SentencePieceTokenizer

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")


@pytest.fixture(scope="module")
def tok_model():
    return small_tokenizer_model()


@pytest.fixture(scope="module")
def preprocess():
    return load_tool("preprocess_data").main


@pytest.fixture(scope="module")
def whole_corpus(tmp_path_factory, tok_model, preprocess):
    """All of ../shared/data (2,141 files, ~20 MB) with 1 and 2 workers, one document per file."""
    out = tmp_path_factory.mktemp("corpus")
    prefixes = {}
    for workers in (1, 2):
        rc = preprocess(["--input", str(SHARED_DATA), "--output-prefix", str(out / f"w{workers}"),
                         "--tokenizer-model", tok_model, "--append-eod", "--fallback-encoding", "cp1252",
                         "--workers", str(workers), "--no-progress"])
        assert rc == 0
        prefixes[workers] = str(out / f"w{workers}_text_document")
    return prefixes


def corpus_files():
    return sorted(f for f in SHARED_DATA.rglob("*") if f.is_file() and not f.name.startswith("."))


def test_round_trip_every_file_of_the_shared_corpora(whole_corpus, tok_model):
    tok = SentencePieceTokenizer(tok_model)
    ds = IndexedDataset(whole_corpus[2])
    files = corpus_files()
    assert len(files) > 2100 and len(ds) == len(files)
    assert sum("movie_reviews" in str(f) for f in files) == 2001  # 2,000 reviews and the README
    for i, f in enumerate(files):
        ids = ds[i]
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == decode_like_a_user(f.read_bytes()), f


def test_crlf_is_preserved(whole_corpus, tok_model):
    tok = SentencePieceTokenizer(tok_model)
    files = corpus_files()
    i = next(k for k, f in enumerate(files) if f.name == "firefox.txt")
    text = tok.detokenize(IndexedDataset(whole_corpus[1])[i][:-1])
    assert "\r\n" in text and text.count("\r\n") == files[i].read_bytes().count(b"\r\n")


def test_one_and_two_workers_give_identical_bytes(whole_corpus):
    for ext in (".bin", ".idx"):
        with open(whole_corpus[1] + ext, "rb") as a, open(whole_corpus[2] + ext, "rb") as b:
            assert a.read() == b.read()


def test_bytes_match_the_format_description(whole_corpus, tok_model):
    tok = SentencePieceTokenizer(tok_model)
    code, seqs, docs = read_megatron_dataset(whole_corpus[2])
    assert code == 8  # uint16 for a 1000-piece vocabulary
    assert docs == list(range(len(seqs) + 1))
    files = corpus_files()
    for k in (0, 1, len(files) // 2, len(files) - 1):
        expected = tok.tokenize(decode_like_a_user(files[k].read_bytes())) + [tok.eod_id]
        assert seqs[k].tolist() == expected


def _lines(text):
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def expected_line_docs(text):
    return [line for line in _lines(text) if line.strip()]


def expected_paragraph_docs(text):
    docs, block = [], []
    raw = text.split("\n")
    for k, line in enumerate(raw):
        content = line[:-1] if line.endswith("\r") else line
        if content.strip():
            block.append(line if k < len(raw) - 1 else content)
        elif block:
            docs.append("\n".join(block)[: -1 if block[-1].endswith("\r") else None])
            block = []
    if block:
        docs.append("\n".join(block)[: -1 if block[-1].endswith("\r") else None])
    return docs


@pytest.mark.parametrize("mode,expected", [("line", expected_line_docs), ("paragraph", expected_paragraph_docs)])
def test_text_split_modes_round_trip(tmp_path, tok_model, preprocess, mode, expected):
    files = [SHARED_DATA / "tinyshakespeare" / "input.txt", SHARED_DATA / "nltk" / "abc" / "science.txt",
             SHARED_DATA / "wikitext-2" / "valid.txt"]
    rc = preprocess(["--input", *map(str, files), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
                     tok_model, "--text-docs", mode, "--fallback-encoding", "cp1252", "--workers", "2",
                     "--no-progress"])
    assert rc == 0
    docs = [d for f in files for d in expected(decode_like_a_user(f.read_bytes()))]
    assert any("\r\n" in d for d in docs) == (mode == "paragraph")  # science.txt is CRLF
    tok = SentencePieceTokenizer(tok_model)
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == len(docs) > 1000
    for i, doc in enumerate(docs):
        assert tok.detokenize(ds[i]) == doc


def test_jsonl_round_trip_with_two_keys(tmp_path, tok_model, preprocess):
    lines = (SHARED_DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n")[:400]
    rows = [{"text": line, "title": f"t{i} \u2581 é", "n": i} for i, line in enumerate(lines)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n\n",
                    encoding="utf-8")
    rc = preprocess(["--input", str(path), "--output-prefix", str(tmp_path / "j"), "--tokenizer-model", tok_model,
                     "--json-keys", "text", "title", "--no-progress"])
    assert rc == 0
    tok = SentencePieceTokenizer(tok_model)
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / f"j_{key}_document"))
        assert len(ds) == len(rows)  # empty strings are documents too: document i is line i
        assert [tok.detokenize(ds[i]) for i in range(len(rows))] == [r[key] for r in rows]


def test_dtype_follows_vocabulary(tmp_path, tok_model, preprocess):
    src = SHARED_DATA / "nltk" / "inaugural" / "1789-Washington.txt"
    assert preprocess(["--input", str(src), "--output-prefix", str(tmp_path / "a"), "--tokenizer-model", tok_model,
                       "--dtype", "int32", "--no-progress"]) == 0
    assert preprocess(["--input", str(src), "--output-prefix", str(tmp_path / "b"), "--tokenizer-model", tok_model,
                       "--no-progress"]) == 0
    code_a, seqs_a, _ = read_megatron_dataset(str(tmp_path / "a_text_document"))
    code_b, seqs_b, _ = read_megatron_dataset(str(tmp_path / "b_text_document"))
    assert (code_a, code_b) == (4, 8)
    np.testing.assert_array_equal(seqs_a[0], seqs_b[0])
