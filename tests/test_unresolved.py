"""Exit 1 says why: one line with the unresolved count and the commonest reason, and the
summary counts every reason; a complete answer of any value is terminal and never re-polled."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from harvester.errors import ExitCode
from harvester.metrics import RunStats
from harvester.report import explain_unresolved
from harvester.runner import harvest
from harvester.settings import RunSettings

from .api_double import RETRIEVING, Answer, ApiDouble
from .conftest import TOKEN, api_document, fast_settings, free_port, make_ids, write_csv


def run(tmp_path: Path, ids: list[str], base_url: str, **overrides: Any) -> Any:
    path = write_csv(tmp_path / "ids.csv", ids)
    settings = fast_settings(path, tmp_path / "out", base_url, **overrides)
    return asyncio.run(harvest(settings))


def test_still_retrieving_at_max_wait(tmp_path: Path) -> None:
    """Ids never ready are left at --max-wait, and the line says so and what to change."""
    ids = make_ids(6, seed=91)
    ready: dict[str, list[Answer]] = {cid: [RETRIEVING, (200, api_document())] for cid in ids[:2]}
    with ApiDouble(ready, token=TOKEN) as double:
        result = run(tmp_path, ids, double.base_url, max_wait=0.4)
    assert result.exit_code == ExitCode.UNRESOLVED
    assert result.summary["unresolved_reasons"] == {"max_wait:retrieving": 4}
    assert result.message == (
        "4 ids are unresolved: all still retrieving when --max-wait (0.4 s) ran out; "
        "raise --max-wait for slow models; rerun the same command to poll them again"
    )


def test_retries_used_up_names_the_error(tmp_path: Path) -> None:
    """500 to every poll: the ids use up --max-retries, and the line names http_500."""
    ids = make_ids(3, seed=92)
    with ApiDouble(token=TOKEN, every=(500, "Unknown error occurred")) as double:
        result = run(tmp_path, ids, double.base_url, max_retries=2)
    assert result.exit_code == ExitCode.UNRESOLVED
    assert result.summary["unresolved_reasons"] == {"retries:http_500": 3}
    assert "3 ids are unresolved: all used up --max-retries (2) on http_500" in result.message
    assert double.polls == dict.fromkeys(ids, 3)


def test_unreachable_server_is_named(tmp_path: Path) -> None:
    """Nothing listening: the line says the server is unreachable and names the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    result = run(tmp_path, make_ids(2, seed=93), url, max_retries=1)
    assert result.exit_code == ExitCode.UNRESOLVED
    assert result.summary["unresolved_reasons"] == {"retries:connect_error": 2}
    assert f"the server at {url} is unreachable; check --base-url" in result.message


def test_throttled_until_max_wait(tmp_path: Path) -> None:
    """429 with a Retry-After past --max-wait: the line says lower --rate."""
    throttled = (429, "Rate limit was exceeded", {"Retry-After": "5"})
    with ApiDouble(token=TOKEN, every=throttled) as double:
        result = run(tmp_path, make_ids(2, seed=94), double.base_url, max_wait=0.3)
    assert result.exit_code == ExitCode.UNRESOLVED
    assert result.summary["unresolved_reasons"] == {"max_wait:http_429": 2}
    assert "still failing with http_429 when --max-wait (0.3 s) ran out" in result.message
    assert "lower --rate" in result.message


def line_for(**reasons: int) -> str:
    """Exit 1's line for ``reasons`` (``retries__timeout=5`` stands for ``retries:timeout``)."""
    stats = RunStats()
    for reason, count in reasons.items():
        stats.count_unresolved(reason.replace("__", ":"), count)
    settings = RunSettings(ids_path=Path("ids.csv"), out_dir=Path("out"), token="t")
    return explain_unresolved(stats.unresolved_reasons, settings)


def test_the_commonest_reason_is_named_with_its_count() -> None:
    """Mixed reasons: the line gives the total and the commonest with its count."""
    line = line_for(max_wait__retrieving=2, retries__timeout=5)
    assert line.startswith("7 ids are unresolved: most (5) used up --max-retries (10) on timeout")
    assert "no answer within --request-timeout (60 s)" in line
    assert "\n" not in line


@pytest.mark.parametrize("model", ["", "m" * 300, "__HIVE_DEFAULT_PARTITION__", "../.."])
def test_a_complete_answer_is_terminal_whatever_its_model(tmp_path: Path, model: str) -> None:
    """A Completion of the spec's types ends the id at its first 200: stored, never polled
    again, and a rerun finds it done."""
    [cid] = make_ids(1, seed=95)
    with ApiDouble({cid: [(200, api_document(model))]}, token=TOKEN) as double:
        first = run(tmp_path, [cid], double.base_url)
        second = run(tmp_path, [cid], double.base_url)
        assert double.polls == {cid: 1}
    assert first.exit_code == second.exit_code == ExitCode.OK
    assert first.summary["completed"] == 1
    assert second.summary["already_done"] == 1


def test_a_tie_is_not_called_most() -> None:
    """Two reasons of three ids each: the line names one as the commonest, not as most."""
    line = line_for(retries__http_500=3, retries__timeout=3)
    assert line.startswith("6 ids are unresolved: 3, the commonest reason, used up --max-retries")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_command_prints_one_line_on_stderr_for_exit_1(tmp_path: Path, workers: str) -> None:
    """``harvester run`` exits 1 with the summary on stdout and the reason as one line,
    with ``--workers`` too (the children stay quiet; the parent speaks for all)."""
    path = write_csv(tmp_path / "ids.csv", make_ids(8, seed=96))
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(path), "--out",
        str(tmp_path / "out"), "--base-url", f"http://127.0.0.1:{free_port()}",
        "--max-retries", "0", "--no-progress", "--json", "--workers", workers,
    ]  # fmt: skip
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.UNRESOLVED
    assert orjson.loads(done.stdout)["unresolved_reasons"] == {"retries:connect_error": 8}
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("harvester: 8 ids are unresolved: all used up --max-retries (0)")
