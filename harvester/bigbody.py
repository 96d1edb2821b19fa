"""Big answers decoded off the event loop, in a child process, and handed over as Arrow.

``orjson.loads`` of a 27 MiB non-ASCII body holds the GIL for 80-100 ms, and so does turning
its 25 MiB ``str`` into Arrow: a thread does not help (both hold the GIL), so the loop would
stall that long. A 200 answer of at least ``BIG_BODY_BYTES`` is therefore sent to a process
pool (one process, started at the first such answer), which runs the very same
``client.parse_ok`` and the very same row conversion as the sink (``sink.row_table``), and
returns the row as Arrow IPC bytes. The loop receives ``bytes`` (a memcpy when unpickled, in
the pool's result thread) and the sink's writer thread reads them without a copy
(``Prepared.table``): no big ``str`` ever exists in this process, and the value stored is
the one ``parse_ok`` produced, so fidelity is that of the small-body path.

The pool is started with ``spawn``, which imports the parent's ``__main__`` in the child: a script
that calls ``harvester.runner.harvest`` must do so under ``if __name__ == "__main__":`` (the
``harvester`` command and ``python -m harvester`` need nothing).

Memory: a big body is held here while the child decodes it, and its row (about its UTF-8
size) until the sink commits it; the sink counts that toward ``--flush-bytes``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

from .client import parse_ok
from .errors import BadResponseError
from .model import Kind
from .prepared import Prepared
from .sink import row_table

__all__ = ["BigBodies", "decode", "decode_file"]


def decode_file(content_type: str, path: str) -> tuple[str, str, bytes | None]:
    """In the child: ``decode`` the body in the file ``path``; a row is written back into
    that file (its bytes returned empty), so no big buffer crosses the pipe."""
    with open(path, "rb") as handle:
        body = handle.read()
    what, value, data = decode(content_type, body)
    del body
    if what == "row" and data is not None:
        with open(path, "wb") as handle:
            handle.write(data)
        return what, value, b""
    return what, value, data


def decode(content_type: str, body: bytes) -> tuple[str, str, bytes | None]:
    """In the child: ``parse_ok`` and the sink's conversion; errors come back as values
    (``("error", label, message)``), results as ``("row", model, ipc)`` or
    ``("kind", kind, None)``."""
    try:
        kind, doc = parse_ok(content_type, body)
    except BadResponseError as exc:
        return ("error", exc.label, str(exc).encode())
    except Exception as exc:  # what poll() calls an unusable answer
        return ("error", "bad_answer", f"unusable answer ({type(exc).__name__})".encode())
    if doc is None:
        return ("kind", kind.value, None)
    table = row_table(doc)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return ("row", doc["model"], sink.getvalue().to_pybytes())


_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None  # None: the temporary folder


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class BigBodies:
    """The pool big 200 answers are decoded in; started on first use, one per run."""

    def __init__(self, processes: int = 1) -> None:
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def parse_ok(self, content_type: str, body: bytes) -> tuple[Kind, Prepared | None]:
        """What ``client.parse_ok`` returns, but a Completion comes back as ``Prepared``."""
        if self._pool is None:
            # spawn, not fork: this process has threads (to_thread, the metrics server).
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self._processes, mp_context=context)
        loop = asyncio.get_running_loop()
        # The body goes through a file in shared memory (tmpfs), not the pool's pipe: a
        # pipe costs several copies of it, each holding the GIL (~25 ms of loop lag for a
        # 27 MiB body); os.write and the memory map below copy nothing under the GIL.
        fd, path = tempfile.mkstemp(prefix="harvester-body-", dir=_SHM)
        try:
            await asyncio.to_thread(_write_all, fd, body)
            del body
            call = loop.run_in_executor(self._pool, decode_file, content_type, path)
            try:
                what, value, data = await call
            except BrokenProcessPool as exc:  # the child died (out of memory, say)
                self._pool = None
                raise BadResponseError("decode_failed", "the decoding process died") from exc
            if what == "error":
                raise BadResponseError(value, (data or b"").decode())
            if what == "kind":
                return Kind(value), None
            mapped = pa.memory_map(path).read_buffer()  # pages stay mapped once unlinked
            return Kind.COMPLETED, Prepared(value, mapped)
        finally:
            os.close(fd)
            os.unlink(path)

    def close(self) -> None:
        """Stop the pool (a decode still running is abandoned: its id is polled again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
