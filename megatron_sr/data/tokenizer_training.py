"""Train a round-trip-safe sentencepiece model (used by tools/train_tokenizer.py and the tests)."""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Iterator

import sentencepiece as spm

from .tokenizer import EOD_PIECE, PAD_PIECE

# sentencepiece skips training sentences longer than this many bytes, so documents are cut into lines.
MAX_SENTENCE_BYTES = 4192


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Lines of the documents; newlines and other bytes the model never sees are carried by byte fallback."""
    for doc in documents:
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                yield line[: MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4:]
            if line:
                yield line


def train_sentencepiece(documents: Iterable[str], output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 0.9999,
                        input_sentence_size: int = 2_000_000, num_threads: int | None = None,
                        seed_sentencepiece_size: int = 1_000_000) -> str:
    """Write output_prefix.model/.vocab and return the .model path. Ids: 0 <unk>, 1 <s>, 2 <eod>, 3 <pad>."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type: expected bpe or unigram, got {model_type!r}")
    model = io.BytesIO()
    sentences = training_sentences(documents)
    first = next(sentences, None)
    if first is None:
        raise ValueError("tokenizer training input: no text (empty corpus)")

    def all_sentences():
        yield first
        yield from sentences

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=all_sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, eos_piece=EOD_PIECE, pad_piece=PAD_PIECE,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        msg = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", msg)  # drop sentencepiece's source location
        raise ValueError(f"sentencepiece training failed: {msg}") from None
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    _atomic_write(output_prefix + ".model", proto)
    vocab_lines = "".join(
        f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize()))
    _atomic_write(output_prefix + ".vocab", vocab_lines.encode("utf-8"))
    return output_prefix + ".model"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
