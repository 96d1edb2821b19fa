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
from typing import Final

import pyarrow as pa

from .errors import BadResponseError
from .model import Kind

__all__ = ["BIG_BODY_BYTES", "BigBodies", "Prepared"]

# Bodies from this size on are decoded in the pool: orjson takes ~3 ms a MiB of non-ASCII
# JSON here, so a smaller body stalls the loop less than a round trip to the pool costs.
BIG_BODY_BYTES: Final = 1 << 20


class Prepared:
    """One completed row decoded in the pool: its ``model`` (for the partition) and the row
    as Arrow IPC in ``FILE_SCHEMA`` (``id``, ``polls`` and ``harvested_at`` are set by the
    sink): bytes, or a memory-mapped file of them (no copy in this process)."""

    __slots__ = ("ipc", "model")

    def __init__(self, model: str, ipc: bytes | pa.Buffer) -> None:
        self.model = model
        self.ipc = ipc

    def __getitem__(self, name: str) -> str:
        if name != "model":  # only the partition is read before the writer thread
            raise KeyError(name)
        return self.model

    @property
    def nbytes(self) -> int:
        return len(self.ipc) if isinstance(self.ipc, bytes) else self.ipc.size

    def table(self) -> pa.Table:
        """The row as a one-row table (zero-copy over ``ipc``)."""
        return pa.ipc.open_stream(pa.py_buffer(self.ipc)).read_all()


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
    from .client import parse_ok
    from .sink import row_table

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
