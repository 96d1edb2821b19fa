"""``--endpoint ai``: the newer ``GET /ai?id=``, whose status objects come with 200, read as
the older endpoint is; the same ids and seed give the same rows on both."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
from aiohttp import web

from harvester.client import CompletionsClient
from harvester.errors import BadResponseError, ExitCode, FatalApiError, ServerError, UsageError
from harvester.model import API_FIELDS, EXTRA_FIELD, Kind
from harvester.runner import harvest
from harvester.settings import ENDPOINT_PATHS
from harvester.sim import PROFILES, Profile, expected_completion

from .api_double import Answer, ApiDouble
from .conftest import (
    TOKEN,
    ThreadedSimulator,
    api_document,
    fast_settings,
    make_ids,
    read_rows,
    write_csv,
)

# Model ready times of 0.7-15 s at time scale 0.05 (a run of about a second), 30% failing, and
# on /ai an archiving spell of 1 s (0.05 s scaled) before each completion.
SLOW = replace(
    PROFILES["realistic"].without_faults(),
    name="slow",
    latency_median_s=0.0,
    fail_share=0.3,
    archiving_s=1.0,
)
SCALE = 0.05
# What a row says about its id; ``polls`` and the harvest time depend on the endpoint.
SAME = ("id", "status", *API_FIELDS, EXTRA_FIELD, "model")


def status(value: str, code: int = 200) -> Answer:
    """A status object as the newer endpoint sends it (200 unless told)."""
    return (code, {"status": value})


class AiDouble(ApiDouble):
    """``ApiDouble``'s scripted answers at ``GET /ai`` (and only there), recording each path."""

    PATHS = ("/ai",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paths: Counter[str] = Counter()

    async def _answer(self, request: web.Request) -> web.Response:
        self.paths[request.path] += 1
        return await super()._answer(request)


def same_columns(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out`` in the columns both endpoints must agree on, by id."""
    table: pa.Table = read_rows(out).select(list(SAME))
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def cli_run(base_url: str, ids: Path, out: Path, *extra: str) -> None:
    """``harvester run`` in a child process, fast polling, the token in its environment."""
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(out),
        "--base-url", base_url, "--poll-interval", "0.02", "--max-poll-interval", "0.05",
        "--no-progress", "--json", *extra,
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "MASSIVE_API_TOKEN": TOKEN,
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == ExitCode.OK, done.stderr


# -- the CLI against the simulator ------------------------------------------------------------


def test_endpoint_ai_gets_the_same_rows_as_the_default(tmp_path: Path) -> None:
    """`harvester run --endpoint ai` and the default endpoint, each against its own simulator
    of the same seed: the same rows (id, status, every field, model); on /ai every answer,
    status objects included, came with 200."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(120, seed=31))
    kwargs: dict[str, Any] = {"profile": SLOW, "seed": 7, "time_scale": SCALE}
    with ThreadedSimulator(**kwargs) as old, ThreadedSimulator(**kwargs) as new:
        cli_run(old.base_url, ids, tmp_path / "old")
        cli_run(new.base_url, ids, tmp_path / "new", "--endpoint", "ai")
        old_statuses, new_statuses = old.stats()["by_status"], new.stats()["by_status"]
    rows = same_columns(tmp_path / "new")
    assert rows == same_columns(tmp_path / "old")
    assert len(rows) == 120
    assert {row["status"] for row in rows} == {"completed", "failed"}
    assert set(map(int, old_statuses)) == {200, 202}
    assert set(map(int, new_statuses)) == {200}  # status objects too


async def test_endpoint_ai_in_process_stores_what_the_simulator_serves(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Against the simulator's /ai, every completed row is the document the simulator
    serves for that id (and only ids that fail have a failed row)."""
    ids = make_ids(60, seed=32)
    async with sim_factory(profile=SLOW, seed=3, time_scale=SCALE) as sim:
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", ids), tmp_path / "out", sim.base_url, endpoint="ai"
        )
        result = await harvest(settings)
    assert result.exit_code == ExitCode.OK, result.message
    for row in read_rows(tmp_path / "out").to_pylist():
        expected = expected_completion(row["id"], seed=3, profile=SLOW)
        if expected is None:
            assert row["status"] == "failed"
        else:
            assert row["status"] == "completed"
            assert {name: row[name] for name in API_FIELDS} == {
                name: expected.get(name) for name in API_FIELDS
            }


# -- each answer of the newer endpoint, through a whole run -----------------------------------


@pytest.mark.parametrize(
    ("script", "outcome", "polls"),
    [
        ([status("retrieving"), (200, api_document())], "completed", 2),
        ([status("retrieving"), status("archiving"), (200, api_document())], "completed", 3),
        # A bare "successful" has no completion in it: asked again, the completion comes.
        ([status("archiving"), status("successful"), (200, api_document())], "completed", 3),
        ([(200, {**api_document(), "status": "successful"})], "completed", 1),
        ([status("retrieving"), status("failed")], "failed", 2),
        ([status("failed", 202)], "failed", 1),  # the older form, should /ai send it
        ([status("queued"), (200, api_document())], "completed", 2),  # unknown: retried
        ([(404, "Not found"), (200, api_document())], "completed", 2),  # retried
        ([(422, "Id must be a valid UUID")], "invalid", 1),
    ],
    ids=[
        "retrieving",
        "archiving",
        "successful-bare",
        "successful-with-completion",
        "failed",
        "failed-202",
        "unknown-status",
        "404",
        "422",
    ],
)
async def test_each_answer_of_the_newer_endpoint(
    tmp_path: Path, script: list[Answer], outcome: str, polls: int
) -> None:
    """What each status object (200) of GET /ai means: pending ones are polled again, failed
    is a row, a completion is a row; only /ai is ever asked."""
    [cid] = make_ids(1, seed=33)
    with AiDouble({cid: script}, token=TOKEN) as double:
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", [cid]), tmp_path / "out", double.base_url,
            endpoint="ai",
        )  # fmt: skip
        result = await harvest(settings)
    assert result.exit_code == ExitCode.OK, result.message
    [row] = read_rows(tmp_path / "out").to_pylist()
    assert (row["status"], row["polls"]) == (outcome, polls)
    assert double.paths == {"/ai": double.polls[cid]}


async def test_a_bare_successful_forever_is_unresolved_not_an_empty_row(tmp_path: Path) -> None:
    """ "successful" without the completion, every time: no row is made up; the id ends
    unresolved at --max-wait, for the next run to ask again."""
    [cid] = make_ids(1, seed=34)
    with AiDouble({cid: [status("successful")]}, token=TOKEN) as double:
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", [cid]), tmp_path / "out", double.base_url,
            endpoint="ai", max_wait=0.5,
        )  # fmt: skip
        result = await harvest(settings)
    assert result.exit_code == ExitCode.UNRESOLVED
    assert result.summary["unresolved"] == 1
    assert read_rows(tmp_path / "out").num_rows == 0


async def test_402_on_the_newer_endpoint_stops_the_run(tmp_path: Path) -> None:
    """The newer endpoint adds 402 (out of credit): exit 3, as on the older one."""
    every: Answer = (402, "Credit balance is 0; top up at https://example.com/billing")
    with AiDouble(token=TOKEN, every=every) as double:
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", make_ids(3, seed=35)), tmp_path / "out",
            double.base_url, endpoint="ai",
        )  # fmt: skip
        result = await harvest(settings)
    assert result.exit_code == ExitCode.REFUSED
    assert "out of credit" in (result.message or "")


# -- the client alone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (status("retrieving"), Kind.RETRIEVING),
        (status("archiving"), Kind.RETRIEVING),
        (status("successful"), Kind.RETRIEVING),
        (status("failed"), Kind.FAILED),
        ((200, api_document("gemini")), Kind.COMPLETED),
        (status("retrieving", 202), Kind.RETRIEVING),
    ],
)
async def test_the_client_reads_each_status_of_the_newer_endpoint(
    answer: Answer, expected: Kind
) -> None:
    """One poll of GET /ai?id= through CompletionsClient: the Kind each answer means."""
    [cid] = make_ids(1, seed=36)
    with AiDouble({cid: [answer]}, token=TOKEN) as double:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            client = CompletionsClient(
                session, double.base_url + ENDPOINT_PATHS["ai"], token=TOKEN, max_body_bytes=2**20
            )
            kind, doc = await client.poll(cid)
    assert kind is expected
    assert (doc is not None) == (expected is Kind.COMPLETED)
    if doc is not None:
        assert doc["model"] == "gemini"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (status(""), BadResponseError),
        ((200, {"status": 3}), BadResponseError),
        ((404, "Not found"), ServerError),
        ((402, "Credit balance is 0"), FatalApiError),
    ],
)
async def test_the_client_refuses_what_the_newer_endpoint_does_not_send(
    answer: Answer, error: type[Exception]
) -> None:
    """An empty or non-text status is a bad answer (retried), 404 a server error (retried),
    402 fatal."""
    [cid] = make_ids(1, seed=37)
    with AiDouble({cid: [answer]}, token=TOKEN) as double:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            client = CompletionsClient(
                session, double.base_url + "/ai", token=TOKEN, max_body_bytes=2**20
            )
            with pytest.raises(error):
                await client.poll(cid)


# -- the setting ------------------------------------------------------------------------------


def test_the_endpoint_setting_maps_to_its_path() -> None:
    """completions (the default) and ai map to their paths; anything else is refused."""
    base = fast_settings("ids.csv", "out", "https://api.example.com/")
    assert base.endpoint == "completions"
    assert base.endpoint_url == "https://api.example.com/ai/completions"
    assert replace(base, endpoint="ai").endpoint_url == "https://api.example.com/ai"
    for bad in ("AI", "/ai", "", "completions "):
        with pytest.raises(UsageError, match="--endpoint must be one of completions, ai"):
            replace(base, endpoint=bad)


def test_the_endpoint_comes_from_the_environment_too(tmp_path: Path) -> None:
    """HARVESTER_ENDPOINT=ai is the setting (config show names its source); a bad value is
    one line, exit 2."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "HARVESTER_ENDPOINT": "ai",
    }
    argv = [sys.executable, "-m", "harvester", "config", "show", "--json"]
    shown = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert '"endpoint":{"value":"ai","source":"env"}' in shown.stdout
    env["HARVESTER_ENDPOINT"] = "newest"
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == ExitCode.USAGE
    assert len(bad.stderr.splitlines()) == 1
    assert "HARVESTER_ENDPOINT" in bad.stderr
    assert "completions, ai" in bad.stderr


def test_profile_archiving_must_be_a_duration() -> None:
    """archiving_s is validated like the other durations."""
    with pytest.raises(UsageError, match="archiving_s"):
        Profile(name="x", archiving_s=-1.0)
