"""Progress counts unique ids: the input's line count is only an estimate (``~N``) until the
whole input is read; from then on the total is the exact number of unique ids."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson

from harvester.metrics import RunStats
from harvester.progress import Progress
from harvester.sim import PROFILES

from .conftest import TOKEN, ThreadedSimulator, make_ids, write_csv

# Ready times of 0.14-3 s (the API's, at 1/50): a run of a few seconds, many progress lines.
PROFILE = replace(PROFILES["realistic"].without_faults(), name="progress", latency_median_s=0.0)
PROGRESS = re.compile(r"harvester INFO ids (\d+)/(~?)(\d+) \(")


def messy_input(path: Path) -> tuple[Path, int]:
    """300 ids, each three times and shuffled, 40 distinct invalid values,
    one invalid value ten times, and blank lines: 1,270 lines for 341 unique values."""
    ids = make_ids(300, seed=41)
    lines = ids * 3 + [f"not-a-uuid-{n}" for n in range(40)] + ["ünïcode-junk"] * 10 + [""] * 20
    random.Random(41).shuffle(lines)
    return write_csv(path, lines), 300 + 40 + 1


def run(tmp: Path, base_url: str, ids: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(tmp / "out"),
        "--base-url", base_url, "--poll-interval", "0.05", "--max-poll-interval", "0.2",
        "--no-progress", "--log-interval", "0.05", "--json", *extra,
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "MASSIVE_API_TOKEN": TOKEN,
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_last_progress_line_counts_unique_ids(tmp_path: Path) -> None:
    """Duplicates, invalid and blank lines: the last progress line's total is the summary's
    unique ids (not the 1,270 lines), shown without "~"; a "~" total is never below the
    ids done, and once the total is exact it stays so."""
    ids, unique = messy_input(tmp_path / "ids.csv")
    with ThreadedSimulator(profile=PROFILE, time_scale=0.02) as sim:
        done = run(tmp_path, sim.base_url, ids)
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["unique_ids"] == unique
    lines = [m.groups() for m in map(PROGRESS.search, done.stderr.splitlines()) if m]
    assert len(lines) >= 3, done.stderr
    ids_done, about, total = lines[-1]
    assert (about, int(total)) == ("", unique)
    assert int(ids_done) <= unique
    exact = [i for i, (_, about, _) in enumerate(lines) if not about]
    assert exact == list(range(exact[0], len(lines)))  # exact from then on
    for ids_done, about, total in lines:
        assert int(ids_done) <= int(total)
        if not about:
            assert int(total) == unique


def test_json_progress_says_whether_the_total_is_exact(tmp_path: Path) -> None:
    """--log-format json: ``ids_total`` is the unique ids with ``ids_total_exact`` true in the
    last progress line."""
    ids, unique = messy_input(tmp_path / "ids.csv")
    with ThreadedSimulator(profile=PROFILE, time_scale=0.02) as sim:
        done = run(tmp_path, sim.base_url, ids, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    entries = [orjson.loads(line) for line in done.stderr.splitlines()]
    progress = [e for e in entries if "ids_total" in e]
    assert progress, done.stderr
    assert (progress[-1]["ids_total"], progress[-1]["ids_total_exact"]) == (unique, True)


def test_progress_line_estimate_then_exact() -> None:
    """Before the input is read: the line count, marked "~" (never below what is known);
    after: the unique ids, even when fewer than the estimate."""
    stats = RunStats(unique_ids=3, completed=2)
    read = False
    progress = Progress(stats, total=5010, enabled=False, input_read=lambda: read)
    assert progress.line().startswith("ids 2/~5010 ")
    assert progress.fields()["ids_total_exact"] is False
    stats.unique_ids = 6000  # more unique ids seen than lines estimated (a bad estimate)
    assert progress.line().startswith("ids 2/~6000 ")
    read = True
    stats.unique_ids = 5003
    assert progress.line().startswith("ids 2/5003 ")
    assert (progress.fields()["ids_total"], progress.fields()["ids_total_exact"]) == (5003, True)


def test_progress_with_no_ids_at_all() -> None:
    """Every line a duplicate of ids already done: the exact total is what is done."""
    stats = RunStats(unique_ids=4, already_done=4)
    progress = Progress(stats, total=9, enabled=False, input_read=lambda: True)
    assert progress.line().startswith("ids 4/4 ")
    assert progress.totals() == (4, 4, True)


def test_workers_progress_counts_unique_ids_too(tmp_path: Path) -> None:
    """--workers 2: the parent's total becomes exact once every child has read its shard,
    the sum of the children's unique ids."""
    ids, unique = messy_input(tmp_path / "ids.csv")
    with ThreadedSimulator(profile=PROFILE, time_scale=0.02) as sim:
        done = run(tmp_path, sim.base_url, ids, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["unique_ids"] == unique
    lines = [m.groups() for m in map(PROGRESS.search, done.stderr.splitlines()) if m]
    assert lines, done.stderr
    assert lines[-1][1:] == ("", str(unique))
