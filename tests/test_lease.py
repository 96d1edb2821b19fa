"""RunLease and clean_stale_temporaries: who may write a shard, and whose temporaries are stale."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.errors import ExitCode, UsageError
from harvester.lease import RunLease, clean_stale_temporaries
from harvester.report import new_run_id
from harvester.runner import harvest
from harvester.shard import Shard

from .conftest import TOKEN, fast_settings, make_ids, write_csv

# Takes a lease, says so, and holds it until its stdin closes (or it is killed).
HOLDER = """
import sys
import warnings
from pathlib import Path
from harvester.lease import RunLease
from harvester.shard import Shard
lease = RunLease(Path(sys.argv[1]), sys.argv[2], Shard.parse(sys.argv[3]))
lease.acquire()
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


@contextlib.contextmanager
def lease_in_child(root: Path, run_id: str, shard: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the lease of ``run_id`` on ``shard`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), run_id, shard],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the lease holder did not start within 30 s"
        assert proc.stdout.readline() == b"held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def release_child(proc: subprocess.Popen[bytes]) -> None:
    """Let the holder release its lease and exit normally."""
    proc.communicate(input=b"", timeout=10)
    assert proc.returncode == 0


def tmp_name(run_id: str, seq: int = 0) -> str:
    """The temporary name the sink gives a file being written."""
    return f".part-{run_id}-{seq:06d}.parquet.tmp"


def test_same_shard_in_another_process_is_refused_until_released(tmp_path: Path) -> None:
    """While another process holds shard 1/4, taking it fails with a UsageError naming the
    shard and DIR; another shard is free meanwhile; once released, it can be taken."""
    with lease_in_child(tmp_path, new_run_id(), "1/4") as holder:
        lease = RunLease(tmp_path, new_run_id(), Shard(1, 4))
        with pytest.raises(UsageError, match="1/4") as info:
            lease.acquire()
        assert str(tmp_path) in str(info.value)
        other = RunLease(tmp_path, new_run_id(), Shard(2, 4))
        other.acquire()
        other.release()
        release_child(holder)
        lease.acquire()
        lease.release()


def test_a_lease_dies_with_its_process(tmp_path: Path) -> None:
    """kill -9 of the holder frees the shard at once: the kernel drops the flock."""
    with lease_in_child(tmp_path, new_run_id(), "0/1") as holder:
        holder.kill()
        holder.wait(10)
        lease = RunLease(tmp_path, new_run_id(), Shard(0, 1))
        lease.acquire()
        lease.release()


def test_same_shard_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    """Two leases of one shard in one process conflict too (flock is per open file), and a
    released lease can be taken again; its run marker is removed on release."""
    first = RunLease(tmp_path, "20260101T000000Z-00000001", Shard(0, 2))
    first.acquire()
    marker = tmp_path / "_harvester" / "locks" / "run-20260101T000000Z-00000001.lock"
    assert marker.exists()
    with pytest.raises(UsageError, match="0/2"):
        RunLease(tmp_path, new_run_id(), Shard(0, 2)).acquire()
    first.release()
    assert not marker.exists()
    again = RunLease(tmp_path, new_run_id(), Shard(0, 2))
    again.acquire()
    again.release()


def test_clean_removes_dead_runs_temporaries_but_not_a_live_runs(tmp_path: Path) -> None:
    """Temporaries of a run with no marker, or with a marker nobody locks, are removed (and
    the stale marker with them); a live run's temporary and every other file are kept."""
    partition = tmp_path / "harvest_date=2026-01-01" / "model=chatgpt"
    partition.mkdir(parents=True)
    locks = tmp_path / "_harvester" / "locks"
    locks.mkdir(parents=True)
    live, dead, gone = new_run_id(), new_run_id(), new_run_id()
    (locks / f"run-{dead}.lock").touch()  # left by a killed run: nobody holds it
    kept = [
        partition / f"part-{dead}-000000.parquet",  # committed data is never touched
        partition / "notes.txt",
        tmp_path / tmp_name(dead),  # not in a partition: not harvester's temporary
    ]
    for path in kept:
        path.write_bytes(b"x")
    stale = [partition / tmp_name(dead, 1), partition / tmp_name(gone, 7)]
    for path in stale:
        path.write_bytes(b"PAR1 truncated")
    live_tmp = partition / tmp_name(live, 3)
    with lease_in_child(tmp_path, live, "0/1") as holder:
        live_tmp.write_bytes(b"PAR1 being written")
        assert clean_stale_temporaries(tmp_path) == 2
        assert live_tmp.exists()
        assert (locks / f"run-{live}.lock").exists()
        holder.kill()  # the live run dies too: its temporary is now stale
        holder.wait(10)
        assert clean_stale_temporaries(tmp_path) == 1
    assert not any(path.exists() for path in [*stale, live_tmp])
    assert not (locks / f"run-{dead}.lock").exists()
    assert all(path.exists() for path in kept)
    assert clean_stale_temporaries(tmp_path) == 0


def test_clean_on_a_missing_directory_removes_nothing(tmp_path: Path) -> None:
    """A first run into a DIR that does not exist yet has nothing to clean."""
    assert clean_stale_temporaries(tmp_path / "absent") == 0


def test_out_that_is_a_regular_file_fails_with_one_line(tmp_path: Path) -> None:
    """--out naming an existing regular file is refused with exit 2 or 4 and one line on
    stderr naming it, not a traceback from creating the lease directory inside it."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    out = tmp_path / "out"
    out.write_text("not a directory\n")
    done = subprocess.run(
        [
            sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(out),
            "--base-url", "http://127.0.0.1:9", "--no-progress",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MASSIVE_API_TOKEN": TOKEN},
        timeout=60,
        check=False,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode in (ExitCode.USAGE, ExitCode.OUTPUT), done.stderr[-2000:]
    assert len(err) == 1, err
    assert err[0].startswith("harvester:")
    assert str(out) in err[0]


async def test_a_refused_lease_leaves_no_file_open(tmp_path: Path) -> None:
    """A run refused because its shard is leased (exit 2) closes the ids file it had opened:
    no ResourceWarning when the failed run is collected."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    out = tmp_path / "out"
    holder = RunLease(out, new_run_id(), Shard(0, 1))
    holder.acquire()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(UsageError, match="0/1"):
                await harvest(fast_settings(ids, out, "http://127.0.0.1:9"))
            gc.collect()
    finally:
        holder.release()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked
