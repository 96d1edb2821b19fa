"""Which allocator Arrow uses in a harvester process: jemalloc where pyarrow's wheels ship it.

Since pyarrow 20 the default is mimalloc, which here kept ~40 MiB more resident at saturation
(a 300k-id in-process run: peak 224-230 MiB with jemalloc, 266-274 with mimalloc, 262-264
with the system allocator, at the same rows/s; benchmarks/scale.py). Arrow reads the choice
once, from ``ARROW_DEFAULT_MEMORY_POOL``, when it first allocates, and ``pa.set_memory_pool``
later does not reach every C++ allocation (measured: 242-249 MiB), so the variable is set
before pyarrow is imported: importing this package does it (``harvester/__init__.py``).
A value the user set is kept; so is the default where jemalloc is not in the wheels (Arrow
would warn on stderr and fall back).
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["ARROW_POOL_VARIABLE", "prefer_jemalloc"]

ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
# pyarrow's Linux x86-64 wheels are built with jemalloc; elsewhere it may be missing (Windows)
# or built for another page size (aarch64 kernels with 64 KiB pages).
_HAS_JEMALLOC = sys.platform == "linux" and platform.machine() in {"x86_64", "AMD64"}


def prefer_jemalloc() -> None:
    """Ask Arrow for jemalloc unless the user chose a pool; a no-op once pyarrow allocated."""
    if _HAS_JEMALLOC:
        os.environ.setdefault(ARROW_POOL_VARIABLE, "jemalloc")
