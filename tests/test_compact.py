"""``harvester compact`` and ``run --compact``: fewer files, the same rows, crash-safe.

Locally and on S3 (moto): the rows before and after are identical; a compaction killed with
-9 before its merged file appears leaves the dataset as it was, and one killed after it
appears leaves duplicates that the next ``compact`` or ``run`` removes (the documented
window); a run resuming over either counts every id once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from harvester.cli import main
from harvester.compact import INTENTS, CompactSettings, compact
from harvester.dataset import committed_files, open_dataset
from harvester.errors import ExitCode, OutputError, UsageError
from harvester.lease import CompactionLease
from harvester.runner import harvest

from .conftest import ThreadedSimulator, fast_settings, make_ids, write_csv
from .moto_s3 import S3, s3, s3_endpoint

__all__ = ["s3", "s3_endpoint"]  # fixtures

# A compaction that kills itself with -9 at one instant of the protocol.
KILLED_COMPACTION = """
import os, signal, sys
from harvester import compact as c
point = sys.argv[2]
write = c._write_merged
def kill_before(store, inputs, output):
    os.kill(os.getpid(), signal.SIGKILL)
def kill_after(store, inputs, output):
    write(store, inputs, output)
    os.kill(os.getpid(), signal.SIGKILL)
c._write_merged = kill_before if point == "before" else kill_after
c.compact(sys.argv[1], c.CompactSettings(lease_ttl=1))
"""


def rows(out: Path | str) -> pa.Table:
    """Every committed row, sorted by id, without the partition columns."""
    table = open_dataset(out).to_table()
    return table.drop_columns(["harvest_date", "model_key"]).sort_by("id")


def id_counts(out: Path | str) -> Counter[str]:
    """How many rows each id has."""
    return Counter(str(v) for v in open_dataset(out).to_table(columns=["id"])["id"].to_pylist())


def many_small_files(out: Path | str, tmp: Path, count: int = 600) -> list[str]:
    """A dataset written in commits of 40 rows (so dozens of files), and its ids."""
    ids = make_ids(count, seed=51)
    path = write_csv(tmp / "ids.csv", ids)
    with ThreadedSimulator(profile="realistic", seed=9, time_scale=0.02) as sim:
        result = asyncio.run(harvest(fast_settings(path, out, sim.base_url, flush_rows=40)))
    assert result.exit_code == ExitCode.OK
    assert len(committed_files(out)) > 15
    return ids


@pytest.fixture(params=["local", "s3"])
def out(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A dataset root on the local disk or in a fresh bucket."""
    if request.param == "local":
        return tmp_path / "out"
    bucket: S3 = request.getfixturevalue("s3")
    return bucket.uri()


def test_compaction_keeps_every_row_in_fewer_files(out: Path | str, tmp_path: Path) -> None:
    """After compact, each partition holds one file and the rows are exactly those before
    (content, types and count), each id once."""
    ids = many_small_files(out, tmp_path)
    before = rows(out)
    result = compact(out)
    after = rows(out)
    assert after.equals(before)
    assert set(id_counts(out).values()) == {1}
    assert len(id_counts(out)) == len(ids)
    partitions = {f.rsplit("/", 2)[-2:][0] for f in committed_files(out)}
    assert result.files_after == len(committed_files(out)) == len(partitions)
    assert result.files_before > result.files_after
    assert compact(out).rows_merged == 0  # nothing left to merge


def test_a_small_target_size_gives_several_files_per_partition(tmp_path: Path) -> None:
    """--target-size bounds the merged files: a partition whose files exceed it twice over
    ends in several files, none past the target by more than one input."""
    out = tmp_path / "out"
    many_small_files(out, tmp_path)
    before = rows(out)
    code = main(["compact", str(out), "--target-size", "60000", "--json"])
    assert code == ExitCode.OK
    assert rows(out).equals(before)
    per_partition = Counter(Path(f).parent.name for f in committed_files(out))
    assert max(per_partition.values()) > 1


