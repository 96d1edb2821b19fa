"""``--out s3://...`` against a real S3-compatible server (moto) that the tests start on loopback.

The promises under test: nothing lands in a local folder; every object is final when it
appears, so a plain hive read sees exactly the committed rows; kill -9 and a rerun give one
row per id; two runs of one shard at once are refused by the lease object; disjoint shards
share a prefix; an unknown scheme is exit 2 with one line and no folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from harvester.cli import main
from harvester.dataset import committed_files, open_dataset
from harvester.errors import ExitCode, OutputError, UsageError
from harvester.lease import LOCKS, ObjectLease, RunLease
from harvester.runner import harvest
from harvester.shard import Shard
from harvester.storage import S3Store, open_store

from .conftest import TOKEN, ThreadedSimulator, fast_settings, make_ids, wait_until, write_csv
from .moto_s3 import S3, s3, s3_endpoint
from .readme_blocks import code_blocks, run_sh, section

__all__ = ["s3", "s3_endpoint"]  # fixtures


def s3_filesystem(s3: S3) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on the test server, as a third-party reader would make it."""
    host = s3.endpoint.removeprefix("http://")
    return pafs.S3FileSystem(
        endpoint_override=host, scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1",
    )  # fmt: skip


def hive_ids(s3: S3, prefix: str = "harvest") -> list[str]:
    """The ids a plain hive read of the prefix sees (pyarrow, no harvester code)."""
    table = ds.dataset(
        f"{s3.bucket}/{prefix}",
        filesystem=s3_filesystem(s3),
        format="parquet",
        partitioning="hive",
        exclude_invalid_files=False,
        ignore_prefixes=["_", "."],
    ).to_table(columns=["id"])
    return [str(v) for v in table.column("id").to_pylist()]


def assert_exactly_once(s3: S3, ids: list[str]) -> None:
    """One row per input id, no other row, as a plain reader sees the bucket."""
    counts = Counter(hive_ids(s3))
    repeated = [i for i, n in counts.items() if n > 1]
    assert not repeated, f"{len(repeated)} ids twice"
    assert set(counts) == set(ids), f"missing {len(set(ids) - set(counts))}"


def run_argv(ids: Path | str, out: str, url: str, *extra: str) -> list[str]:
    """A ``harvester run`` command line with fast polls and frequent commits."""
    return [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", out,
        "--base-url", url, "--rate", "3000", "--concurrency", "64", "--flush-interval", "0.2",
        "--poll-interval", "0.05", "--max-poll-interval", "0.2", "--max-wait", "30",
        "--no-progress", "--json", *extra,
    ]  # fmt: skip


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A child harvester with the token and the AWS environment (inherited) set."""
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    with log.open("ab") as err:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, dict[str, Any] | None]:
    """Its exit code and the JSON summary it printed, if any."""
    out, _ = proc.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    return proc.returncode, (orjson.loads(lines[-1]) if lines else None)


def kill_after_commits(argv: list[str], log: Path, s3: S3, what: str) -> None:
    """Start a run, kill -9 it once it has committed two more data objects."""
    before = len(data_objects(s3))
    proc = start(argv, log)
    try:
        wait_until(lambda: len(data_objects(s3)) > before + 1 or proc.poll() is not None, 60, what)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, log.read_text()


def data_objects(s3: S3) -> list[str]:
    """Keys of the committed data files."""
    return [k for k in s3.keys("harvest/") if k.rsplit("/", 1)[-1].startswith("part-")]


@pytest.mark.parametrize(
    "out", ["ftp://host/x", "s3:/bucket/harvest", "nosuch://bucket/x", "S3:bucket"]
)
def test_an_unknown_or_squashed_uri_is_exit_2_with_one_line_and_no_folder(
    out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scheme nothing can open, or an s3 URI missing its //, exits 2 with one line and
    leaves no local folder behind (today's bug: a folder named s3:)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    code = main(["run", "--ids", str(ids), "--out", out, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.USAGE
    assert len(err) == 1, err
    assert err[0].startswith("harvester: error: --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.csv"]


async def test_a_run_to_s3_commits_exactly_once_and_a_rerun_resumes(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run writes only to the bucket (no local folder), one row per id, reports beside
    them, its lease gone at the end; a rerun finds every id done and writes no data."""
    monkeypatch.chdir(tmp_path)
    ids = make_ids(600, seed=41)
    path = write_csv(tmp_path / "ids.csv", ids)
    with ThreadedSimulator() as sim:
        first = await harvest(fast_settings(path, s3.uri(), sim.base_url))
        objects = data_objects(s3)
        second = await harvest(fast_settings(path, s3.uri(), sim.base_url))
    assert first.exit_code == ExitCode.OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.csv"]
    assert_exactly_once(s3, ids)
    assert first.summary["out"] == s3.uri()
    assert second.exit_code == ExitCode.OK
    assert second.summary["already_done"] == len(ids)
    assert data_objects(s3) == objects  # the rerun committed nothing new
    keys = s3.keys("harvest/_harvester/")
    assert sum(k.startswith("harvest/_harvester/runs/") for k in keys) == 2
    assert not [k for k in keys if k.startswith(f"harvest/{LOCKS}/")]  # leases released
    assert open_dataset(s3.uri()).count_rows() == len(ids)


def test_kill_9_twice_mid_run_then_a_rerun_gives_one_row_per_id(s3: S3, tmp_path: Path) -> None:
    """kill -9 twice while committing to S3, then a rerun: every id has exactly one row.
    Each rerun waits out the killed run's lease (--lease-ttl 2) instead of failing."""
    ids = make_ids(3000, seed=42)
    path = write_csv(tmp_path / "ids.csv", ids)
    log = tmp_path / "children.log"
    argv = run_argv(path, s3.uri(), "", "--lease-ttl", "2")
    with ThreadedSimulator(profile="realistic", seed=5, time_scale=0.05) as sim:
        argv[argv.index("--base-url") + 1] = sim.base_url
        for kill in range(2):
            kill_after_commits(argv, log, s3, f"commits before kill {kill + 1}")
        leases = [k for k in s3.keys("harvest/") if k.endswith(".lease")]
        assert leases, "a killed run leaves its lease until it expires"
        code, summary = finish(start(argv, log), timeout=120)
    assert code == ExitCode.OK, log.read_text()[-2000:]
    assert summary is not None
    assert 0 < summary["already_done"] < len(ids)
    assert_exactly_once(s3, ids)
    assert not [k for k in s3.keys("harvest/") if k.endswith(".lease")]
    # One PUT per object: the kills left no multipart upload behind, visible or not.
    assert not s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_the_same_shard_twice_at_once_is_refused(s3: S3, tmp_path: Path) -> None:
    """While one run holds shard 1/2's lease object, a second run of it exits 2 with one
    line naming the shard; the first is unaffected."""
    path = write_csv(tmp_path / "ids.csv", make_ids(400, seed=43))
    log = tmp_path / "children.log"
    with ThreadedSimulator(profile="realistic", seed=6, time_scale=0.5) as sim:
        argv = run_argv(path, s3.uri(), sim.base_url, "--shard", "1/2", "--lease-ttl", "3")
        first = start(argv, log)
        try:
            lease = f"harvest/{LOCKS}/shard-1-of-2.lease"
            wait_until(lambda: lease in s3.keys("harvest/"), 30, "the first run's lease")
            second = subprocess.run(
                argv, capture_output=True, env={**os.environ, "MASSIVE_API_TOKEN": TOKEN},
                timeout=60, check=False,
            )  # fmt: skip
            assert first.poll() is None
            first.send_signal(signal.SIGTERM)
            code, _ = finish(first, timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate(timeout=10)
    assert second.returncode == ExitCode.USAGE
    err = second.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    assert "shard 1/2" in err[0]
    assert second.stdout == b""
    assert code == ExitCode.INTERRUPTED


def test_disjoint_shards_at_once_share_a_prefix(s3: S3, tmp_path: Path) -> None:
    """Shards 0/2 and 1/2 writing one prefix at the same time both exit 0 and together
    write exactly one row per id."""
    ids = make_ids(1000, seed=44)
    path = write_csv(tmp_path / "ids.csv", ids)
    log = tmp_path / "children.log"
    with ThreadedSimulator(profile="realistic", seed=7, time_scale=0.02) as sim:
        procs = [
            start(run_argv(path, s3.uri(), sim.base_url, "--shard", f"{k}/2"), log)
            for k in range(2)
        ]
        results = [finish(p, timeout=120) for p in procs]
    assert [code for code, _ in results] == [ExitCode.OK, ExitCode.OK], log.read_text()[-2000:]
    assert sum(s["unique_ids"] for _, s in results if s) == len(ids)
    assert_exactly_once(s3, ids)


def test_a_live_lease_of_another_n_refuses_the_run(s3: S3) -> None:
    """A live lease of shard 0/2 refuses a lease of shard 0/3 (their ids overlap), and the
    refused one leaves no lease object behind."""
    store = open_store(s3.uri())
    holder = RunLease(store, "run-a", Shard.parse("0/2"), ttl=5)
    holder.acquire()
    try:
        with pytest.raises(UsageError, match="another N"):
            RunLease(open_store(s3.uri()), "run-b", Shard.parse("0/3"), ttl=5).acquire()
        names = sorted(k.rsplit("/", 1)[-1] for k in s3.keys("harvest/"))
        assert names == ["shard-0-of-2.lease"]
    finally:
        holder.release()
    assert s3.keys("harvest/") == []


def test_a_lease_taken_over_stops_its_runs_commits(s3: S3) -> None:
    """When another writer replaces a run's lease object (as a run taking over a lease it
    judged expired would), the run's next renewal fails and its commits are refused."""
    store = open_store(s3.uri())
    assert isinstance(store, S3Store)
    lease = ObjectLease(store, "run-a", "shard-0-of-1", "shard 0/1", ttl=1.5, shard=Shard(0, 1))
    lease.acquire()
    try:
        assert store.fence is not None
        s3.client().put_object(
            Bucket=s3.bucket, Key=f"harvest/{LOCKS}/shard-0-of-1.lease", Body=b"{}"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                lease.check()
            except OutputError:
                break
            time.sleep(0.05)
        with pytest.raises(OutputError, match="not renewed in time"):
            store.commit("harvest_date=2026-01-01/model_key=x/part-a-000001.parquet", _empty())
    finally:
        lease.release()
    assert committed_files(store) == []


def _empty() -> Any:
    from harvester.sink import _Columns

    return _Columns().table()


@pytest.fixture
def s3_dataset(s3: S3, tmp_path: Path) -> tuple[S3, list[str]]:
    """A prefix written by one real run, and its ids."""
    import asyncio

    ids = make_ids(300, seed=45)
    path = write_csv(tmp_path / "ids.csv", ids)
    with ThreadedSimulator(profile="realistic", seed=8, time_scale=0.02) as sim:
        result = asyncio.run(harvest(fast_settings(path, s3.uri(), sim.base_url)))
    assert result.exit_code == ExitCode.OK
    return s3, ids


def test_pyarrow_and_pandas_read_the_s3_dataset(s3_dataset: tuple[S3, list[str]]) -> None:
    """pyarrow (plain hive) and pandas read every row from S3, typed as on a local disk."""
    s3, ids = s3_dataset
    assert sorted(hive_ids(s3)) == sorted(ids)
    frame = pd.read_parquet(f"{s3.bucket}/harvest", filesystem=s3_filesystem(s3))
    assert sorted(frame["id"]) == sorted(ids)
    assert set(frame["status"]) <= {"completed", "failed", "invalid"}


def test_inspect_reads_the_s3_dataset(s3_dataset: tuple[S3, list[str]]) -> None:
    """``harvester inspect s3://...`` counts the rows in the bucket as on a disk: one per id,
    by status, with the run's report."""
    from harvester.inspect import inspect_dir

    s3, ids = s3_dataset
    figures = inspect_dir(s3.uri())
    assert figures["rows"] == len(ids)
    assert sum(figures["by_status"].values()) == len(ids)
    assert figures["files"] >= 1
    assert figures["runs"][0]["exit_code"] == ExitCode.OK


def test_polars_reads_the_s3_dataset(s3_dataset: tuple[S3, list[str]]) -> None:
    """Polars reads the data files from S3 with hive partitioning (its own S3 client)."""
    s3, ids = s3_dataset
    options = {
        "aws_endpoint_url": s3.endpoint, "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing", "aws_region": "us-east-1", "aws_allow_http": "true",
    }  # fmt: skip
    frame = pl.scan_parquet(
        f"s3://{s3.bucket}/harvest/**/*.parquet", hive_partitioning=True, storage_options=options
    ).collect()
    assert sorted(frame["id"].to_list()) == sorted(ids)
    assert frame.schema["model_key"] == pl.String


def test_duckdb_reads_the_s3_dataset_where_httpfs_is_available(
    s3_dataset: tuple[S3, list[str]],
) -> None:
    """DuckDB reads S3 through its httpfs extension, which it downloads on first use; offline
    (as in CI's sandbox) the extension is absent and this reader cannot be tested."""
    s3, ids = s3_dataset
    con = duckdb.connect()
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error as exc:
        pytest.skip(f"DuckDB's httpfs extension is not installed and needs a download ({exc})")
    host = s3.endpoint.removeprefix("http://")
    con.execute(
        f"CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    rows = con.execute(
        f"SELECT id FROM read_parquet('s3://{s3.bucket}/harvest/**/*.parquet', "
        "hive_partitioning=true)"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)


def test_the_readme_object_storage_example_runs_as_written(tmp_path: Path) -> None:
    """The README's "Object storage" shell block (free ports for 9000 and 8080): the run
    commits 500 ids to the bucket, compaction leaves one file per partition, each id once."""
    from .conftest import free_port

    blocks = code_blocks(section("## Object storage"))
    [block] = [b for b in blocks if "moto_server" in b]
    s3_port, sim_port = str(free_port()), str(free_port())
    block = block.replace("9000", s3_port).replace("8080", sim_port)
    done = run_sh(block, tmp_path, timeout=150, drop_env=("AWS_", "HARVESTER_"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["exit_code"] == 0
    assert summary["completed"] + summary["failed"] + summary["invalid"] == 500
    assert re.search(r"^\d+ data files -> \d+ ", done.stdout, re.M), done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.csv.gz", "summary.json"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("completions", Path("completions")),
        ("./data:2024", Path("data:2024")),
        ("C:\\harvest", Path("C:\\harvest")),  # a drive letter is no scheme
        ("file:///tmp/h%C3%A9", Path("/tmp/hé")),
        ("s3://bucket/a/b", "s3://bucket/a/b"),
        ("S3://bucket", "S3://bucket"),
        ("dossier/été", Path("dossier/été")),
    ],
)
def test_out_locations_are_paths_or_uris(text: str, expected: Path | str) -> None:
    """Local spellings stay paths (a drive letter, ':' after ./, Unicode, file://), URIs of
    known schemes stay text, whatever their case."""
    from harvester.storage import parse_location

    assert parse_location(text) == expected


def test_an_s3_uri_without_a_bucket_is_a_usage_error(s3: S3) -> None:
    """s3:// alone names no bucket: exit 2's error, before any request."""
    with pytest.raises(UsageError, match="no bucket"):
        open_store("s3://")


def test_s3_without_boto3_is_a_usage_error_naming_the_extra(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where boto3 is not installed, --out s3:// says which extra to install (exit 2)."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(UsageError, match=r"harvester\[s3\]"):
        open_store(s3.uri())


def test_a_dead_runs_lease_is_taken_over_once_it_expires(s3: S3) -> None:
    """A lease nobody renews (its run killed) is taken over after its ttl, by the server's
    clock; the new holder may commit at once (its ttl counts from the takeover, not from
    the start of its wait)."""
    store = open_store(s3.uri())
    assert isinstance(store, S3Store)
    dead = b'{"run_id": "dead", "ttl_s": 2}'
    assert store.create(f"{LOCKS}/shard-0-of-1.lease", dead) is not None
    lease = ObjectLease(store, "run-b", "shard-0-of-1", "shard 0/1", ttl=2, shard=Shard(0, 1))
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started >= 1  # it waited for the expiry
        lease.check()  # valid now: no OutputError
        body = store.get_bytes(f"{LOCKS}/shard-0-of-1.lease")
        assert body is not None
        assert orjson.loads(body)["run_id"] == "run-b"
    finally:
        lease.release()
