"""Crash safety at the process level: kill -9, SIGTERM, double SIGINT, stray files, leases.

The promise under test: kill -9 at any instant, then a rerun of the same command, yields exactly
one row per unique id with intact content, and DIR never holds a file a reader would choke on.
Every child process is started by the test, bounded by a timeout, and killed at teardown.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvester.errors import ExitCode
from harvester.runner import harvest
from harvester.sim import PROFILES, Simulator, expected_completion

from .conftest import (
    TOKEN,
    ThreadedSimulator,
    fast_settings,
    launch_simulator,
    make_ids,
    read_hive,
    read_rows,
    wait_until,
    write_csv,
)

CONTENT = (
    "model", "query", "html", "prompt", "completion", "sources", "ads", "fanouts",
    "device", "country", "subdivision", "city",
)  # fmt: skip
COMMITTED = re.compile(r"part-\d{8}T\d{6}Z-[0-9a-f]{8}-\d{6}\.parquet")
CALM = PROFILES["realistic"].without_faults()  # same content and fates as "realistic"


def committed_since(out: Path, before: int, proc: subprocess.Popen[bytes]) -> bool:
    """True once ``out`` holds more data files than ``before`` (or the run has ended)."""
    return len(data_files(out)) > before or proc.poll() is not None


def run_argv(ids: Path, out: Path, url: str, *extra: str) -> list[str]:
    """The ``harvester run`` command line of these tests (fast polls, frequent commits)."""
    return [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(out),
        "--base-url", url, "--rate", "3000", "--concurrency", "64", "--flush-interval", "0.2",
        "--poll-interval", "0.05", "--max-poll-interval", "0.2", "--max-wait", "30",
        "--no-progress", "--json", *extra,
    ]  # fmt: skip


class Children:
    """Child processes of one test: stderr to a log file, killed at teardown if still alive."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
        with self.log.open("ab") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    """Starts harvester processes with the token set; none survives the test."""
    kids = Children(tmp_path / "children.log")
    try:
        yield kids
    finally:
        kids.kill_all()


def finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, dict[str, Any] | None]:
    """Wait for ``proc``; return its exit code and the JSON summary it printed, if any."""
    out, _ = proc.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    return proc.returncode, (orjson.loads(lines[-1]) if lines else None)


