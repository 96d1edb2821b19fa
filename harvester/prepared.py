"""A completed row already in Arrow (decoded by ``bigbody.py``), as the client returns it and
the sink stores it; kept apart so that client and sink need not import the process pool."""

from __future__ import annotations

from typing import Final, Protocol

import pyarrow as pa

from .model import Kind

__all__ = ["BIG_BODY_BYTES", "BigDecoder", "Prepared"]

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


class BigDecoder(Protocol):
    """What the client hands a big 200 body to (``bigbody.BigBodies``)."""

    async def parse_ok(self, content_type: str, body: bytes) -> tuple[Kind, Prepared | None]: ...
