"""Logs: text or JSON lines on stderr, a level, --quiet, and never the token."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from harvester.progress import LogSettings, hide_in_logs, setup_logging

from .conftest import TOKEN, ThreadedSimulator, make_ids, write_csv

TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d harvester (DEBUG|INFO|WARNING|ERROR) .+")
# Enough ids at a low enough rate that a run lasts about a second: several progress lines.
IDS, RATE = 150, 150


def harvest(tmp: Path, base_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``harvester run`` in a child process, the token in its environment as in production."""
    ids = write_csv(tmp / "ids.csv", make_ids(IDS))
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(tmp / "out"),
        "--base-url", base_url, "--rate", str(RATE), "--no-progress", "--log-interval", "0.1",
        "--json", *extra,
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "MASSIVE_API_TOKEN": TOKEN,
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def sim() -> Iterator[ThreadedSimulator]:
    with ThreadedSimulator() as running:
        yield running


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging in-process changes the root logger: put the default back afterwards."""
    yield
    setup_logging()


def test_json_lines_of_a_harvest_never_hold_the_token(
    tmp_path: Path, sim: ThreadedSimulator
) -> None:
    """--log-format json: every stderr line is a JSON object with timestamp, level and event;
    the progress lines carry their figures as fields; the token is in no line."""
    done = harvest(tmp_path, sim.base_url, "--log-format", "json", "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines, "a one-second run logs its progress"
    entries = [orjson.loads(line) for line in lines]
    for entry in entries:
        assert {"timestamp", "level", "event"} <= entry.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["timestamp"])
    progress = [e for e in entries if "ids_done" in e]
    assert progress
    assert all(e["ids_total"] == IDS and e["level"] == "info" for e in progress)
    assert TOKEN not in done.stdout + done.stderr
    assert orjson.loads(done.stdout)["completed"] + orjson.loads(done.stdout)["failed"] == IDS


def test_text_lines_by_default(tmp_path: Path, sim: ThreadedSimulator) -> None:
    """Without --log-format, each stderr line is ``TIME harvester LEVEL message``."""
    done = harvest(tmp_path, sim.base_url)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines
    assert all(TEXT_LINE.fullmatch(line) for line in lines), lines
    assert TOKEN not in done.stderr


@pytest.mark.parametrize("extra", [["--quiet"], ["--log-level", "warning"]])
def test_quiet_and_warning_level_leave_out_progress(
    tmp_path: Path, sim: ThreadedSimulator, extra: list[str]
) -> None:
    """--quiet and --log-level warning: no info lines, no bar; the summary still on stdout."""
    done = harvest(tmp_path, sim.base_url, *extra)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert orjson.loads(done.stdout)["unique_ids"] == IDS


def test_quiet_wins_over_a_lower_level() -> None:
    """--quiet with --log-level debug still lets only warnings and errors through."""
    assert LogSettings(log_level="debug", quiet=True).level == logging.WARNING
    assert LogSettings(log_level="error", quiet=True).level == logging.ERROR
    assert LogSettings(log_level="debug").level == logging.DEBUG


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.usefixtures("restore_logging")
def test_a_secret_is_masked_whatever_logs_it(
    fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even code that logs the token (in the message, an argument or a field) shows ***."""
    secret = 'tok"en\\' + TOKEN  # with characters JSON escapes, and holding another secret
    hide_in_logs(TOKEN)
    hide_in_logs(secret)
    setup_logging(LogSettings(log_format=fmt))
    log = logging.getLogger("harvester.test")
    log.warning("sending %s", secret, extra={"header": f"Bearer {secret}"})
    try:
        raise ValueError(secret)
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert err.count("***") == (3 if fmt == "json" else 2)  # text lines show no fields
    if fmt == "json":
        entries = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert entries[0]["header"] == "Bearer ***"
        assert entries[1]["level"] == "error"
        assert "ValueError" in entries[1]["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_a_token_of_a_few_characters_leaves_lines_readable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A one-letter token (as in a quick local try) is not masked inside every word."""
    hide_in_logs("t")
    setup_logging(LogSettings())
    logging.getLogger("harvester.test").warning("completed 5, in flight 3")
    assert "completed 5, in flight 3" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_library_warnings_come_out_in_the_same_format() -> None:
    """A warning from another logger (asyncio, aiohttp) is a JSON line too; their info is not."""
    stream = io.StringIO()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sys, "stderr", stream)
    try:
        setup_logging(LogSettings(log_format="json"))
        logging.getLogger("asyncio").warning("slow callback")
        logging.getLogger("aiohttp.client").info("chatter")
    finally:
        monkey.undo()
    [line] = stream.getvalue().splitlines()
    assert orjson.loads(line)["logger"] == "asyncio"


def test_setting_up_twice_keeps_one_handler() -> None:
    """Each command sets logging up once; a second call replaces the first's handler."""
    setup_logging(LogSettings(log_format="json"))
    setup_logging()
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "harvester"]
    assert len(ours) == 1


def test_workers_log_json_lines_too(tmp_path: Path, sim: ThreadedSimulator) -> None:
    """--workers 2: the parent's and the children's lines are all JSON (children get argv)."""
    done = harvest(tmp_path, sim.base_url, "--workers", "2", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines
    assert all(orjson.loads(line)["event"] for line in lines)
    assert TOKEN not in done.stderr


def test_workers_from_a_config_file_log_json_and_fan_out_once(
    tmp_path: Path, sim: ThreadedSimulator
) -> None:
    """workers and log_format in --config: the children read the same file, log JSON lines
    and run alone (one parent report folding two workers' reports, no grandchildren)."""
    (tmp_path / "w.toml").write_text('workers = 2\nlog_format = "json"\n')
    done = harvest(tmp_path, sim.base_url, "--config", str(tmp_path / "w.toml"))
    assert done.returncode == 0, done.stderr
    assert all(orjson.loads(line)["level"] for line in done.stderr.splitlines())
    summary = orjson.loads(done.stdout)
    assert summary["workers"] == 2
    reports = list((tmp_path / "out" / "_harvester" / "runs").glob("*.json"))
    assert len(reports) == 3  # the parent's and its two workers'
