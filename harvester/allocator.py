"""How a harvester process allocates: Arrow from jemalloc, and glibc's malloc with fixed thresholds.

Since pyarrow 20 the default is mimalloc, which here kept ~40 MiB more resident at saturation
(a 300k-id in-process run: peak 224-230 MiB with jemalloc, 266-274 with mimalloc, 262-264
with the system allocator, at the same rows/s; benchmarks/scale.py). Arrow reads the choice
once, from ``ARROW_DEFAULT_MEMORY_POOL``, when it first allocates, and ``pa.set_memory_pool``
later does not reach every C++ allocation (measured: 242-249 MiB), so the variable is set
before pyarrow is imported: importing this package does it (``harvester/__init__.py``).
A value the user set is kept; so is the default where jemalloc is not in the wheels (Arrow
would warn on stderr and fall back).

glibc's malloc holds Python's larger objects: answers, lines, the writer's ~8 MiB joins of a
row group's lines. By default it raises its mmap threshold to the largest block freed (up to
32 MiB) and its trim threshold to twice that. After the first 8 MiB join, every later one
comes from the heap, and what is freed stays resident. ``fix_malloc_thresholds`` fixes both
at 1 MiB for the harvest (``runner.py``). Blocks that big are mapped and returned when freed,
and a 275 KB answer still comes from the heap. Measured on a 200k-id in-process run
(benchmarks/scale.py): peak RSS 191-201 MiB instead of 215-227, at the same rows/s.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = [
    "ARROW_POOL_VARIABLE",
    "MALLOC_THRESHOLD",
    "MALLOC_VARIABLES",
    "fix_malloc_thresholds",
    "prefer_jemalloc",
]

ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
# pyarrow's Linux x86-64 wheels are built with jemalloc; elsewhere it may be missing (Windows)
# or built for another page size (aarch64 kernels with 64 KiB pages).
_HAS_JEMALLOC = sys.platform == "linux" and platform.machine() in {"x86_64", "AMD64"}


def prefer_jemalloc() -> None:
    """Ask Arrow for jemalloc unless the user chose a pool; a no-op once pyarrow allocated."""
    if _HAS_JEMALLOC:
        os.environ.setdefault(ARROW_POOL_VARIABLE, "jemalloc")


# mallopt's parameters (malloc.h); giving either one a value turns the dynamic adjustment off.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_THRESHOLD = 1 << 20
# Whoever tuned glibc's malloc through its environment keeps their settings.
MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def fix_malloc_thresholds() -> bool:
    """Fix glibc malloc's mmap and trim thresholds at ``MALLOC_THRESHOLD`` for this process,
    unless the user tuned malloc or the C library is not glibc; True if they were set."""
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD) == 1)
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD) == 1)
    return mmap_set and trim_set
