"""Megatron's tokenizer types (--tokenizer-type) behind one small interface, and the one factory,
`build_tokenizer`, that both the preprocessing workers and training (training/setup.py) call.

| type | files | end of document (eod) |
|---|---|---|
| GPT2BPETokenizer | --vocab-file vocab.json, --merge-file merges.txt | `<|endoftext|>` |
| HuggingFaceTokenizer | --tokenizer-model tokenizer.json, or its directory | tokenizer_config.json's eos_token |
| SentencePieceTokenizer, GPTSentencePieceTokenizer | --tokenizer-model m.model (tokenizer.py) | the model's eos |
| NullTokenizer | --vocab-size N: the text is the ids themselves | N |

Without --tokenizer-type, --tokenizer-model is a sentencepiece model (this project's meaning from before the
flag existed; Megatron has no default). Nothing here downloads anything: the Hugging Face `tokenizers`
library (imported as the top-level package `tokenizers`, not this module) reads local files only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
# the flags each type reads; any other tokenizer flag given with it is refused, not ignored
TOKENIZER_TYPE_FLAGS: dict[str, tuple[str, ...]] = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
}
# Megatron's GPT tokenizer that is not built here, refused by name (its other types are BERT, multimodal, SFT
# or Llama-2 chat tokenizers, "unknown" here)
UNSUPPORTED_TOKENIZER_TYPES = {"TikTokenizer": "needs the tiktoken package, which is not installed"}
GPT2_EOD = "<|endoftext|>"
# a tokenizer.json without tokenizer_config.json: the first of these in its vocabulary is the eod
HF_EOS_FALLBACK = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class Tokenizer(Protocol):
    """What preprocessing and training use of a tokenizer."""

    vocab_size: int  # ids are 0 .. vocab_size - 1
    eod_id: int | None  # None only for a tokenizer.json that names no end-of-document token
    pad_id: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids) -> str: ...


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def tokenizer_flags_problem(tokenizer_type: str | None, tokenizer_model: str | None = None,
                            vocab_file: str | None = None, merge_file: str | None = None,
                            vocab_size: int | None = None) -> str | None:
    """The one-line complaint about this combination of tokenizer flags, or None when it is consistent.
    megatron_sr/config/checks.py (which cannot import this package) keeps a copy; tests/test_tokenizers.py checks
    that the two agree."""
    given = {"tokenizer_model": tokenizer_model, "vocab_file": vocab_file, "merge_file": merge_file,
             "vocab_size": vocab_size}
    if tokenizer_type is None:
        if vocab_file is not None or merge_file is not None:
            return "--vocab-file/--merge-file need --tokenizer-type GPT2BPETokenizer"
        return None
    if tokenizer_type in UNSUPPORTED_TOKENIZER_TYPES:
        return f"--tokenizer-type {tokenizer_type}: {UNSUPPORTED_TOKENIZER_TYPES[tokenizer_type]}"
    if tokenizer_type not in TOKENIZER_TYPE_FLAGS:
        return (f"--tokenizer-type: unknown type {tokenizer_type!r} (expected one of "
                f"{', '.join(TOKENIZER_TYPE_FLAGS)})")
    needed = TOKENIZER_TYPE_FLAGS[tokenizer_type]
    missing = [_flag(n) for n in needed if given[n] is None]
    if missing:
        return f"--tokenizer-type {tokenizer_type} needs {' and '.join(missing)}"
    # --vocab-size is the model's vocabulary for every type (checked against the tokenizer's), so it is no stray
    stray = [_flag(n) for n in ("tokenizer_model", "vocab_file", "merge_file") if given[n] is not None
             and n not in needed]
    if stray:
        return f"{'/'.join(stray)} not used by --tokenizer-type {tokenizer_type}"
    return None


def resolve_tokenizer_type(tokenizer_type: str | None, tokenizer_model: str | None) -> str | None:
    """The type given; without one, SentencePieceTokenizer when --tokenizer-model is given; else None."""
    if tokenizer_type is None and tokenizer_model is not None:
        return "SentencePieceTokenizer"
    return tokenizer_type


def build_tokenizer(tokenizer_type: str | None, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer the flags name (None when they name none). Bad flags or files: a one-line ValueError or
    FileNotFoundError naming the flag and the file. --vocab-size is NullTokenizer's size (the ids before its
    eod, as Megatron); for the other types it must be at least the tokenizer's vocabulary."""
    problem = tokenizer_flags_problem(tokenizer_type, tokenizer_model, vocab_file, merge_file, vocab_size)
    if problem:
        raise ValueError(problem)
    kind = resolve_tokenizer_type(tokenizer_type, tokenizer_model)
    if kind is None:
        return None
    if kind == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if kind == "GPT2BPETokenizer":
        tok = GPT2BPETokenizer(vocab_file, merge_file)
    elif kind == "HuggingFaceTokenizer":
        tok = HuggingFaceTokenizer(tokenizer_model)
    else:
        tok = _sentencepiece(tokenizer_model, hint=tokenizer_type is None)
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise ValueError(f"--vocab-size {vocab_size} is smaller than the {kind} vocabulary of {tok.vocab_size} "
                         f"tokens ({tokenizer_model or vocab_file})")
    return tok


def _sentencepiece(model: str, hint: bool):
    from .tokenizer import SentencePieceTokenizer

    path = Path(model)
    if hint and (path.is_dir() or path.suffix == ".json"):  # a Hugging Face tokenizer without its type
        raise ValueError(f"--tokenizer-model {model}: without --tokenizer-type it is a sentencepiece .model; "
                         "pass --tokenizer-type HuggingFaceTokenizer for a tokenizer.json or its directory")
    return SentencePieceTokenizer(model)


