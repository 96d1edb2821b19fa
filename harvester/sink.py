"""Buffers terminal rows and commits them as Parquet files, encoded off the event loop.

Each file is committed through the dataset's ``Store``: locally under a hidden temporary
name, fsynced, then renamed into place; in object storage as one PUT of a key unique to the
run and commit. A file a reader can see is always complete, and a row is done exactly when
its file appears. What was buffered but not yet committed is lost on a crash (at most
``flush_interval`` of work) and is polled again by the next run, so nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from sys import getsizeof
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.json as pa_json

from .dataset import FILE_SCHEMA, STRING_COLUMNS, partition_rel
from .model import API_FIELDS, TEXT_FIELDS, Completion, Headline, Kind
from .prepared import Prepared
from .storage import Store, open_store

# Text columns counted toward the buffer's size (targeting values are a few bytes).
_SIZED = frozenset(TEXT_FIELDS)
# Rows are turned into Arrow about this much text at a time (see ``_Columns.pieces``): a copy
# of 256 KiB holds the GIL for about 0.1 ms. Measured in ``benchmarks/scale.py`` at saturation:
# before the row groups below, 2 MiB slices left a loop-lag p99 of 55 ms and 256 KiB 17 ms; with
# them, 4 alternating pairs of 200k-id runs put the two within noise on lag, and 256 KiB ~10%
# lower on rows/s (medians 12.0k vs 13.4k a second, on a loaded machine): worth re-measuring.
SLICE_BYTES = 256 * 1024
# A flush is written in row groups of about this much text (``_Columns.pieces``).
ROW_GROUP_BYTES = 8 * 1024 * 1024
# Rows of at least this much text on average are converted with more threads: Arrow's JSON
# reader parses blocks in its pool, and each row group is made while the last is encoded
# (``_ahead``). Then the writer sets the pace (at 200 KB pages it was busy all the time, the
# loop thread a third of it): the two took a harvest from 790 to 1,050 rows/s. With short
# rows the loop sets it, and the extra threads only took CPU from it: 4-10% fewer rows/s at
# 5 KB pages. Measured in alternating runs against nginx (``benchmarks/throughput.py``).
LONG_ROW_BYTES = 32 * 1024
# The Completion's columns as Arrow's JSON reader is asked for them (``_Bodies``).
_BODY_SCHEMA = pa.schema([FILE_SCHEMA.field(name) for name in API_FIELDS])
_BODY_PARSE = pa_json.ParseOptions(explicit_schema=_BODY_SCHEMA, unexpected_field_behavior="ignore")
_FANOUTS_TYPE = FILE_SCHEMA.field("fanouts").type


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
    # Big rows decoded off the loop (``bigbody.py``): id, polls, harvested_at, the row.
    prepared: list[tuple[str, int, int, Prepared]] = field(default_factory=list)

    nbytes: int = 0  # the text buffered, as counted by ``ParquetSink.add``

    def table(self) -> pa.Table:
        """The rows as one table (``pieces`` joined)."""
        return pa.concat_tables(list(self.pieces()))

    def pieces(self) -> Iterator[pa.Table]:
        """The rows as tables of about ``ROW_GROUP_BYTES`` of text (a row group each),
        converted a slice of about ``SLICE_BYTES`` at a time, each one's Python values
        released as soon as it is converted; at least one table, maybe of no rows.

        pyarrow holds the GIL while it copies Python strings into Arrow buffers; one call over
        a whole flush (tens of MB) would stall the event loop, in the other thread, as long.
        Between two slices the loop thread gets the GIL back (the interpreter hands it over
        every ``sys.getswitchinterval()``), so a stall is bounded by one slice's copy. And a
        flush holds, besides its Python values, only one row group in Arrow at a time, not
        a copy of the whole file.
        """
        arrays: dict[str, Any] = {"id": self.id, "status": self.status, **self.texts}
        arrays.update(
            fanouts=self.fanouts,
            polls=self.polls,
            harvested_at=self.harvested_at,
            extra=self.extra,
        )
        rows = len(self.id)
        step = max(1, rows * SLICE_BYTES // max(self.nbytes, 1))
        group = step * max(1, ROW_GROUP_BYTES // SLICE_BYTES)
        for first in range(0, rows, group):
            last = min(first + group, rows)
            columns = [
                pa.chunked_array(
                    [
                        pa.array(arrays[f.name][start : min(start + step, last)], type=f.type)
                        for start in range(first, last, step)
                    ],
                    type=f.type,
                )
                for f in FILE_SCHEMA
            ]
            for values in arrays.values():  # converted: let the strings go now
                values[first:last] = itertools.repeat(None, last - first)
            yield pa.Table.from_arrays(columns, schema=FILE_SCHEMA)
        for prepared in self.prepared:
            yield _prepared_row(*prepared)
        if not rows and not self.prepared:
            yield FILE_SCHEMA.empty_table()


def _prepared_row(conversation_id: str, polls: int, micros: int, row: Prepared) -> pa.Table:
    """A big row read back from its Arrow bytes (no copy), with what the sink adds set."""
    table = row.table()
    for name, value in (("id", conversation_id), ("polls", polls), ("harvested_at", micros)):
        at = FILE_SCHEMA.get_field_index(name)
        column = FILE_SCHEMA.field(at)
        table = table.set_column(at, column, pa.array([value], type=column.type))
    return table


def row_table(doc: Completion) -> pa.Table:
    """One completed row converted exactly as the sink converts it (``bigbody.decode``);
    ``id``, ``polls`` and ``harvested_at`` are placeholders the sink sets."""
    cols = _Columns()
    cols.id.append("")
    cols.status.append(Kind.COMPLETED.value)
    cols.polls.append(0)
    cols.harvested_at.append(0)
    cols.nbytes = ParquetSink._add_doc(cols, doc)
    return cols.table()


@dataclass
class _Bodies:
    """Completed rows of one partition kept as the JSON bytes the server sent, one line each.

    Arrow's JSON reader parses them in the writer thread without the GIL. Turning the
    Completion's Python strings into Arrow instead holds the GIL for the whole copy (6 us a
    5 KB page, 250 us a 200 KB page, on the event loop's time), and a non-ASCII str takes
    2-4 bytes a character in memory where its UTF-8 takes about one.
    """

    id: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)  # each a JSON object on one line
    polls: list[int] = field(default_factory=list)
    harvested_at: list[int] = field(default_factory=list)
    extra: list[str | None] = field(default_factory=list)
    nbytes: int = 0

    def table(self) -> pa.Table:
        """The rows as one table (``pieces`` joined)."""
        return pa.concat_tables(list(self.pieces()))

    def pieces(self) -> Iterator[pa.Table]:
        """The rows as tables of about ``ROW_GROUP_BYTES`` of JSON (a row group each), each
        group's bytes released once parsed; at least one table, maybe of no rows. Parsed
        without the GIL; only the join of a group's lines (a memcpy) holds it."""
        rows, start = len(self.lines), 0
        while start < rows or not start:
            end, size = start, 0
            while end < rows and (size < ROW_GROUP_BYTES or end == start):
                size += len(self.lines[end]) + 1
                end += 1
            yield self._group(start, end)
            self.lines[start:end] = itertools.repeat(b"", end - start)  # let the bytes go
            start = end
            if not rows:
                return

    def _group(self, start: int, end: int) -> pa.Table:
        parsed = self._parse(self.lines[start:end])
        columns: dict[str, Any] = {name: parsed.column(name) for name in API_FIELDS}
        # null and absent fanouts are stored as [] (as validate_completion returns them).
        columns["fanouts"] = columns["fanouts"].fill_null(pa.scalar([], type=_FANOUTS_TYPE))
        columns.update(
            id=pa.array(self.id[start:end], type=pa.string()),
            status=pa.array([Kind.COMPLETED.value] * (end - start), type=pa.string()),
            polls=pa.array(self.polls[start:end], type=pa.int32()),
            harvested_at=pa.array(
                self.harvested_at[start:end], type=FILE_SCHEMA.field("harvested_at").type
            ),
            extra=pa.array(self.extra[start:end], type=pa.string()),
        )
        return pa.Table.from_arrays([columns[f.name] for f in FILE_SCHEMA], schema=FILE_SCHEMA)

    @staticmethod
    def _parse(lines: list[bytes]) -> pa.Table:
        if not lines:
            return _BODY_SCHEMA.empty_table()
        data = b"\n".join(lines)
        longest = max(map(len, lines))
        options = pa_json.ReadOptions(
            use_threads=len(data) >= LONG_ROW_BYTES * len(lines),
            block_size=max(1 << 20, longest + 2),
        )
        try:
            table = pa_json.read_json(
                pa.BufferReader(data), read_options=options, parse_options=_BODY_PARSE
            )
        except pa.ArrowInvalid:
            table = None  # a key sent twice, say: orjson keeps the last, Arrow refuses
        if table is None or table.num_rows != len(lines):
            # orjson's reading is the one validated: it decides, slowly, under the GIL.
            docs = [orjson.loads(line) for line in lines]
            return pa.Table.from_pydict(
                {name: [doc.get(name) for doc in docs] for name in API_FIELDS},
                schema=_BODY_SCHEMA,
            )
        return table.select(list(API_FIELDS))


