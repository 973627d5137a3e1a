"""Kernels of our own, in C: compiled at first use with the machine's C compiler, loaded with ctypes.

Only for kernels a benchmark shows beat torch's and scipy's on the shapes they serve; every caller
keeps a torch path and uses it where `library` returns None (no compiler, a failed build, or
FXCOMPRESS_NO_C=1). The sources ship in csrc/ beside this file. A built library is cached under
$FXCOMPRESS_CACHE (default ~/.cache/fxcompress) by the hash of its source, the compiler, the flags
and this CPU's feature flags (the build targets this CPU), and it is written under a temporary
name and renamed, so processes building at once never load a half-written file.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from fxcompress.errors import ConfigError

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno")


def sources() -> list[str]:
    """The names of the kernels shipped in csrc/."""
    return sorted(path.stem for path in SOURCES.glob("*.c"))


def cache_dir() -> Path:
    return Path(os.environ.get("FXCOMPRESS_CACHE") or Path.home() / ".cache" / "fxcompress")


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library `name` (csrc/`name`.c), or None where it cannot be built here."""
    source = SOURCES / f"{name}.c"
    if not source.is_file():
        raise ConfigError(f"no C kernel named {name!r}; shipped: {sources()}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("FXCOMPRESS_NO_C") == "1" or not compiler or not shutil.which(compiler):
        return None
    target = cache_dir() / f"{name}-{_key(source, compiler)}.so"
    try:
        if not target.exists():
            _build(source, compiler, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"C kernel {name!r} could not be built or loaded ({exc}); using torch's kernels", stacklevel=2)
        return None


def _key(source: Path, compiler: str) -> str:
    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join((compiler, *FLAGS, platform.machine(), _cpu_flags())).encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """This CPU's feature flags where the OS lists them: -march=native code is only valid on such a CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(source: Path, compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)
