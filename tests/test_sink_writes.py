"""How the sink hands its buffer to the writer: one write at a time, producers held by
back-pressure only until the buffer takes rows again (not until it is committed), a failed
write raised by every later flush, and each row group made while the one before is encoded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from harvester.errors import OutputError
from harvester.model import Kind
from harvester.runner import harvest
from harvester.sink import ParquetSink, _ahead
from harvester.storage import LocalStore, Tables

from .conftest import ThreadedSimulator, fast_settings, make_ids, read_rows, write_csv


class GatedStore(LocalStore):
    """A local store whose every commit waits until the test opens its gate (or fails)."""

    def __init__(self, root: Path, *, fail: bool = False) -> None:
        super().__init__(root)
        self.fail = fail
        self.gates: list[threading.Event] = [threading.Event() for _ in range(8)]
        self.started = 0
        self.committed = 0

    def commit(self, rel: str, table: Tables) -> int:
        gate = self.gates[self.started]
        self.started += 1
        if not gate.wait(10):
            raise AssertionError("the test never opened this commit's gate")
        if self.fail:
            raise OutputError(f"cannot write {rel}: no space left on device")
        rows = super().commit(rel, table)
        self.committed += 1
        return rows


def fill(sink: ParquetSink, ids: list[str]) -> None:
    for conversation_id in ids:
        sink.add(conversation_id, Kind.FAILED, None, 1)


async def eventually(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_producer_under_back_pressure_waits_for_room_not_for_its_own_write(
    tmp_path: Path,
) -> None:
    """make_room returns once the full buffer has gone to the writer; a second one waits for
    the write in progress (one write at a time, so memory stays bounded), not for its own."""
    store = GatedStore(tmp_path)
    sink = ParquetSink(store, run_id="r", flush_rows=2)
    ids = make_ids(4, seed=61)
    fill(sink, ids[:2])
    await asyncio.wait_for(sink.make_room(), 5)  # nothing in progress: handed over at once
    assert not sink.full()
    await eventually(lambda: store.started == 1)
    fill(sink, ids[2:])
    second = asyncio.create_task(sink.make_room())
    await asyncio.sleep(0.05)
    assert not second.done()  # the first write still holds the writer
    store.gates[0].set()
    await asyncio.wait_for(second, 5)
    await eventually(lambda: store.started == 2)
    assert store.committed == 1  # returned while its own write waits at the gate
    store.gates[1].set()
    await asyncio.wait_for(sink.settle(), 5)
    assert store.committed == 2
    assert sorted(read_rows(tmp_path).column("id").to_pylist()) == sorted(ids)


async def test_make_room_hands_nothing_over_once_another_producer_made_room(
    tmp_path: Path,
) -> None:
    """Producers queued behind the write in progress: the first hands the full buffer over,
    the others return without starting a write of the few rows added since (no file of a
    handful of rows)."""
    store = GatedStore(tmp_path)
    sink = ParquetSink(store, run_id="r", flush_rows=3)
    fill(sink, make_ids(3, seed=62))
    await sink.make_room()  # write 1 starts, held at its gate
    fill(sink, make_ids(3, seed=63))
    waiters = [asyncio.create_task(sink.make_room()) for _ in range(5)]
    await asyncio.sleep(0.02)
    fill(sink, make_ids(1, seed=64))  # arrives while all five wait for write 1
    store.gates[0].set()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    await eventually(lambda: store.started == 2)
    store.gates[1].set()
    await asyncio.wait_for(sink.settle(), 5)
    assert store.started == 2  # write 1, and the 4 rows handed over once
    assert len(read_rows(tmp_path)) == 7


async def test_a_waiter_cancelled_twice_leaves_the_write_running(tmp_path: Path) -> None:
    """A flush cancelled (twice: a second SIGINT) while its rows are being written still
    waits for the write, which goes on, so settle waits for it too before the lease goes."""
    store = GatedStore(tmp_path)
    sink = ParquetSink(store, run_id="r", flush_rows=2)
    fill(sink, make_ids(2, seed=69))
    waiter = asyncio.create_task(sink.flush())
    await eventually(lambda: store.started == 1)
    for _ in range(2):
        waiter.cancel()
        await asyncio.sleep(0.02)
    assert not waiter.done()
    settling = asyncio.create_task(sink.settle())
    await asyncio.sleep(0.02)
    assert not settling.done()
    store.gates[0].set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)
    await asyncio.wait_for(settling, 5)
    assert store.committed == 1
    assert len(read_rows(tmp_path)) == 2


async def test_a_failed_write_is_raised_by_every_later_flush(tmp_path: Path) -> None:
    """A commit that fails (a full disk) is raised by settle and by the next flush, and no
    later commit is attempted: the run stops with what was committed before it."""
    store = GatedStore(tmp_path, fail=True)
    store.gates[0].set()
    sink = ParquetSink(store, run_id="r", flush_rows=2)
    fill(sink, make_ids(2, seed=64))
    await sink.make_room()  # returns: the failure is not the producer's to raise
    with pytest.raises(OutputError, match="no space left"):
        await asyncio.wait_for(sink.settle(), 5)
    fill(sink, make_ids(2, seed=65))
    with pytest.raises(OutputError, match="no space left"):
        await sink.flush()
    with pytest.raises(OutputError, match="no space left"):
        await sink.make_room()
    assert store.started == 1


async def test_a_failed_write_wakes_the_periodic_committer_which_raises_it(
    tmp_path: Path,
) -> None:
    """commit_periodically raises a handed-over write's failure at once, not a flush
    interval later: the run stops as soon as rows can no longer be kept."""
    store = GatedStore(tmp_path, fail=True)
    sink = ParquetSink(store, run_id="r", flush_rows=2)
    fill(sink, make_ids(2, seed=66))
    await sink.make_room()
    committer = asyncio.create_task(sink.commit_periodically(60.0))
    await asyncio.sleep(0.05)
    assert not committer.done()  # asleep: nothing is full, the next tick is a minute away
    store.gates[0].set()
    with pytest.raises(OutputError):
        await asyncio.wait_for(committer, 5)


def test_the_next_row_group_is_made_while_the_last_is_encoded() -> None:
    """_ahead makes table k+1 in its helper thread while the caller still holds table k;
    order and content are kept, and the last table is followed by nothing."""
    made: list[int] = []

    def tables() -> Iterator[pa.Table]:
        for i in range(3):
            made.append(i)
            yield pa.table({"x": [i]})

    ahead = _ahead(tables())
    first = next(ahead)
    deadline = time.monotonic() + 5
    while len(made) < 2:  # nobody asked for table 1 yet
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert made == [0, 1]
    rest = list(ahead)
    assert [t["x"][0].as_py() for t in (first, *rest)] == [0, 1, 2]
    assert made == [0, 1, 2]


def test_a_failure_making_a_row_group_reaches_the_writer() -> None:
    """An error raised while converting rows (in the helper thread) is raised to the
    caller at the table it would have been, so the commit fails rather than loses rows."""

    def tables() -> Iterator[pa.Table]:
        yield pa.table({"x": [0]})
        raise pa.ArrowInvalid("bad row")

    ahead = _ahead(tables())
    next(ahead)
    with pytest.raises(pa.ArrowInvalid, match="bad row"):
        next(ahead)


def test_a_run_whose_commit_fails_raises_it_and_a_rerun_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit failing mid-run (a full disk) ends the run with OutputError (exit 4),
    leaving only whole files; the rerun harvests the rest, every id exactly once."""
    ids = make_ids(400, seed=67)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    commit = LocalStore.commit
    calls = {"data": 0}

    def failing(self: LocalStore, rel: str, table: Tables) -> int:
        if "-000000." not in rel:  # the empty file a fresh DIR starts with is kept
            calls["data"] += 1
            if calls["data"] == 3:
                raise OutputError(f"cannot write {rel}: no space left on device")
        return commit(self, rel, table)

    with ThreadedSimulator(profile="instant", seed=9) as sim:
        settings = fast_settings(path, out, sim.base_url, flush_rows=50, concurrency=8)
        monkeypatch.setattr(LocalStore, "commit", failing)
        with pytest.raises(OutputError, match="no space left"):
            asyncio.run(harvest(settings))
        assert calls["data"] == 3  # no commit after the failed one
        first = read_rows(out).column("id").to_pylist()
        assert 0 < len(first) < len(ids)
        assert not list(out.rglob(".*.tmp"))
        monkeypatch.setattr(LocalStore, "commit", commit)
        result = asyncio.run(harvest(settings))
    assert result.exit_code == 0
    stored = read_rows(out).column("id").to_pylist()
    assert sorted(stored) == sorted(ids)
    assert result.summary["already_done"] == len(first)