class ParquetSink:
    """Collects rows by partition and commits them in files of large row groups."""

    def __init__(
        self,
        root: Path | Store,
        *,
        run_id: str,
        flush_rows: int = 50_000,
        flush_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = open_store(root)
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self._clock = clock
        self._parts: dict[tuple[str, str | None], _Columns] = {}
        self._bodies: dict[tuple[str, str | None], _Bodies] = {}
        self._rows = 0
        self._bytes = 0
        self._seq = 1  # 0 is the empty file a fresh DIR starts with (``commit_empty``)
        self._lock = asyncio.Lock()  # held while handing a buffer over, not while it is written
        self._writing: asyncio.Future[None] | None = None  # the last write started
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

    def add(
        self,
        conversation_id: str,
        kind: Kind,
        doc: Completion | Headline | Prepared | None,
        polls: int,
        body: bytes | None = None,
    ) -> None:
        """Buffer one terminal row (``doc`` is the validated Completion for completed ids).

        ``body``: the JSON the Completion was read from, on one line; given, the row's text
        is stored from it (``_Bodies``) rather than from ``doc``'s Python strings, and
        ``doc`` need only be its ``Headline`` (``client.parse_long_ok``).
        """
        now = self._clock()
        model = doc["model"] if doc is not None else None
        key = (self._date(now), model)
        if isinstance(doc, Prepared):  # a big row already in Arrow (bigbody.py)
            self._add_prepared(self._columns(key), conversation_id, polls, now, doc)
            return
        if body is not None and doc is not None:
            rows = self._bodies.get(key)
            if rows is None:
                rows = self._bodies[key] = _Bodies()
            rows.id.append(conversation_id)
            rows.lines.append(body)
            rows.polls.append(polls)
            rows.harvested_at.append(int(now * 1_000_000))
            extra = doc["extra"]
            rows.extra.append(extra)
            size = len(body) + (len(extra) if extra else 0)
            rows.nbytes += size
            self._bytes += size
        else:
            cols = self._columns(key)
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
                # Without its line a doc is the whole Completion: only poll_answer, which
                # always gives the line, hands over a bare Headline.
                size = self._add_doc(cols, cast(Completion, doc))
                cols.nbytes += size
                self._bytes += size
        self._bytes += 200
        self._rows += 1
        if self.full():
            self._full.set()

    def _add_prepared(
        self, cols: _Columns, conversation_id: str, polls: int, now: float, row: Prepared
    ) -> None:
        cols.prepared.append((conversation_id, polls, int(now * 1_000_000), row))
        cols.nbytes += row.nbytes
        self._bytes += row.nbytes + 200
        self._rows += 1
        if self.full():
            self._full.set()

    async def commit_periodically(self, interval: float) -> None:
        """Commit when the buffer is full, and at least every ``interval`` seconds (the most
        a crash can lose); runs until cancelled, or raises when a commit failed."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), interval)
            await self.flush()

    async def flush(self) -> None:
        """Commit everything buffered so far (after the write in progress, if any) and wait
        for it; the encoding runs in a worker thread."""
        write = await self._hand_over(only_if_full=False)
        if write is not None:
            await _committed(write)

    async def make_room(self) -> None:
        """Return once the buffer takes rows again: the write in progress has ended and the
        full buffer has gone to the writer, or another producer has done so meanwhile.

        Not once that buffer is committed: a producer held by back-pressure then polls on
        while the writer writes. Waiting for the commit made the two alternate instead (at
        200 KB pages the loop thread was busy a third of the time, the writer half).
        """
        await self._hand_over(only_if_full=True)

    async def settle(self) -> None:
        """Wait for the write in progress, if any; raise if it (or an earlier one) failed."""
        async with self._lock:
            await self._previous()

    async def _hand_over(self, *, only_if_full: bool) -> asyncio.Future[None] | None:
        """Start committing the buffer, one write at a time: the write, or None if there was
        nothing (or, ``only_if_full``, not enough) to commit."""
        async with self._lock:
            if only_if_full and not self.full():
                return None  # another producer made room while this one waited
            await self._previous()
            if not self._rows:
                return None
            self._full.clear()
            parts, self._parts = self._parts, {}
            bodies, self._bodies = self._bodies, {}
            self._rows, self._bytes = 0, 0
            keys = list(dict.fromkeys([*parts, *bodies]))  # one file a partition
            seq, self._seq = self._seq, self._seq + len(keys)
            write = self._writing = asyncio.ensure_future(
                asyncio.to_thread(self._write_all, keys, parts, bodies, seq)
            )
            write.add_done_callback(self._written)
            return write

    async def _previous(self) -> None:
        """Wait for the last write started; its failure stays raised for every later call,
        so no commit follows a lost one and the run's end reports it."""
        if self._writing is not None:
            await _committed(self._writing)

    def _written(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is not None:
            self._full.set()  # wake commit_periodically, which raises it: the run stops now

    def _columns(self, key: tuple[str, str | None]) -> _Columns:
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

    def _write_all(
        self,
        keys: list[tuple[str, str | None]],
        parts: dict[tuple[str, str | None], _Columns],
        bodies: dict[tuple[str, str | None], _Bodies],
        seq: int,
    ) -> None:
        for offset, key in enumerate(keys):
            buffers = [rows for rows in (parts.get(key), bodies.get(key)) if rows]
            pieces: Iterator[pa.Table] = itertools.chain.from_iterable(
                rows.pieces() for rows in buffers
            )
            count = sum(len(rows.id) for rows in buffers)
            if sum(rows.nbytes for rows in buffers) >= LONG_ROW_BYTES * max(count, 1):
                pieces = _ahead(pieces)
            self._write_one(partition_rel(*key), pieces, seq + offset)

    def _write_one(self, directory: str, tables: Iterator[pa.Table], seq: int) -> None:
        name = f"{directory}/part-{self.run_id}-{seq:06d}.parquet"
        rows = self.store.commit(name, tables)
        # Counted here, in the writer thread, so a cancelled flush still counts its files.
        self.rows_written += rows
        self.files_written += 1


def _ahead(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``tables``, each next one made in a helper thread while the caller encodes the one
    before: Arrow parses the JSON and Parquet encodes a row group without the GIL, so the
    two overlap. At 200 KB pages the parse took three quarters of the writer's time, and
    the writer, not the loop, set the pace."""
    with ThreadPoolExecutor(1, thread_name_prefix="harvester-rows") as pool:
        pending = pool.submit(next, tables, None)
        while (table := pending.result()) is not None:
            pending = pool.submit(next, tables, None)
            yield table


async def _committed(write: asyncio.Future[None]) -> None:
    """Wait for ``write`` (raising its failure); cancelled, still wait for it to end, then
    raise the cancellation.

    These rows have left the buffer: their commit must land (or fail loudly) before anyone
    releases the lease or reads the dataset. The write is shared (``_writing``: every later
    flush and ``settle`` wait on it), so a waiter cancelled twice must not cancel it.
    """
    cancelled = False
    while not write.done():
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    write.result()


def commit_empty(root: Path | Store, run_id: str, now: float) -> None:
    """Commit a file of no rows, so that a DIR no answer has reached yet (a run stopped
    while loading, or killed) still opens in every reader with every column typed: pyarrow
    infers no types from metadata alone, and DuckDB and Polars refuse a glob matching
    nothing. Harmless beside any other file, so it needs no lease."""
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    name = f"{partition_rel(day, None)}/part-{run_id}-000000.parquet"
    open_store(root).commit(name, _Columns().table())