@pytest.mark.parametrize("point", ["before", "after"])
def test_a_compaction_killed_mid_way_loses_nothing_and_recovers(
    point: str, out: Path | str, tmp_path: Path
) -> None:
    """kill -9 before the merged file appears: the dataset is as it was. After it appears:
    rows are duplicated, never missing, until the next compact settles its intent record;
    then every id has one row and the content is what it was."""
    ids = many_small_files(out, tmp_path)
    before = rows(out)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_COMPACTION, str(out), point],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    counts = id_counts(out)
    assert set(counts) == set(ids)  # nothing missing, whatever the instant
    if point == "before":
        assert rows(out).equals(before)
    else:
        assert max(counts.values()) == 2  # the documented window, left open by the kill
    result = compact(out)
    assert result.recovered == 1
    assert rows(out).equals(before)
    assert open_dataset(out).count_rows() == len(ids)


def test_a_run_after_a_killed_compaction_removes_the_duplicates(tmp_path: Path) -> None:
    """A run starting over a compaction killed after its merged file appeared settles the
    record (its inputs go), and finds every id done exactly once."""
    out = tmp_path / "out"
    ids = many_small_files(out, tmp_path)
    subprocess.run(
        [sys.executable, "-c", KILLED_COMPACTION, str(out), "after"], timeout=60, check=False
    )
    assert max(id_counts(out).values()) == 2
    with ThreadedSimulator(profile="realistic", seed=9, time_scale=0.02) as sim:
        result = asyncio.run(harvest(fast_settings(tmp_path / "ids.csv", out, sim.base_url)))
    assert result.summary["already_done"] == len(ids)
    assert set(id_counts(out).values()) == {1}
    assert not list((out / INTENTS).iterdir())


def test_run_compact_merges_its_own_files(out: Path | str, tmp_path: Path) -> None:
    """run --compact ends with one file of its own per partition, every id once."""
    ids = make_ids(400, seed=52)
    path = write_csv(tmp_path / "ids.csv", ids)
    with ThreadedSimulator(profile="realistic", seed=10, time_scale=0.02) as sim:
        settings = fast_settings(path, out, sim.base_url, flush_rows=30, compact=True)
        result = asyncio.run(harvest(settings))
    assert result.exit_code == ExitCode.OK
    files = committed_files(out)
    assert len(files) == len({f.rsplit("/", 1)[0] for f in files})
    assert set(id_counts(out).values()) == {1}
    assert len(id_counts(out)) == len(ids)


def test_two_compactions_at_once_are_refused(out: Path | str) -> None:
    """While one compaction holds the dataset, another is refused (two would both keep the
    rows of a file they both merged)."""
    first = CompactionLease(out, "c1", ttl=5)
    first.acquire()
    try:
        with pytest.raises(UsageError, match="a compaction"):
            compact(out, CompactSettings(lease_ttl=5))
    finally:
        first.release()


def test_a_target_size_out_of_range_is_a_usage_error() -> None:
    """0 bytes, or past one PUT's 5 GB, is refused when the settings are made."""
    for bad in (0, 6 * 1024**3):
        with pytest.raises(UsageError, match="--target-size"):
            CompactSettings(target_bytes=bad)


def test_readers_during_a_compaction_never_miss_a_row(out: Path | str, tmp_path: Path) -> None:
    """A reader listing and reading the dataset over and over while compaction runs finds
    every id in every read that completes (a read racing a delete may fail, and is retried:
    it never returns fewer rows)."""
    import threading

    ids = many_small_files(out, tmp_path)
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            compact(out, CompactSettings(target_bytes=40_000))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    reads = 0
    try:
        for _ in range(10_000):  # bounded; ends when the compaction does
            try:
                counts = id_counts(out)
            except (OSError, pa.ArrowException, OutputError):
                continue  # a file listed, then merged away before it was read
            reads += 1
            assert set(counts) == set(ids), f"{len(set(ids) - set(counts))} ids missing"
            if done.is_set():
                break
    finally:
        worker.join(60)
    assert not errors
    assert reads >= 1
    assert set(id_counts(out).values()) == {1}


def test_compact_of_a_missing_directory_is_exit_2_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """harvester compact on a path that does not exist: one line, exit 2, no folder made."""
    code = main(["compact", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE
    assert len(err) == 1
    assert "no such directory" in err[0]
    assert not (tmp_path / "nope").exists()