# A simulator whose requests hang 20-30 s three times in ten (the rest answer at once), in its
# own process so that the handlers still hanging when it stops are not this process's business.
HANGING_SIMULATOR = """
import asyncio, sys
from dataclasses import replace
from harvester.sim import PROFILES, Simulator
async def main() -> None:
    profile = replace(PROFILES["instant"], name="hanging", slow_share=0.3, slow_s=(20.0, 30.0))
    async with Simulator(token=sys.argv[1], profile=profile, seed=int(sys.argv[2])) as sim:
        print(f"simulator listening on {sim.base_url}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def simulator_process(
    tmp: Path, *, profile: str, seed: int, time_scale: float = 1.0
) -> contextlib.AbstractContextManager[str]:
    """The shared launcher, or for profile "hanging" HANGING_SIMULATOR in its place."""
    if profile == "hanging":
        argv = [sys.executable, "-c", HANGING_SIMULATOR, TOKEN, str(seed)]
        return launch_simulator(tmp, argv=argv)
    return launch_simulator(tmp, "--profile", profile, "--time-scale", str(time_scale),
                            "--seed", str(seed))  # fmt: skip


def data_files(out: Path) -> list[Path]:
    """Every file holding rows that a ``**/*.parquet`` glob finds under ``out`` (not the
    empty file a run commits first, so that any DIR opens in every reader)."""
    files = sorted(out.rglob("*.parquet")) if out.exists() else []
    return [f for f in files if pq.ParquetFile(f).metadata.num_rows]


def assert_readable(out: Path, *, plain_hive: bool = True) -> int:
    """Every ``*.parquet`` under DIR reads fully, and DuckDB and pyarrow agree on the count.

    ``plain_hive`` also reads DIR as a bare pyarrow hive dataset, which (unlike DuckDB's
    glob) takes every non-hidden file, so it is off where the test left stray files.
    """
    files = data_files(out)
    total = 0
    for path in files:
        assert COMMITTED.fullmatch(path.name), f"unexpected file {path}"
        total += pq.read_table(path).num_rows  # decodes every page: a torn file raises
    if files:
        relation = duckdb.sql(
            f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
        )
        assert relation is not None
        assert relation.fetchall() == [(total,)]
        assert read_rows(out).num_rows == total
        if plain_hive:
            assert read_hive(out).num_rows == total
    return total


def assert_rows_correct(
    out: Path, seed: int, profile: str, read: Callable[[Path], pa.Table] = read_hive
) -> Counter[str]:
    """No id has two rows, and every row holds what the simulator serves for its id."""
    rows = read(out).to_pylist()
    counts = Counter(str(row["id"]) for row in rows)
    repeated = [i for i, n in counts.items() if n > 1]
    assert not repeated, f"{len(repeated)} ids have more than one row, e.g. {repeated[:3]}"
    for row in rows:
        expected = expected_completion(row["id"], seed=seed, profile=profile)
        if expected is None:
            assert (row["status"], row["model"]) == ("failed", None), row["id"]
        else:
            assert row["status"] == "completed", row["id"]
            assert {n: row[n] for n in CONTENT} == {n: expected.get(n) for n in CONTENT}
    return counts


def assert_exactly_once(
    out: Path,
    ids: list[str],
    seed: int,
    profile: str,
    read: Callable[[Path], pa.Table] = read_hive,
) -> None:
    """One correct row per unique id: none missing, none twice; failed rows exactly the
    ids the simulator fails."""
    counts = assert_rows_correct(out, seed, profile, read)
    assert set(counts) == set(ids)
    failed = {str(r["id"]) for r in read(out).to_pylist() if r["status"] == "failed"}
    assert failed == {i for i in ids if expected_completion(i, seed=seed, profile=profile) is None}


@pytest.mark.slow
def test_kill_9_at_random_instants_then_rerun_is_exactly_once(
    tmp_path: Path, children: Children
) -> None:
    """SIGKILL at random instants never leaves a file a reader chokes on, never loses a
    committed row, and reruns of the same command end with exactly one correct row per id
    and no temporary left."""
    seed = 11
    ids = make_ids(3000, seed=21)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    rng = random.Random(seed)
    visible: list[int] = []
    with simulator_process(tmp_path, profile="chaos", seed=seed, time_scale=0.01) as url:
        # Few retries keep each run short: an unlucky id is left for the next run.
        argv = run_argv(path, out, url, "--max-retries", "3")
        started = time.monotonic()
        for n in range(8):
            if time.monotonic() - started > 20:
                break
            before = len(data_files(out))
            proc = children.start(argv)
            if n % 2:
                # Every other kill lands after this run has committed a file, however slow
                # the machine is to start Python; the others at any instant.
                committed = functools.partial(committed_since, out, before, proc)
                wait_until(committed, 30, "a commit")
            time.sleep(rng.uniform(0.0, 0.3) if n % 2 else rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
            visible.append(assert_readable(out))
        codes: list[int] = []
        for _ in range(5):
            code, _summary = finish(children.start(argv), timeout=90)
            codes.append(code)
            if code == ExitCode.OK:
                break
    assert len(visible) >= 3
    assert visible == sorted(visible), "a committed row disappeared after a kill"
    assert max(visible) > 0, "some kills should land after rows were committed"
    assert visible[0] < len(ids), "the first kill should land mid-run"
    assert codes[-1] == ExitCode.OK, codes
    assert assert_readable(out) == len(ids)
    assert_exactly_once(out, ids, seed, "chaos")
    assert not list(out.rglob(".part-*.tmp"))


def test_sigterm_commits_exits_130_and_a_rerun_finishes(tmp_path: Path, children: Children) -> None:
    """SIGTERM mid-run: exit 130 within 12 s with intact rows and a JSON summary that says so;
    a rerun then finishes with exactly one row per id."""
    seed = 5
    ids = make_ids(3000, seed=22)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with simulator_process(tmp_path, profile="realistic", seed=seed, time_scale=0.05) as url:
        # A few hundred ids in play at once, so that some finish early and are committed.
        proc = children.start(run_argv(path, out, url, "--max-in-play", "300"))
        wait_until(lambda: bool(data_files(out)), 30, "the first committed file")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code, summary = finish(proc, timeout=20)
        took = time.monotonic() - stopped
    assert code == ExitCode.INTERRUPTED
    assert took < 12
    assert summary is not None
    assert summary["exit_code"] == ExitCode.INTERRUPTED
    assert summary["unresolved"] > 0
    assert assert_readable(out) == summary["rows_written"] > 0
    assert_rows_correct(out, seed, "realistic")
    # The rerun meets the same content without the faults, scaled down so it ends quickly.
    with ThreadedSimulator(profile=CALM, seed=seed, time_scale=0.002) as sim:
        code, summary = finish(children.start(run_argv(path, out, sim.base_url)), timeout=60)
    assert code == ExitCode.OK
    assert summary is not None
    assert summary["already_done"] > 0
    assert_exactly_once(out, ids, seed, "realistic")


def test_sigterm_to_a_workers_parent_stops_every_worker_with_130(
    tmp_path: Path, children: Children
) -> None:
    """SIGTERM to a ``--workers 2`` parent (PID 1 in a pod) reaches both workers: exit 130
    within 12 s with one merged summary, intact rows, and an exactly-once rerun."""
    seed = 7
    ids = make_ids(2000, seed=30)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    argv = ["--workers", "2", "--max-in-play", "300"]
    with simulator_process(tmp_path, profile="realistic", seed=seed, time_scale=0.05) as url:
        proc = children.start(run_argv(path, out, url, *argv))
        wait_until(lambda: len(data_files(out)) >= 2, 30, "committed files")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code, summary = finish(proc, timeout=20)
        took = time.monotonic() - stopped
    assert code == ExitCode.INTERRUPTED
    assert took < 12
    assert summary is not None
    assert (summary["exit_code"], summary["workers"]) == (ExitCode.INTERRUPTED, 2)
    assert summary["unresolved"] > 0
    assert assert_readable(out) == summary["rows_written"] > 0
    assert_rows_correct(out, seed, "realistic")
    with ThreadedSimulator(profile=CALM, seed=seed, time_scale=0.002) as sim:
        code, _ = finish(children.start(run_argv(path, out, sim.base_url, *argv)), timeout=60)
    assert code == ExitCode.OK
    assert_exactly_once(out, ids, seed, "realistic")


def test_interrupted_summary_still_accounts_for_every_unique_id(
    tmp_path: Path, children: Children
) -> None:
    """After SIGTERM, unique_ids = already_done + completed + failed + invalid + unresolved
    (the README's identity) even when ids were read but not yet admitted."""
    ids = make_ids(1500, seed=23)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with simulator_process(tmp_path, profile="realistic", seed=6, time_scale=0.05) as url:
        proc = children.start(run_argv(path, out, url, "--max-in-play", "50"))
        wait_until(lambda: bool(data_files(out)), 30, "the first committed file")
        proc.send_signal(signal.SIGTERM)
        code, s = finish(proc, timeout=20)
    assert code == ExitCode.INTERRUPTED
    assert s is not None
    parts = ("already_done", "completed", "failed", "invalid", "unresolved")
    assert s["unique_ids"] == sum(s[name] for name in parts), {k: s[k] for k in parts}


def test_second_sigint_stops_at_once_and_keeps_committed_rows(
    tmp_path: Path, children: Children
) -> None:
    """With requests hanging for 20 s, a first SIGINT waits (grace) and a second one stops
    the run at once with 130; committed rows are kept and a rerun is exactly-once."""
    seed = 9
    ids = make_ids(600, seed=24)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with simulator_process(tmp_path, profile="hanging", seed=seed) as url:
        proc = children.start(run_argv(path, out, url, "--concurrency", "16"))
        wait_until(lambda: bool(data_files(out)), 30, "the first committed file")
        time.sleep(0.5)  # every worker is now stuck on a hanging request
        before = {p.name for p in data_files(out)}
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the first SIGINT should wait for in-flight requests"
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        code, summary = finish(proc, timeout=20)
        took = time.monotonic() - stopped
    assert code == ExitCode.INTERRUPTED
    assert took < 3, f"the second SIGINT took {took:.1f} s"
    assert summary is not None
    assert summary["exit_code"] == ExitCode.INTERRUPTED
    assert before <= {p.name for p in data_files(out)}
    assert assert_readable(out) == summary["rows_written"] > 0
    assert_rows_correct(out, seed, "instant")
    with ThreadedSimulator(profile="instant", seed=seed) as sim:
        code, _summary = finish(children.start(run_argv(path, out, sim.base_url)), timeout=60)
    assert code == ExitCode.OK
    assert_exactly_once(out, ids, seed, "instant")


async def test_stray_files_and_empty_directories_are_harmless(tmp_path: Path) -> None:
    """A hidden temporary left by a dead run is removed at start; stray non-parquet files and
    empty directories are ignored; the result is exactly-once and readable."""
    out = tmp_path / "out"
    partition = out / "harvest_date=2020-01-01" / "model_key=chatgpt"
    partition.mkdir(parents=True)
    stray_tmp = partition / ".part-deadbeef-000000.parquet.tmp"
    stray_tmp.write_bytes(b"PAR1\x15\x00\x15truncated")
    (out / "notes.txt").write_text("garbage \x00 not parquet\n")
    (partition / "notes.txt").write_text("more garbage\n")
    (out / "harvest_date=2020-01-02" / "model_key=gemini").mkdir(parents=True)
    (out / "empty").mkdir()
    ids = make_ids(300, seed=25)
    path = write_csv(tmp_path / "ids.csv", ids)
    async with Simulator(token=TOKEN, profile="instant", seed=3) as sim:
        first = await harvest(fast_settings(path, out, sim.base_url))
        second = await harvest(fast_settings(path, out, sim.base_url))
    assert first.exit_code == second.exit_code == ExitCode.OK
    assert second.summary["already_done"] == len(ids)
    assert not stray_tmp.exists()
    assert (out / "notes.txt").exists()
    assert (partition / "notes.txt").exists()
    assert assert_readable(out, plain_hive=False) == len(ids)
    assert_exactly_once(out, ids, 3, "instant", read=read_rows)


def test_an_empty_out_directory_is_fine(tmp_path: Path, children: Children) -> None:
    """An existing, empty DIR is a normal first run."""
    out = tmp_path / "out"
    out.mkdir()
    ids = make_ids(50, seed=26)
    path = write_csv(tmp_path / "ids.csv", ids)
    with ThreadedSimulator(profile="instant", seed=4) as sim:
        code, _ = finish(children.start(run_argv(path, out, sim.base_url)), timeout=60)
    assert code == ExitCode.OK
    assert_exactly_once(out, ids, 4, "instant")


def _held_lease(out: Path) -> bool:
    return any((out / "_harvester" / "locks").glob("run-*.lock"))


def test_same_shard_twice_at_once_is_refused(tmp_path: Path, children: Children) -> None:
    """While one run writes shard 2/3 into DIR, a second run of that shard exits 2 with one
    line naming the shard; the first run is unaffected."""
    ids = make_ids(300, seed=27)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with ThreadedSimulator(profile=CALM, seed=1, time_scale=0.5) as sim:
        argv = run_argv(path, out, sim.base_url, "--shard", "2/3")
        first = children.start(argv)
        wait_until(lambda: _held_lease(out), 30, "the first run's lease")
        second = subprocess.run(
            argv,
            capture_output=True,
            env={**os.environ, "MASSIVE_API_TOKEN": TOKEN},
            timeout=60,
            check=False,
        )
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        code, _ = finish(first, timeout=20)
    assert second.returncode == ExitCode.USAGE
    err = second.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("harvester: error:")
    assert "shard 2/3" in err[0]
    assert second.stdout == b""
    assert code == ExitCode.INTERRUPTED


def test_different_shards_at_once_both_succeed(tmp_path: Path, children: Children) -> None:
    """Shards 0/2 and 1/2 running at the same time into one DIR both exit 0, and together
    they write exactly one row per id."""
    seed = 2
    ids = make_ids(800, seed=28)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with ThreadedSimulator(profile=CALM, seed=seed, time_scale=0.02) as sim:
        first = children.start(run_argv(path, out, sim.base_url, "--shard", "0/2"))
        second = children.start(run_argv(path, out, sim.base_url, "--shard", "1/2"))
        wait_until(lambda: _held_lease(out), 30, "a lease")
        assert first.poll() is None
        assert second.poll() is None
        (code0, s0), (code1, s1) = finish(first, timeout=60), finish(second, timeout=60)
    assert (code0, code1) == (ExitCode.OK, ExitCode.OK)
    assert s0 is not None
    assert s1 is not None
    assert s0["unique_ids"] + s1["unique_ids"] == len(ids)
    assert min(s0["unique_ids"], s1["unique_ids"]) > 0.4 * len(ids)
    assert_exactly_once(out, ids, seed, "realistic")


def test_overlapping_shards_at_once_do_not_write_an_id_twice(
    tmp_path: Path, children: Children
) -> None:
    """A whole-input run (0/1) and a --shard 0/2 run at the same time into one DIR overlap
    on half the ids: the lease must refuse one, or the ids must still get one row each."""
    seed = 3
    ids = make_ids(400, seed=29)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    with ThreadedSimulator(profile=CALM, seed=seed, time_scale=0.02) as sim:
        whole = children.start(run_argv(path, out, sim.base_url))
        half = children.start(run_argv(path, out, sim.base_url, "--shard", "0/2"))
        codes = [finish(whole, timeout=60)[0], finish(half, timeout=60)[0]]
    assert ExitCode.OK in codes
    assert set(codes) <= {ExitCode.OK, ExitCode.USAGE}
    counts = Counter(str(i) for i in read_hive(out).column("id").to_pylist())
    repeated = sum(1 for n in counts.values() if n > 1)
    assert repeated == 0, f"{repeated} ids written twice by overlapping shards (codes {codes})"
