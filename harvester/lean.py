"""Keep pandas out of ``harvester run``.

``pa.array(a_python_list)`` asks pyarrow's pandas shim whether the list is a pandas object,
and the shim's first answer imports pandas when it is installed: ~60 MiB of resident memory
(measured by ``benchmarks/scale.py``) and, since the first conversion happens in the sink's
writer thread, half a second of import holding the GIL, so the event loop stalls as long.
Nothing a run converts is a pandas object. ``skip_pandas_probe`` makes the shim's one import
attempt fail while pandas is not loaded yet; the shim remembers "no pandas" for that probe
only: an explicit pandas call later (``Table.to_pandas``) retries the import and works.
"""

from __future__ import annotations

import sys
import threading

import pyarrow as pa

_lock = threading.Lock()


class _NoPandas:
    """A meta path finder for which pandas does not exist (installed for one call)."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is kept out of harvester run (lean.py)")


def skip_pandas_probe() -> None:
    """Let pyarrow's first pandas probe find no pandas, unless pandas is loaded already."""
    with _lock:
        if "pandas" in sys.modules:
            return  # in use in this process (a test, a notebook): leave it be
        finder = _NoPandas()
        sys.meta_path.insert(0, finder)
        try:
            pa.array([], type=pa.string())  # the shim's one attempt, made now
        finally:
            sys.meta_path.remove(finder)
