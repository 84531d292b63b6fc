"""Reading raw corpora into documents: JSONL files, plain text files, directories and globs of them.

A document's text is exactly what the file holds (no newline translation: CRLF stays CRLF), cut
according to --text-docs:
- file: the whole file is one document (empty files are skipped);
- line: each line, without its "\\n" or "\\r\\n" terminator, is a document; blank lines are skipped;
- paragraph: each block of lines between blank (empty or whitespace-only) lines is a document, from its
  first character to the end of its last line, without that last line's terminator.
JSONL: one JSON object per line, its --json-keys values are the documents (empty strings kept, so
document i is line i); blank lines are skipped.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_DOC_MODES = ("file", "line", "paragraph")
_LINE_END = re.compile(r"\r?\n")


class DataInputError(ValueError):
    """Bad input to a data tool; the message is one line naming the file or flag."""


@dataclass(frozen=True)
class CorpusConfig:
    json_keys: tuple[str, ...] = ("text",)
    text_docs: str = "file"
    input_format: str = "auto"  # auto (by suffix), jsonl or text
    encoding: str = "utf-8"
    fallback_encoding: str | None = None
    notes: list = field(default_factory=list, compare=False)  # files read with the fallback encoding


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSONL or text files, directories (read recursively, sorted) or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys of each JSONL object to use")
    g.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson are JSONL, anything else plain text")
    g.add_argument("--text-docs", choices=TEXT_DOC_MODES, default="file",
                   help="how a plain text file is cut into documents")
    g.add_argument("--encoding", default="utf-8", help="encoding of the input files (strict)")
    g.add_argument("--fallback-encoding", default=None,
                   help="encoding for files that are not valid in --encoding (e.g. cp1252); "
                        "without it such a file is an error")


def corpus_config_from_args(args) -> CorpusConfig:
    for enc in (args.encoding, args.fallback_encoding):
        if enc is not None:
            try:
                "".encode(enc)
            except LookupError:
                raise DataInputError(f"--encoding: unknown encoding {enc!r}") from None
    return CorpusConfig(json_keys=tuple(args.json_keys), text_docs=args.text_docs, input_format=args.input_format,
                        encoding=args.encoding, fallback_encoding=args.fallback_encoding)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files in order: each input as given; a directory's files sorted (hidden ones skipped); a glob's sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataInputError(f"{item}: no files match")
        else:
            raise DataInputError(f"{item}: no such file or directory")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def is_jsonl(path: Path, cfg: CorpusConfig) -> bool:
    if cfg.input_format != "auto":
        return cfg.input_format == "jsonl"
    return path.suffix.lower() in JSONL_SUFFIXES


def decode_file(path: Path, cfg: CorpusConfig) -> str:
    data = path.read_bytes()
    try:
        return data.decode(cfg.encoding)
    except UnicodeDecodeError as e:
        if cfg.fallback_encoding is None:
            raise DataInputError(
                f"{path}: not valid {cfg.encoding} (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                f"pass --encoding or --fallback-encoding (e.g. cp1252)") from None
        first_error = e.start
    try:
        text = data.decode(cfg.fallback_encoding)
    except UnicodeDecodeError as e:
        raise DataInputError(
            f"{path}: valid in neither {cfg.encoding} (byte {first_error}) nor {cfg.fallback_encoding} "
            f"(byte {e.start})") from None
    cfg.notes.append(path)
    print(f"note: {path}: not valid {cfg.encoding}, read as {cfg.fallback_encoding}", file=sys.stderr)
    return text


def split_text(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text] if text else []
    lines = _LINE_END.split(text)
    if mode == "line":
        return [line for line in lines if line.strip()]
    # paragraph: keep the original terminators inside a block by slicing the text itself
    docs, start, pos, block_end = [], None, 0, None
    for m in list(_LINE_END.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        line = text[pos:end]
        if line.strip():
            if start is None:
                start = pos
            block_end = end
        elif start is not None:
            docs.append(text[start:block_end])
            start = None
        pos = m.end() if m else len(text)
    if start is not None:
        docs.append(text[start:block_end])
    return docs


def iter_documents(files: list[Path], cfg: CorpusConfig) -> Iterator[tuple[str, ...]]:
    """Yields one tuple per document: its text for each of cfg.json_keys (text files: one key)."""
    for path in files:
        if is_jsonl(path, cfg):
            yield from _jsonl_documents(path, cfg)
        else:
            if len(cfg.json_keys) != 1:
                raise DataInputError(f"{path}: plain text input gives one document stream; use one --json-keys")
            for doc in split_text(decode_file(path, cfg), cfg.text_docs):
                yield (doc,)


def _jsonl_documents(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str, ...]]:
    text = decode_file(path, cfg)
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataInputError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataInputError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        values = []
        for key in cfg.json_keys:
            if key not in obj:
                raise DataInputError(f"{path}:{line_no}: no key {key!r} (set --json-keys)")
            if not isinstance(obj[key], str):
                raise DataInputError(f"{path}:{line_no}: value of {key!r} is {type(obj[key]).__name__}, not a string")
            values.append(obj[key])
        yield tuple(values)
