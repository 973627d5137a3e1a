"""release_freed_memory hands the C heap's free pages back where glibc offers malloc_trim."""
import ctypes.util
import os
import sys

import numpy as np

from fxcompress.memory import release_freed_memory


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_freed_heap_pages_leave_the_resident_size():
    glibc = sys.platform.startswith("linux") and "libc.so.6" in str(ctypes.util.find_library("c"))
    assert release_freed_memory() == glibc
    if not glibc or "MALLOC_MMAP_THRESHOLD_" in os.environ:  # a fixed threshold maps these blocks: nothing kept
        return
    np.ones(1 << 21).sum()  # a 16 MiB mapping, freed at once, raises glibc's threshold: smaller blocks then come from the heap
    kept = [np.ones(1 << 15) for _ in range(600)]  # 256 KiB blocks
    del kept[::2]  # every other block freed: holes no allocation at the heap's top can close
    before = _rss_kb()
    assert release_freed_memory()
    assert before - _rss_kb() > 50_000  # KiB: most of the 75 MiB of holes went back to the system
