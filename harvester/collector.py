"""Keep CPython's cyclic garbage collector from pausing the event loop during a harvest.

A full (gen2) collection walks every tracked object: after imports that is ~70k modules,
functions and types, 30-60 ms each time on this VM, and a 2M-id run triggered it ~30 times,
which was most of the loop's lag maximum. ``gc.freeze()`` moves everything alive at the
start into a permanent generation those walks skip. What the harvest itself allocates
(requests, rows, batches) is acyclic and freed by reference counting, so collections
still run, over what is young, and nothing the run leaks in cycles stays uncollected.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["quiet_collector"]

_lock = threading.Lock()
_depth = 0  # nested harvests in one process (tests, bench) freeze once, thaw once


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """Freeze what is alive now for the block's duration; unfreeze after the outermost one."""
    global _depth
    with _lock:
        if _depth == 0:
            # No gc.collect() first: it would itself be a full pause, and the little
            # garbage alive now is freed on unfreeze.
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
