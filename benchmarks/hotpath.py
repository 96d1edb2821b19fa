"""Per-call costs of the harvester's own hot-path pieces, and of the resume feed path.

Part 1 times, in one process, what every request or row costs in harvester code (not in
aiohttp): building the URL, parsing and validating the 200 body, pacing, the latency
histogram, buffering the row in the sink, turning buffered rows into an Arrow table (done in
a thread, but holding the GIL) and encoding it, and reading ids from a CSV.

Part 2 replays what ``Scheduler._feed`` does with the id sets on a resume: ``--feed-ids``
done ids (the done set built the way ``load_done`` builds it) read back as input after 1000
new ones, in batches of 4096, counting admitted / already done / duplicates. It compares the
code as it is (done ids marked in the ``DoneSet``, only the others entering the seen set) with
the way it was before (every id into the seen set, then a membership test in the done set).

    python -m benchmarks.hotpath --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from yarl import URL

from harvester.client import parse_ok
from harvester.dataset import partition_key
from harvester.ids import IdReader
from harvester.idset import DoneSet, IdSet, Keys
from harvester.metrics import LatencyHistogram, Timeline
from harvester.model import Kind
from harvester.pacer import Pacer
from harvester.settings import RunSettings
from harvester.sink import ParquetSink, _Bodies, _Columns
from harvester.storage import PARQUET_OPTIONS
from harvester.throttle import Answer

from ._common import ids_file, median, save
from .fastserver import BODY

BATCH = 4096  # what IdReader yields


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean microseconds per call of ``fn``."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return round(statistics.median(samples), 3)


def pacer_us(calls: int, repeats: int) -> float:
    async def go() -> float:
        pacer = Pacer(1_000_000)  # far above what is reached: the cost of an open gate
        started = time.perf_counter()
        for _ in range(calls):
            probe = await pacer.acquire()
            pacer.record(Answer.ACCEPTED, probe=probe)
        return (time.perf_counter() - started) / calls * 1e6

    import uvloop

    return round(statistics.median(uvloop.run(go()) for _ in range(repeats)), 3)


def sink_costs(rows: int, repeats: int) -> dict[str, float]:
    """Per row, as a run stores a Completion (from the body's bytes, ``sink._Bodies``) and
    as a caller with only the validated dict does (``sink._Columns``): ``ParquetSink.add``,
    building the table, and the zstd Parquet encoding, at the run's default thresholds."""
    _, doc = parse_ok("application/json", BODY)
    assert doc is not None
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(rows)]
    defaults = RunSettings(ids_path=Path("x"), out_dir=Path("y"), token="t")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in (("bytes", BODY), ("strings", None)):
            add, table, encode = [], [], []
            for _ in range(repeats):
                sink = ParquetSink(
                    Path(tmp),
                    run_id="bench",
                    flush_rows=defaults.flush_rows,
                    flush_bytes=defaults.flush_bytes,
                )
                add_s = table_s = encode_s = 0.0
                for cid in ids:
                    started = time.perf_counter()
                    sink.add(cid, Kind.COMPLETED, doc, 1, body)
                    add_s += time.perf_counter() - started
                    if sink.full():  # what flush() hands to the writer thread
                        buffers: list[_Columns | _Bodies] = [
                            *sink._parts.values(),
                            *sink._bodies.values(),
                        ]
                        sink._parts, sink._bodies = {}, {}
                        sink._rows = sink._bytes = 0
                        for rows_of_part in buffers:
                            started = time.perf_counter()
                            arrow = rows_of_part.table()
                            table_s += time.perf_counter() - started
                            started = time.perf_counter()
                            pq.write_table(arrow, BytesIO(), **PARQUET_OPTIONS)
                            encode_s += time.perf_counter() - started
                add.append(add_s / rows * 1e6)
                table.append(table_s / rows * 1e6)
                encode.append(encode_s / rows * 1e6)
            gil = "no GIL" if body else "GIL held"
            out[f"sink_add_us_per_row ({name})"] = round(statistics.median(add), 3)
            out[f"table_us_per_row ({name}; {gil}, writer thread)"] = round(
                statistics.median(table), 3
            )
            out[f"parquet_encode_us_per_row ({name}; writer thread)"] = round(
                statistics.median(encode), 3
            )
    return out


def reader_us_per_id(repeats: int) -> float:
    path = ids_file(100_000)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = sum(len(batch.ids) for batch in IdReader(path).open())
        samples.append((time.perf_counter() - started) / count * 1e6)
    return round(statistics.median(samples), 3)


