"""Building and loading the project's small C++ libraries (plain C entry points, loaded with ctypes).

Each library is built once per (sources, flags, compiler version, CPU) with the system C++ compiler into
~/.cache/megatron_sr/cpu-<hash>/ (MEGATRON_SR_EXT_DIR moves it; the compiler is $CXX, else c++ or g++). No
torch headers: a build takes a second or two and survives torch upgrades. The build writes to a temporary
name and renames it in, so processes that build at the same time (test workers, torchrun ranks) never load
a half-written file. `NativeUnavailable` says why a library cannot be had (no compiler, a failed build);
callers then take their PyTorch path. MEGATRON_SR_CPU_FAST=0 turns every library off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


class NativeUnavailable(RuntimeError):
    """A C++ library cannot be used in this process; the message says why."""


def enabled() -> bool:
    return os.environ.get("MEGATRON_SR_CPU_FAST", "1") != "0"


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else c++ or g++ on the PATH (None: there is none)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("c++") or shutil.which("g++")


def cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = ("model name", "flags", "features", "cpu part", "cpu implementer")
    seen: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in keep and name not in seen:
            seen[name] = value.strip()
    return f"{platform.machine()} {sorted(seen.items())}"


def build_directory(cxx: str, sources: tuple[Path, ...], flags: tuple) -> Path:
    """~/.cache/megatron_sr/cpu-<hash of the sources (headers included), flags, compiler version and CPU>."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"the C++ compiler {cxx} does not run: {exc}") from exc
    digest = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sources), repr(flags).encode(), version.encode(), cpu_identity().encode()):
        digest.update(part)
    root = os.environ.get("MEGATRON_SR_EXT_DIR") or Path.home() / ".cache" / "megatron_sr"
    return Path(root) / f"cpu-{digest.hexdigest()[:16]}"


def compile_library(cxx: str, source: Path, target: Path, base_flags: tuple, arch_flags: tuple, what: str) -> None:
    """Build `source` into a temporary file next to `target`, then rename it in; retried without
    `arch_flags` when the compiler refuses them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (arch_flags, ()) if arch_flags else ((),):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *base_flags, *arch, str(source), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(cmd)}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"building the {what} failed: " + " | ".join(errors))


def load_library(name: str, source: Path, headers: tuple[Path, ...], base_flags: tuple, arch_flags: tuple,
                 what: str) -> ctypes.CDLL:
    """lib<name>.so built from `source` (and the `headers` it includes, which the hash covers), loaded."""
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    target = build_directory(cxx, (source, *headers), (base_flags, arch_flags)) / f"lib{name}.so"
    if not target.is_file():
        compile_library(cxx, source, target, base_flags, arch_flags, what)
    return ctypes.CDLL(str(target))
