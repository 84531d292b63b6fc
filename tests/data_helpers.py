"""Shared helpers for the data tests: a small tokenizer trained once per process, synthetic datasets."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

from megatron_sr.data import IndexedDatasetWriter

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOOLS = REPO / "tools"


@functools.cache
def small_tokenizer_model(vocab_size: int = 1000) -> str:
    """A BPE model trained on tiny Shakespeare (or built-in text when the corpora are absent)."""
    from megatron_sr.data.tokenizer_training import train_sentencepiece
    src = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if src.is_file():
        docs = [src.read_text(encoding="utf-8")]
    else:
        rng = np.random.default_rng(0)  # enough distinct words for a 1000-token BPE vocabulary
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(3000)]
        docs = [" ".join(words[i % len(words)] + ("," if i % 11 == 0 else "") for i in range(40000))]
    out = Path(tempfile.mkdtemp(prefix="msr_tok_")) / "tok"
    return train_sentencepiece(docs, str(out), vocab_size=vocab_size, model_type="bpe")


def write_synthetic(prefix: str, doc_lengths, vocab: int = 1000, seed: int = 0, dtype=np.uint16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=n).astype(np.int64) for n in doc_lengths]
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return docs


def load_tool(name: str):
    """Import tools/<name>.py as a module (the tools are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_like_a_user(data: bytes, fallback: str = "cp1252") -> str:
    """Independent of the project's reader: UTF-8, else the fallback encoding."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(fallback)


def read_megatron_dataset(prefix: str):
    """A minimal reader written from the format description (docs/data.md), sharing no code with
    megatron_sr.data: returns (dtype code, list of token arrays, document indices)."""
    import struct
    idx = Path(prefix + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", idx[9:17])
    assert version == 1
    (code,) = struct.unpack("<B", idx[17:18])
    n_seq, n_doc = struct.unpack("<QQ", idx[18:34])
    pos = 34
    lengths = struct.unpack(f"<{n_seq}i", idx[pos:pos + 4 * n_seq]); pos += 4 * n_seq
    pointers = struct.unpack(f"<{n_seq}q", idx[pos:pos + 8 * n_seq]); pos += 8 * n_seq
    docs = struct.unpack(f"<{n_doc}q", idx[pos:pos + 8 * n_doc]); pos += 8 * n_doc
    assert pos == len(idx)
    fmt = {8: ("H", 2), 4: ("i", 4)}[code]
    data = Path(prefix + ".bin").read_bytes()
    seqs, expected_pointer = [], 0
    for length, pointer in zip(lengths, pointers):
        assert pointer == expected_pointer
        seqs.append(np.frombuffer(data, dtype="<" + fmt[0].replace("H", "u2").replace("i", "i4"),
                                  count=length, offset=pointer))
        expected_pointer += length * fmt[1]
    assert expected_pointer == len(data)
    return code, seqs, list(docs)
