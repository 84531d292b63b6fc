"""Corpus -> Megatron indexed dataset, with tokenizer worker processes (tools/preprocess_data.py)."""
from __future__ import annotations

import errno
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .corpus import CorpusConfig, DataInputError, expand_inputs, iter_documents
from .indexed_dataset import IndexedDatasetWriter, check_vocab_fits, optimal_dtype, remove_stale_temporaries
from .tokenizers import Tokenizer, build_tokenizer

# per worker task: large enough to amortise inter-process traffic, small enough to balance the workers
BATCH_DOCS = 64
BATCH_CHARS = 256_000


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer_model: str | None  # a sentencepiece .model, or with HuggingFaceTokenizer a tokenizer.json or its dir
    corpus: CorpusConfig
    append_eod: bool = False
    workers: int = 1
    dtype: str = "auto"  # auto (Megatron's rule), uint16 or int32
    progress: bool = True
    # Megatron's tokenizer flags (megatron_sr/data/tokenizers.py); None: SentencePieceTokenizer
    tokenizer_type: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    log_interval: int | None = None  # a progress line every N documents, instead of the progress bar

    def tokenizer_args(self) -> tuple:
        """build_tokenizer's arguments (picklable, for the worker processes)."""
        return self.tokenizer_type, self.tokenizer_model, self.vocab_file, self.merge_file, self.vocab_size

    def tokenizer_source(self) -> str:
        """The tokenizer, as the messages name it."""
        if self.tokenizer_model is None and self.vocab_file is None:
            return f"{self.tokenizer_type} --vocab-size {self.vocab_size}"
        return self.tokenizer_model or self.vocab_file


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    outputs: tuple[str, ...] = ()


def output_prefixes(cfg: PreprocessConfig) -> list[str]:
    """Megatron's naming: PREFIX_{key}_document for each JSON key."""
    return [f"{cfg.output_prefix}_{key}_document" for key in cfg.corpus.json_keys]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_args: tuple) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(*tokenizer_args)


def _encode_batch(args) -> tuple[list[list[np.ndarray]], int]:
    """Token arrays for each document and key, and the UTF-8 bytes of text encoded."""
    batch, append_eod, dtype = args
    tok = _worker_tokenizer
    out, nbytes = [], 0
    for doc in batch:
        per_key = []
        for text in doc:
            nbytes += len(text.encode("utf-8", "surrogatepass"))
            ids = tok.tokenize(text)
            if append_eod:
                ids.append(tok.eod_id)
            per_key.append(np.asarray(ids, dtype=dtype))
        out.append(per_key)
    return out, nbytes


def _batches(docs: Iterator[tuple[str, ...]]) -> Iterator[list[tuple[str, ...]]]:
    """Batches of at most BATCH_DOCS documents or about BATCH_CHARS characters, so that large documents
    spread over the workers instead of queueing behind one another."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += sum(len(t) for t in doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class OutputWriteError(OSError):
    """Writing the dataset failed (a full disk, a lost mount): the message names the output; nothing is kept."""


def _write_error(path: str, exc: OSError, doing: str) -> OutputWriteError:
    """One line naming the output for an OSError from the writer (whose file writes carry no file name)."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    err = OutputWriteError(f"{path}: cannot write the dataset: {reason} ({doing}); the partial output is removed")
    err.errno = exc.errno  # (errno, text) arguments would print as "[Errno 28] ..."
    return err


def _build_checked_tokenizer(cfg: PreprocessConfig) -> Tokenizer:
    tokenizer = build_tokenizer(*cfg.tokenizer_args())
    if tokenizer is None:
        raise DataInputError("--tokenizer-model (or --tokenizer-type with its files) is required")
    if cfg.append_eod and tokenizer.eod_id is None:
        raise DataInputError(f"--append-eod: {cfg.tokenizer_source()} names no end-of-document token (give "
                             "tokenizer_config.json an eos_token)")
    return tokenizer


def _crossed_multiple(before: int, after: int, interval: int) -> bool:
    """Whether a multiple of interval lies in (before, after]: the batches are of many documents."""
    return after // interval > before // interval


