"""Bad input to the tools: one line `<tool>: error: ...` naming the file or flag, exit 2, nothing half-written;
a bug: `<tool>: internal error: ...`, then the traceback (issue 11)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        "--micro-batch-size 2 --log-interval 1 --eval-interval 0 --eval-iters 1 --lr 3e-3 --device cpu").split()
CHECKPOINT_FILE = Path("iter_0000001") / "mp_rank_00" / "model_optim_rng.pt"


def tool(name: str, *args: str, patch: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    """Run tools/<name>.py from the repository root; `patch` is Python run first in the same process (to
    simulate a full disk or a bug where a real one cannot be had)."""
    argv = [f"tools/{name}.py", *map(str, args)]
    if patch:
        runner = (textwrap.dedent(patch) + f"\nimport runpy, sys\nsys.argv = {argv!r}\n"
                  f"runpy.run_path({argv[0]!r}, run_name='__main__')\n")
        cmd = [sys.executable, "-c", runner]
    else:
        cmd = [sys.executable, *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, name: str) -> str:
    """The expected-failure contract: exit 2, no traceback, the last stderr line is the tool's one error line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{name}.py: error: "), lines
    return lines[-1]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A real one-iteration checkpoint of a tiny mock-data model (vocabulary 128), built once."""
    root = tmp_path_factory.mktemp("ckpt") / "ckpt"
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY, "--train-iters", "1", "--save", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (root / CHECKPOINT_FILE).is_file(), proc.stderr[-3000:]
    return root


@pytest.fixture
def truncated(ckpt, tmp_path) -> Path:
    root = tmp_path / "truncated"
    shutil.copytree(ckpt, root)
    path = root / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> str:
    """A 300-piece sentencepiece model (byte fallback alone is 256 pieces: larger than the tiny model's 128)."""
    from megatron_sr.data.tokenizer_training import train_sentencepiece

    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "night", "green", "quiet"]
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
    return train_sentencepiece(docs, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Paragraphs enough for many writes of a few hundred bytes each."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"the river {i} runs by the green stone at night" * 3 for i in range(600)))
    return path


# -- tools/generate.py (its refusal of non-finite weights and negative settings: tests/test_reliability.py) --------

def test_generate_on_a_foreign_torch_file(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"x": 1}, foreign)
    line = one_error_line(tool("generate", "--load", foreign), "generate")
    assert str(foreign) in line and "not a model exported by convert_checkpoint.py" in line


def test_generate_on_a_truncated_checkpoint_names_the_file(truncated):
    line = one_error_line(tool("generate", "--load", truncated), "generate")
    assert str(truncated / CHECKPOINT_FILE) in line and "truncated or corrupt" in line


def test_generate_with_a_tokenizer_larger_than_the_model_names_both_sizes(ckpt, tok_model):
    line = one_error_line(tool("generate", "--load", ckpt, "--tokenizer-model", tok_model), "generate")
    assert f"--tokenizer-model {tok_model}" in line and "300" in line and "128" in line


# -- tools/convert_checkpoint.py --------------------------------------------------------------------------------

