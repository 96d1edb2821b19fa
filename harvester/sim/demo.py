"""``harvester demo``: a whole harvest against the bundled simulator, no network, no token."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import UsageError
from ..report import format_summary
from ..runner import harvest
from ..settings import RunSettings

DEMO_TOKEN = "demo-token"
DEMO_TIME_SCALE = 0.01  # 100x faster than real: copilot's 152 s becomes 1.5 s
DEMO_SEED = 2026


def write_demo_ids(path: Path, count: int, *, seed: int = DEMO_SEED) -> None:
    """A CSV of ``count`` reproducible uuids, as a user's queued conversations would be."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id\n")
        for _ in range(count):
            handle.write(f"{uuid.UUID(int=rng.getrandbits(128), version=4)}\n")


DEMO_MARK = "_harvester/demo"  # marks a directory the demo made, so it may replace it
DEMO_IDS = "_harvester/demo-ids.csv"  # inside DIR, where readers never look


def _fresh_start(out: Path, ids_path: Path, count: int) -> None:
    """The demo starts from scratch, but never deletes a directory it did not make."""
    if out.exists():
        if any(out.iterdir()) and not (out / DEMO_MARK).exists():
            raise UsageError(
                f"--out {out} exists and was not made by the demo; give another --out "
                "(the demo replaces its own output each time)"
            )
        shutil.rmtree(out)
    (out / DEMO_MARK).parent.mkdir(parents=True)
    (out / DEMO_MARK).touch()
    write_demo_ids(ids_path, count)


def look_at(out: Path) -> str:
    """One-liners to look at the data, with what ``pip install .`` installed (pyarrow), and
    with DuckDB for those who have it."""
    python = sys.executable
    pyarrow_line = (
        f'{python} -c "import pyarrow.dataset as ds; '
        f"t = ds.dataset('{out}', partitioning='hive').to_table(); "
        "print(t.group_by(['model', 'status']).aggregate([('id', 'count')]).to_pylist())\""
    )
    duckdb_line = (
        f'duckdb -c "SELECT model, status, count(*) FROM '
        f"read_parquet('{out}/**/*.parquet', hive_partitioning=true) GROUP BY ALL ORDER BY ALL\""
    )
    return f"\nLook at the data:\n  {pyarrow_line}\n  {duckdb_line}   # with the DuckDB CLI"


@contextlib.asynccontextmanager
async def simulator_process() -> AsyncIterator[str]:
    """``harvester serve`` of the demo's profile in a child process, on the other core: on
    this process's loop the simulator would halve what the harvester can do. Yields its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "harvester", "serve", "--host", "127.0.0.1", "--port", "0",
        "--token", DEMO_TOKEN, "--profile", "realistic", "--seed", str(DEMO_SEED),
        "--time-scale", str(DEMO_TIME_SCALE),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    said: collections.deque[str] = collections.deque(maxlen=20)
    match = None
    try:
        async with asyncio.timeout(30):
            while match is None:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    break  # the child ended before it listened
                said.append(line)
                match = _LISTENING.search(line)
        if match is None:
            raise UsageError(f"the demo's simulator did not start: {''.join(said).strip()}")
        drain = asyncio.create_task(_drain(proc.stderr, said))
        try:
            yield match[0]
        finally:
            drain.cancel()
    except TimeoutError as exc:
        raise UsageError("the demo's simulator did not start within 30 s") from exc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


_LISTENING = re.compile(r"http://127\.0\.0\.1:\d+")


async def _drain(stream: asyncio.StreamReader, said: collections.deque[str]) -> None:
    """Keep reading the simulator's stderr, so that it never blocks on a full pipe."""
    while line := await stream.readline():
        said.append(line.decode())


async def run_demo(*, count: int, out: Path, progress: bool = True) -> int:
    """Serve the realistic profile time-compressed, harvest ``count`` ids into ``out``."""
    ids_path = out / DEMO_IDS
    await asyncio.to_thread(_fresh_start, out, ids_path, count)
    async with simulator_process() as base_url:
        # The run's own defaults on the simulator's compressed clock (a first re-poll at
        # twice that: at 100x, 40 ms is tighter than the simulator's own timer resolution).
        base = RunSettings(ids_path=ids_path, out_dir=out, token=DEMO_TOKEN)
        scale = DEMO_TIME_SCALE
        settings = dataclasses.replace(
            base,
            base_url=base_url,
            rate=5000,
            # The profile's ~60 ms answers: 128 in flight allow ~2000 polls/s, about what one
            # core of harvester does (256 measured no faster, with 25% more memory).
            concurrency=128,
            # Enough to keep the workers busy, few enough that each id in play is polled well
            # inside the compressed 6 s --max-wait even on a loaded machine.
            max_in_play=1000,
            poll_interval=base.poll_interval * scale * 2,
            max_poll_interval=base.max_poll_interval * scale,
            expected_ready=base.expected_ready.scaled(scale),
            max_wait=base.max_wait * scale,
            backoff_base=base.backoff_base * scale,
            backoff_max=base.backoff_max * scale,
            progress=progress,
        )
        result = await harvest(settings)
    print(format_summary(result.summary))
    print(look_at(out))
    if result.message:
        print(f"harvester: {result.message}", file=sys.stderr)
    return result.exit_code
