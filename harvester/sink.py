"""Buffers terminal rows and commits them as Parquet files, encoded off the event loop.

A file is written under a hidden temporary name, fsynced, then renamed into place: a file a
reader can see is always complete, and a row is done exactly when its file is renamed. What
was buffered but not yet committed is lost on a crash (at most ``flush_interval`` of work)
and is polled again by the next run, so nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from sys import getsizeof
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .dataset import FILE_SCHEMA, STRING_COLUMNS, fsync_dir, partition_dir
from .errors import OutputError
from .model import TEXT_FIELDS, Completion, Kind

# Text columns counted toward the buffer's size (targeting values are a few bytes).
_SIZED = frozenset(TEXT_FIELDS)


@dataclass
class _Columns:
    """Rows of one partition, column by column, until the next flush."""

    id: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    texts: dict[str, list[str | None]] = field(
        default_factory=lambda: {name: [] for name in STRING_COLUMNS}
    )
    fanouts: list[list[str] | None] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)
    harvested_at: list[int] = field(default_factory=list)
    extra: list[str | None] = field(default_factory=list)

    def table(self) -> pa.Table:
        arrays: dict[str, Any] = {"id": self.id, "status": self.status, **self.texts}
        arrays.update(
            fanouts=self.fanouts,
            polls=self.polls,
            harvested_at=self.harvested_at,
            extra=self.extra,
        )
        return pa.table({name: arrays[name] for name in FILE_SCHEMA.names}, schema=FILE_SCHEMA)


class ParquetSink:
    """Collects rows by partition and commits them in files of large row groups."""

    def __init__(
        self,
        root: Path,
        *,
        run_id: str,
        flush_rows: int = 50_000,
        flush_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self._clock = clock
        self._parts: dict[tuple[str, str | None], _Columns] = {}
        self._rows = 0
        self._bytes = 0
        self._seq = 1  # 0 is the empty file a fresh DIR starts with (``commit_empty``)
        self._lock = asyncio.Lock()
        self._full = asyncio.Event()
        self._day = (-1, "")
        self.rows_written = 0
        self.files_written = 0

    def full(self) -> bool:
        """True once the buffer should be committed."""
        return self._rows >= self.flush_rows or self._bytes >= self.flush_bytes

    def overfull(self) -> bool:
        """True when producers must wait for a flush: keeps memory bounded."""
        return self._rows >= 2 * self.flush_rows or self._bytes >= 2 * self.flush_bytes

    def add(self, conversation_id: str, kind: Kind, doc: Completion | None, polls: int) -> None:
        """Buffer one terminal row (``doc`` is the validated Completion for completed ids)."""
        now = self._clock()
        model = doc["model"] if doc is not None else None
        cols = self._columns(self._date(now), model)
        cols.id.append(conversation_id)
        cols.status.append(kind.value)
        cols.polls.append(polls)
        cols.harvested_at.append(int(now * 1_000_000))
        if doc is None:
            for values in cols.texts.values():
                values.append(None)
            cols.fanouts.append(None)
            cols.extra.append(None)
        else:
            self._bytes += self._add_doc(cols, doc)
        self._bytes += 200
        self._rows += 1
        if self.full():
            self._full.set()

    async def commit_periodically(self, interval: float) -> None:
        """Commit when the buffer is full, and at least every ``interval`` seconds (the most
        a crash can lose); runs until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), interval)
            await self.flush()

    async def flush(self, *, only_if_full: bool = False) -> None:
        """Commit everything buffered so far; the encoding runs in a worker thread.

        ``only_if_full``: a producer waiting for back-pressure skips the flush if another one
        emptied the buffer meanwhile, rather than committing a file of a few rows.
        """
        async with self._lock:
            if not self._rows or (only_if_full and not self.full()):
                return
            self._full.clear()
            parts, self._parts = self._parts, {}
            self._rows, self._bytes = 0, 0
            seq, self._seq = self._seq, self._seq + len(parts)
            write = asyncio.ensure_future(asyncio.to_thread(self._write_all, parts, seq))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # These rows have left the buffer: their commit must land (or fail loudly)
                # before anyone releases the lease or reads the dataset.
                await write
                raise

    def _columns(self, day: str, model: str | None) -> _Columns:
        key = (day, model)
        cols = self._parts.get(key)
        if cols is None:
            cols = self._parts[key] = _Columns()
        return cols

    def _date(self, now: float) -> str:
        day = int(now // 86400)
        if self._day[0] != day:
            self._day = (day, datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"))
        return self._day[1]

    @staticmethod
    def _add_doc(cols: _Columns, doc: Completion) -> int:
        size = 0
        for name, values in cols.texts.items():
            value = doc[name]  # type: ignore[literal-required]
            values.append(value)
            if name in _SIZED:
                size += getsizeof(value)  # real memory: non-ASCII text takes 2-4 bytes a char
        cols.fanouts.append(doc["fanouts"])
        extra = doc["extra"]
        cols.extra.append(extra)
        fanouts = doc["fanouts"]
        return size + (len(extra) if extra else 0) + sum(map(getsizeof, fanouts))

    def _write_all(self, parts: dict[tuple[str, str | None], _Columns], seq: int) -> None:
        for offset, ((day, model), cols) in enumerate(parts.items()):
            self._write_one(partition_dir(self.root, day, model), cols, seq + offset)

    def _write_one(self, directory: Path, cols: _Columns, seq: int) -> None:
        rows = _commit(directory, f"part-{self.run_id}-{seq:06d}.parquet", cols.table())
        # Counted here, in the writer thread, so a cancelled flush still counts its files.
        self.rows_written += rows
        self.files_written += 1


def commit_empty(root: Path, run_id: str, now: float) -> None:
    """Commit a file of no rows, so that a DIR no answer has reached yet (a run stopped
    while loading, or killed) still opens in every reader with every column typed: pyarrow
    infers no types from metadata alone, and DuckDB and Polars refuse a glob matching
    nothing. Harmless beside any other file, so it needs no lease."""
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    _commit(partition_dir(root, day, None), f"part-{run_id}-000000.parquet", _Columns().table())


def _commit(directory: Path, name: str, table: pa.Table) -> int:
    """Write ``table`` as ``directory/name``: hidden temporary, fsync, rename; its rows."""
    tmp = directory / f".{name}.tmp"
    try:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)  # other shards may make it too
        if created:  # a new partition folder must survive a power cut with its file
            fsync_dir(directory.parent)
            fsync_dir(directory.parent.parent)
        with tmp.open("wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=max(1, table.num_rows))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / name)
        fsync_dir(directory)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {directory / name}: {exc}") from exc
    return int(table.num_rows)
