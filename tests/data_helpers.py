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


@functools.lru_cache(maxsize=None)
def small_tokenizer_model(vocab_size: int = 1000) -> str:
    """A BPE model trained on tiny Shakespeare (or built-in text when the corpora are absent)."""
    from megatron_sr.data.tokenizer_training import train_sentencepiece
    src = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if src.is_file():
        docs = [src.read_text(encoding="utf-8")]
    else:
        docs = [" ".join(f"word{i % 97} text{i % 13}, line {i}." for i in range(20000))]
    out = Path(tempfile.mkdtemp(prefix="msr_tok_")) / "tok"
    return train_sentencepiece(docs, str(out), vocab_size=vocab_size, model_type="bpe")


def write_synthetic(prefix: str, doc_lengths, vocab: int = 1000, seed: int = 0, dtype=np.uint16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=n).astype(np.int64) for n in doc_lengths]
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return docs
