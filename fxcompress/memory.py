"""Handing freed memory back to the operating system: between passes (compile), between the
layers of a pass and between the encoder's batches.

glibc's malloc keeps freed blocks for reuse, and after a large block is freed it raises the size
above which it maps memory directly (up to 32 MiB), so the encoder's transients — arrays of a few
MiB each, freed batch by batch — stay resident after they are freed, and a model's resident size
grows by what earlier passes and batches left behind. `malloc_trim(0)` returns the free pages of
every arena. Elsewhere (another C library, another system) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _trim_function():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return None


_TRIM = _trim_function()


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system; False where the C library offers no way."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
