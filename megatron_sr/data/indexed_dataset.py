"""Megatron-LM's memory-mapped indexed dataset (.bin/.idx), byte compatible both ways.

.bin: the tokens of every sequence, concatenated.
.idx: magic b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q sequence count, <Q document count,
      int32 sequence lengths, int64 byte pointers into .bin, int64 document indices (starting with 0).
"""
from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, truncated or not in the expected format."""


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 below 65,500 tokens of vocabulary, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def check_vocab_fits(vocab_size: int, dtype, what: str = "tokenizer") -> None:
    info = np.iinfo(np.dtype(dtype))
    if vocab_size - 1 > info.max:
        raise IndexedDatasetError(
            f"{what}: vocabulary of {vocab_size} tokens does not fit dtype {np.dtype(dtype).name} "
            f"(largest id {info.max}); use int32")


def data_file_path(prefix: str) -> str:
    return str(prefix) + ".bin"


def index_file_path(prefix: str) -> str:
    return str(prefix) + ".idx"


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx, validated against the .bin length."""

    def __init__(self, path_prefix: str):
        self.path_prefix = str(path_prefix)
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: file not found")
        self._read_index(idx_path)
        bin_size = os.path.getsize(bin_path)
        expected = int(self._expected_bin_bytes())
        if bin_size != expected:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes, but {idx_path} describes {expected} bytes "
                f"(truncated or mismatched .bin)")
        if bin_size == 0:
            self._tokens = np.empty(0, dtype=self.dtype)
        else:
            self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")

    # Pickle by path (DataLoader workers started with spawn): a memmap would otherwise be copied whole.
    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

    def _read_index(self, idx_path: str) -> None:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < len(INDEX_MAGIC) or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic number, not a Megatron indexed dataset index")
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({size} bytes)")
        pos = len(INDEX_MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version} (expected {INDEX_VERSION})")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        seq_count, doc_count = struct.unpack_from("<QQ", header, pos + 9)
        expected = HEADER_SIZE + 12 * seq_count + 8 * doc_count
        if size != expected:
            raise IndexedDatasetError(
                f"{idx_path}: {size} bytes, but its header ({seq_count} sequences, {doc_count} document "
                f"indices) needs {expected}")
        off = HEADER_SIZE
        mm = np.memmap(idx_path, dtype=np.uint8, mode="r") if size > HEADER_SIZE else np.empty(0, np.uint8)
        self._index_map = mm
        self.sequence_lengths = mm[off: off + 4 * seq_count].view(np.int32)
        off += 4 * seq_count
        self.sequence_pointers = mm[off: off + 8 * seq_count].view(np.int64)
        off += 8 * seq_count
        self.document_indices = mm[off: off + 8 * doc_count].view(np.int64)
        self._validate(idx_path, seq_count, doc_count)

    def _validate(self, idx_path: str, seq_count: int, doc_count: int) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if doc_count < 1 or docs[0] != 0 or docs[-1] != seq_count or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{idx_path}: document indices must rise from 0 to the sequence count")
        if seq_count and np.any(lengths < 0):
            raise IndexedDatasetError(f"{idx_path}: negative sequence length")
        starts = np.zeros(seq_count, dtype=np.int64)
        if seq_count > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=starts[1:])
        if not np.array_equal(starts, pointers):
            raise IndexedDatasetError(f"{idx_path}: byte pointers do not match the sequence lengths")

    def _expected_bin_bytes(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i = i % n if n else i
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of {seq_len}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start: start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())


class IndexedDatasetWriter:
    """Writes PREFIX.bin/.idx through temporary names; nothing appears under the final names unless
    finalize() succeeds. Use as a context manager so an exception removes the temporaries."""

    def __init__(self, path_prefix: str, dtype):
        self.path_prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise IndexedDatasetError(f"{path_prefix}: dtype {self.dtype} has no Megatron code")
        Path(self.path_prefix).parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._bin_tmp = data_file_path(path_prefix) + suffix
        self._idx_tmp = index_file_path(path_prefix) + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._doc_ends: list[int] = [0]

    def add_document(self, tokens) -> None:
        """One sequence that is also one document (GPT preprocessing)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("a document is a 1-D sequence of token ids")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(len(arr))
        self._doc_ends.append(len(self._lengths))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.asarray(self._doc_ends, dtype=np.int64)
        write_index(self._idx_tmp, self.dtype, lengths, pointers, docs)
        os.replace(self._bin_tmp, data_file_path(self.path_prefix))
        os.replace(self._idx_tmp, index_file_path(self.path_prefix))

    def abort(self) -> None:
        try:
            self._bin.close()
        except OSError:  # flushing the buffered tail failed (a full disk): the file is removed all the same
            pass
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def remove_stale_temporaries(path_prefix: str) -> list[str]:
    """Remove the temporaries (PREFIX.bin.tmpPID, PREFIX.idx.tmpPID) of writers whose process no longer runs
    (a killed earlier run); returns the paths removed. A running PID's files are kept: they may be in use."""
    removed = []
    prefix = Path(path_prefix)
    for tmp in sorted(prefix.parent.glob(glob.escape(prefix.name) + ".*.tmp*")):
        head, _, pid = tmp.name.rpartition(".tmp")
        if head not in (Path(data_file_path(path_prefix)).name, Path(index_file_path(path_prefix)).name) \
                or not pid.isdigit() or _process_runs(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(str(tmp))
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def write_index(path: str, dtype, lengths: np.ndarray, pointers: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an .idx file (no temporary name: callers choose the path)."""
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes(order="C"))
        f.write(np.asarray(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes(order="C"))