def test_convert_a_truncated_checkpoint_names_the_file(truncated, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(tool("convert_checkpoint", "--load", truncated, "--save", out), "convert_checkpoint")
    assert str(truncated / CHECKPOINT_FILE) in line and "truncated or corrupt" in line
    assert not out.exists()


def test_a_refused_conversion_leaves_no_staging_directory(ckpt, tmp_path):
    """write_checkpoint refuses after it made its staging directory."""
    out = tmp_path / "out"
    out.mkdir()  # the user's directory stays, empty
    proc = tool("convert_checkpoint", "--load", ckpt, "--save", out, "--target-pipeline-model-parallel-size", "3")
    assert "do not divide into 3 pipeline stages" in one_error_line(proc, "convert_checkpoint")
    assert files_under(out) == []


def test_a_conversion_failing_half_way_leaves_nothing(ckpt, tmp_path):
    """The disk fills after the first file of the new checkpoint: no iter_*, no .iter_*.tmp, no root."""
    out = tmp_path / "out"
    patch = """
        import errno
        import megatron_sr.checkpoint.convert as convert
        real, calls = convert.atomic_torch_save, []
        def full_disk(obj, path):
            calls.append(path)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(obj, path)
        convert.atomic_torch_save = full_disk
    """
    line = one_error_line(tool("convert_checkpoint", "--load", ckpt, "--save", out, patch=patch), "convert_checkpoint")
    assert "No space left on device" in line and str(out / ".iter_0000001.tmp") in line
    assert not out.exists(), files_under(out)


# -- tools/quickstart.py ----------------------------------------------------------------------------------------

def test_quickstart_with_a_missing_input_says_which_step_failed(tmp_path):
    work = tmp_path / "work"
    proc = tool("quickstart", "--no-install", "--input", tmp_path / "missing.txt", "--workdir", work)
    line = one_error_line(proc, "quickstart")
    assert "tools/train_tokenizer.py" in line and "exit code 2" in line
    child = proc.stderr.strip().splitlines()[-2]  # the child's own reason, just above
    assert child == f"train_tokenizer.py: error: {tmp_path / 'missing.txt'}: no such file or directory"
    assert files_under(work) == []


# -- tools/preprocess_data.py -----------------------------------------------------------------------------------

FULL_DISK = """
    import builtins, errno
    import megatron_sr.data.indexed_dataset as ix

    class FullDisk:  # a file whose writes fail with ENOSPC once {limit} bytes are in
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, data):
            self.n += len(data)
            if self.n > {limit}:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    def open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f) if "{which}.tmp" in str(path) else f
    ix.open = open  # the writer's module looks `open` up in its globals first
"""


def preprocess_args(corpus: Path, out: Path, tok_model: str, *extra: str) -> list:
    return ["--input", corpus, "--output-prefix", out / "o", "--tokenizer-model", tok_model,
            "--text-docs", "paragraph", "--no-progress", *extra]


@pytest.mark.parametrize("which, limit", [(".bin", 2000), (".idx", 40)])
def test_preprocess_on_a_full_disk_leaves_no_temporary_file(corpus, tok_model, tmp_path, which, limit):
    out = tmp_path / "out"
    proc = tool("preprocess_data", *preprocess_args(corpus, out, tok_model),
                patch=FULL_DISK.replace("{limit}", str(limit)).replace("{which}", which))
    line = one_error_line(proc, "preprocess_data")
    assert str(out / "o_text_document.bin") in line and "the disk is full" in line
    if which == ".bin":  # a document's write: its size is known
        assert "a write of " in line and " bytes" in line
    assert files_under(out) == []


def test_preprocess_on_a_real_full_tmpfs(corpus, tok_model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {mounted.stderr.decode().strip()}")
    try:
        line = one_error_line(tool("preprocess_data", *preprocess_args(corpus, mnt, tok_model)), "preprocess_data")
        assert str(mnt / "o_text_document.bin") in line and "the disk is full" in line
        assert files_under(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_preprocess_removes_temporaries_of_a_killed_run_but_not_of_a_running_one(corpus, tok_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID names no running process now
    stale = [out / f"o_text_document.bin.tmp{gone.pid}", out / f"o_text_document.idx.tmp{gone.pid}"]
    live = out / f"o_text_document.bin.tmp{os.getpid()}"  # this test process runs
    other = out / f"other.bin.tmp{gone.pid}"  # another output's: not ours to remove
    for p in (*stale, live, other):
        p.write_bytes(b"partial")
    proc = tool("preprocess_data", *preprocess_args(corpus, out, tok_model))
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "2 temporary file(s)" in notes[0] and all(str(p) in notes[0] for p in stale)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert (out / "o_text_document.bin").is_file() and (out / "o_text_document.idx").is_file()


# -- one error boundary: preprocess_data.py and train_tokenizer.py ----------------------------------------------

@pytest.mark.parametrize("name, target", [
    ("preprocess_data", "megatron_sr.data.preprocess.preprocess"),
    ("train_tokenizer", "megatron_sr.data.tokenizer_training.train_sentencepiece"),
])
def test_data_tools_error_boundary(corpus, tok_model, tmp_path, name, target):
    args = (preprocess_args(tmp_path / "missing.txt", tmp_path / "out", tok_model) if name == "preprocess_data"
            else ["--input", tmp_path / "missing.txt", "--vocab-size", "300", "--output-prefix", tmp_path / "t"])
    line = one_error_line(tool(name, *args), name)
    assert line == f"{name}.py: error: {tmp_path / 'missing.txt'}: no such file or directory"

    # A bug: one summary line, then the traceback, and not exit 2.
    module, _, func = target.rpartition(".")
    good = [str(corpus) if a == tmp_path / "missing.txt" else a for a in args]
    patch = f"""
        import {module} as m
        def broken(*args, **kwargs):
            raise KeyError("a bug")
        m.{func} = broken
    """
    proc = tool(name, *good, patch=patch)
    assert proc.returncode not in (0, 2) and "Traceback" in proc.stderr
    assert f"{name}.py: internal error: KeyError: 'a bug'" in proc.stderr.splitlines()
    assert files_under(tmp_path / "out") == [] and not list(tmp_path.glob("t.*"))


def test_errno_of_a_full_disk_is_kept():
    """The preprocessing error stays an OSError with its errno (callers may tell a full disk apart)."""
    from megatron_sr.data.preprocess import OutputWriteError, _write_error

    err = _write_error("x.bin", OSError(errno.ENOSPC, "No space left on device"), "a write of 8 bytes")
    assert isinstance(err, OutputWriteError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err).startswith("x.bin: cannot write the dataset: the disk is full (a write of 8 bytes)")