def _log_progress(stats: PreprocessStats, elapsed: float) -> None:
    """Megatron's --log-interval line."""
    print(f"Processed {stats.documents} documents ({stats.documents / elapsed:.1f} docs/s, "
          f"{stats.text_bytes / elapsed / 1e6:.2f} MB/s).", file=sys.stderr)


def preprocess(cfg: PreprocessConfig) -> PreprocessStats:
    files = expand_inputs(list(cfg.inputs))
    if not files:
        raise DataInputError(f"--input {' '.join(cfg.inputs)}: no files found")
    tokenizer = _build_checked_tokenizer(cfg)
    dtype = optimal_dtype(tokenizer.vocab_size) if cfg.dtype == "auto" else np.dtype(cfg.dtype)
    check_vocab_fits(tokenizer.vocab_size, dtype, what=f"{cfg.tokenizer_source()} with --dtype {dtype.name}")
    if cfg.workers < 1:
        raise DataInputError(f"--workers: expected a positive number, got {cfg.workers}")
    if cfg.log_interval is not None and cfg.log_interval < 1:
        raise DataInputError(f"--log-interval: expected a positive number, got {cfg.log_interval}")

    stats = PreprocessStats(outputs=tuple(output_prefixes(cfg)))
    for prefix in stats.outputs:  # a killed earlier run leaves its temporaries behind
        stale = remove_stale_temporaries(prefix)
        if stale:
            print(f"note: removed {len(stale)} temporary file(s) of an earlier run that no longer runs: "
                  f"{', '.join(stale)}", file=sys.stderr)
    pool = None
    if cfg.workers > 1:
        # fork where we can: spawn would re-import the package in every worker
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(cfg.workers, initializer=_init_worker,
                                           initargs=(cfg.tokenizer_args(),))
    writers: list[IndexedDatasetWriter] = []
    start = time.perf_counter()
    # counts MB of text, so the rate reads MB/s; documents/s goes in the postfix
    bar = tqdm(unit="MB", desc="tokenizing", file=sys.stderr, smoothing=0.1,
               disable=not cfg.progress or cfg.log_interval is not None,
               bar_format="{desc}: {n:.1f} MB [{elapsed}, {rate_fmt}{postfix}]")
    try:
        for prefix in stats.outputs:
            writers.append(IndexedDatasetWriter(prefix, dtype))
        tasks = ((batch, cfg.append_eod, dtype) for batch in _batches(iter_documents(files, cfg.corpus)))
        if pool is None:
            _init_worker(cfg.tokenizer_args())
            results = map(_encode_batch, tasks)
        else:
            results = pool.imap(_encode_batch, tasks)  # imap keeps input order: output is worker-independent
        for encoded, nbytes in results:
            for per_key in encoded:
                for writer, ids in zip(writers, per_key):
                    try:
                        writer.add_document(ids)
                    except OSError as exc:
                        raise _write_error(f"{writer.path_prefix}.bin", exc, f"a write of {ids.nbytes:,} bytes, after "
                                           f"{stats.tokens * dtype.itemsize:,} bytes of tokens") from None
                stats.tokens += sum(len(ids) for ids in per_key)
            stats.documents += len(encoded)
            stats.text_bytes += nbytes
            bar.update(nbytes / 1e6)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.documents} docs, {stats.documents / elapsed:.0f} docs/s", refresh=False)
            if cfg.log_interval and _crossed_multiple(stats.documents - len(encoded), stats.documents,
                                                      cfg.log_interval):
                _log_progress(stats, elapsed)
        if stats.documents == 0:
            raise DataInputError(f"--input {' '.join(cfg.inputs)}: empty corpus (no documents)")
        for w in writers:
            try:
                w.finalize()
            except OSError as exc:  # the buffered tail of .bin, the .idx or the renames
                raise _write_error(f"{w.path_prefix}.bin/.idx", exc, "finishing the files after "
                                   f"{stats.tokens * dtype.itemsize:,} bytes of tokens") from None
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.seconds = time.perf_counter() - start
    return stats