def micro(repeats: int) -> dict[str, float]:
    prefix = "http://127.0.0.1:8081/ai/completions?id="
    cid = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
    hist = LatencyHistogram()
    timeline = Timeline()
    fresh = iter([f"00000000-0000-4000-8000-{i:012d}" for i in range(100_000 * repeats)])
    costs = {
        "url_us (URL(prefix + id, encoded=True), a new id each call)": per_call_us(
            lambda: URL(prefix + next(fresh), encoded=True), 100_000, repeats
        ),
        "url_us (the same id each call: yarl's cache hit)": per_call_us(
            lambda: URL(prefix + cid, encoded=True), 100_000, repeats
        ),
        "parse_ok_us (orjson + validate_completion)": per_call_us(
            lambda: parse_ok("application/json", BODY), 100_000, repeats
        ),
        "partition_key_us (per row, cached)": per_call_us(
            lambda: partition_key("chatgpt"), 100_000, repeats
        ),
        "latency_record_us": per_call_us(lambda: hist.record(0.004), 100_000, repeats),
        "timeline_record_us": per_call_us(
            lambda: timeline.record(time.monotonic(), 1000.0, Answer.ACCEPTED), 100_000, repeats
        ),
        "pacer_acquire_us (rate 1e6, never waits)": pacer_us(100_000, repeats),
        "id_reader_us_per_id (CSV + classify, reader thread)": reader_us_per_id(repeats),
    }
    costs.update(sink_costs(100_000, repeats))
    return costs


def random_keys(rng: np.random.Generator, n: int) -> Keys:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    keys: Keys = raw.view("S16").reshape(-1)
    return keys


def feed_current(inp: Keys, done: DoneSet) -> tuple[tuple[int, int, int], int]:
    """The id-set work of ``Scheduler._feed`` as the code does it now; returns the counts
    and the bytes the seen set and the done set's marks hold at the end."""
    seen = IdSet()
    admitted = already = duplicates = 0
    for i in range(0, len(inp), BATCH):
        keys = inp[i : i + BATCH]
        is_done, first = done.mark_met(keys)
        others = (~is_done).nonzero()[0]
        fresh = int(seen.add_new(keys[others]).sum())
        admitted += fresh
        already += int(first.sum())
        duplicates += len(keys) - fresh - int(first.sum())
    return (admitted, already, duplicates), seen.nbytes + len(done)


def feed_before(inp: Keys, done: IdSet) -> tuple[tuple[int, int, int], int]:
    """The same work as the code did it before DoneSet: every id into the seen set."""
    seen = IdSet()
    admitted = already = duplicates = 0
    for i in range(0, len(inp), BATCH):
        keys = inp[i : i + BATCH]
        new = seen.add_new(keys)
        old = done.contains(keys) & new
        admitted += int((new & ~old).sum())
        already += int(old.sum())
        duplicates += len(new) - int(new.sum())
    return (admitted, already, duplicates), seen.nbytes


def feed(count: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    done_keys = random_keys(rng, count)
    inp = np.concatenate((random_keys(rng, 1000), done_keys))
    before_set = IdSet.from_array(done_keys.copy())
    current, proto = [], []
    build_s = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        done = DoneSet.from_array(done_keys.copy())  # as load_done builds it; marks are fresh
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        a, current_bytes = feed_current(inp, done)
        current.append(time.perf_counter() - started)
        started = time.perf_counter()
        b, proto_bytes = feed_before(inp, before_set)
        proto.append(time.perf_counter() - started)
        assert a == b == (1000, count, 0), (a, b)
    return {
        "done_ids": count,
        "done_build_s": round(build_s, 2),
        "median_current_s": median(current),
        "median_before_s": median(proto),
        "current_us_per_id": round(statistics.median(current) / len(inp) * 1e6, 3),
        "before_us_per_id": round(statistics.median(proto) / len(inp) * 1e6, 3),
        "current_seen_set_and_marks_mb": round(current_bytes / 2**20, 1),
        "before_seen_set_mb": round(proto_bytes / 2**20, 1),
        "current_s": [round(x, 2) for x in current],
        "before_s": [round(x, 2) for x in proto],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feed-ids", type=int, default=10_000_000)
    args = parser.parse_args()
    costs = micro(args.repeats)
    for name, value in costs.items():
        print(f"{name}: {value}")
    fed = feed(args.feed_ids, args.repeats)
    print(
        f"resume feed of {fed['done_ids']} done ids (+1000 new): current "
        f"{fed['median_current_s']} s ({fed['current_us_per_id']} us/id, on the event loop), "
        f"before DoneSet {fed['median_before_s']} s ({fed['before_us_per_id']} us/id); "
        f"seen set {fed['current_seen_set_and_marks_mb']} MiB (with the marks) vs "
        f"{fed['before_seen_set_mb']} MiB; runs {fed['current_s']} vs {fed['before_s']}"
    )
    path = save("hotpath", {"repeats": args.repeats, "micro": costs, "resume_feed": fed})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