def _id_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _existing_file(flag: str, path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return p


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class NullTokenizer:
    """Megatron's NullTokenizer: the text already is token ids, separated by whitespace. --vocab-size N counts
    the ids before the end of document (Megatron: "size of vocab before EOD"): text ids 0..N-1, eod N, so the
    vocabulary is N + 1. Megatron splits on single spaces; any whitespace (newlines too) separates here,
    which gives the same ids for its input."""

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"--vocab-size must be positive for --tokenizer-type NullTokenizer, got {vocab_size}")
        self.eod_id: int = int(vocab_size)
        self.pad_id: int = self.eod_id  # Megatron's NullTokenizer has no pad token
        self.vocab_size: int = self.eod_id + 1

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            value = int(word) if word.isdigit() and word.isascii() else -1
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"NullTokenizer: {word[:32]!r} is not a token id in [0, {self.eod_id}] "
                                 f"(--vocab-size {self.eod_id}; the text must be whitespace-separated ids)")
            ids.append(value)
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in _id_list(ids))


class GPT2BPETokenizer:
    """Megatron's GPT2BPETokenizer: GPT-2's byte-level BPE (its pre-tokenising regex, no prefix space, no
    normalisation) from vocab.json + merges.txt, with no special tokens: the text "<|endoftext|>" is
    encoded as text, as in Megatron; the end of document is the id of <|endoftext|>."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _read_gpt2_vocab(vocab_file)
        merges = _read_gpt2_merges(merge_file)
        try:
            bpe = models.BPE(vocab, merges)
        except Exception as e:  # tokenizers raises its own exception type with the Rust error text
            raise ValueError(f"--merge-file {merge_file}: does not fit --vocab-file {vocab_file} "
                             f"({_first_line(e)})") from None
        self._tok = HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_size: int = len(vocab)
        if GPT2_EOD not in vocab:
            raise ValueError(f"--vocab-file {vocab_file}: no {GPT2_EOD} token (GPT2BPETokenizer's end of document)")
        self.eod_id: int = vocab[GPT2_EOD]
        self.pad_id: int = self.eod_id  # GPT-2 has no pad token

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=False)


def _read_gpt2_vocab(vocab_file: str) -> dict[str, int]:
    path = _existing_file("--vocab-file", vocab_file)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: not a GPT-2 vocab.json ({_first_line(e)})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise ValueError(f"--vocab-file {vocab_file}: not a GPT-2 vocab.json (expected an object of token: id)")
    if sorted(vocab.values()) != list(range(len(vocab))):  # Megatron's vocab_size is len(vocab)
        raise ValueError(f"--vocab-file {vocab_file}: ids are not 0..{len(vocab) - 1}, each once")
    return vocab


def _read_gpt2_merges(merge_file: str) -> list[tuple[str, str]]:
    path = _existing_file("--merge-file", merge_file)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"--merge-file {merge_file}: not a GPT-2 merges.txt ({_first_line(e)})") from None
    merges = []
    for line_no, line in enumerate(lines, start=1):
        if (line_no == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--merge-file {merge_file}:{line_no}: expected two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    return merges


class HuggingFaceTokenizer:
    """Megatron's HuggingFaceTokenizer, read with the `tokenizers` library from a tokenizer.json (or a
    directory holding one; transformers' other formats are not read). As transformers' tokenizer(text):
    the post-processor's special tokens (a BOS, say) are added, and no truncation or padding is applied.
    eod is the eos_token of tokenizer_config.json (or special_tokens_map.json) beside the tokenizer.json;
    without either, the first of HF_EOS_FALLBACK in the vocabulary; else there is none."""

    def __init__(self, model: str):
        from tokenizers import Tokenizer as HFTokenizer

        file = _hf_tokenizer_file(model)
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception type with the serde error text
            raise ValueError(f"--tokenizer-model {file}: not a Hugging Face tokenizer.json ({_first_line(e)})") \
                from None
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # len(tokenizer) in transformers; the largest id + 1 where a vocabulary has holes, so every id fits
        self.vocab_size: int = max(self._tok.get_vocab_size(with_added_tokens=True),
                                   max(vocab.values(), default=-1) + 1)
        config = _hf_special_tokens(file.parent)
        self.eod_id: int | None = self._special_id(config, "eos_token", file)
        if self.eod_id is None:
            self.eod_id = next((vocab[t] for t in HF_EOS_FALLBACK if t in vocab), None)
        pad = self._special_id(config, "pad_token", file)
        self.pad_id: int | None = pad if pad is not None else self.eod_id

    def _special_id(self, config: dict[str, tuple[str, Path]], key: str, file: Path) -> int | None:
        if key not in config:
            return None
        token, source = config[key]
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: {key} {token!r} is not in the vocabulary of {file}")
        return token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=False)


def _hf_tokenizer_file(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"--tokenizer-model {model}: no tokenizer.json in this directory "
                                    "(HuggingFaceTokenizer reads tokenizer.json only; transformers is not installed)")
        return file
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer-model {model}: no such file or directory")
    return path


def _hf_special_tokens(directory: Path) -> dict[str, tuple[str, Path]]:
    """eos_token/pad_token -> (token, file naming it), from tokenizer_config.json, else special_tokens_map.json."""
    found: dict[str, tuple[str, Path]] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({_first_line(e)})") from None
        for key in ("eos_token", "pad_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                found[key] = (value, path)
    return found
