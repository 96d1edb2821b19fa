"""End-to-end runs of the engine against the simulator and against scripted servers."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.compute as pc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from harvester.errors import ExitCode
from harvester.runner import harvest
from harvester.sim import NO_CREDIT_TOKEN, PROFILES, Simulator, expected_completion

from .conftest import TOKEN, api_document, fast_settings, make_ids, read_hive, read_rows, write_csv

SimFactory = Callable[..., Simulator]


Reply = Callable[[], web.StreamResponse]


def ok(doc: dict[str, Any]) -> Reply:
    return lambda: web.Response(body=orjson.dumps(doc), content_type="application/json")


def status(value: str, code: int = 202) -> Reply:
    return lambda: web.json_response({"status": value}, status=code)


def text(code: int, body: str = "error", **headers: str) -> Reply:
    return lambda: web.Response(status=code, text=body, headers=headers)


def raw(code: int, body: bytes, content_type: str) -> Reply:
    return lambda: web.Response(status=code, body=body, content_type=content_type)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[dict[str, list[Reply]]], Any]]:
    """A server answering each id with its scripted replies in turn (the last one repeats)."""
    servers: list[TestServer] = []

    async def start(script: dict[str, list[Reply]]) -> TestServer:
        calls: Counter[str] = Counter()

        async def handle(request: web.Request) -> web.StreamResponse:
            conversation_id = request.query["id"]
            replies = script[conversation_id]
            reply = replies[min(calls[conversation_id], len(replies) - 1)]
            calls[conversation_id] += 1
            return reply()

        app = web.Application()
        app.router.add_get("/ai/completions", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_instant_run_writes_one_row_per_id_with_served_content(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """Every id gets exactly one row whose content is what the simulator served."""
    ids = make_ids(400)
    path = write_csv(tmp_path / "ids.csv", ids)
    async with sim_factory(profile="instant", seed=7) as sim:
        result = await harvest(fast_settings(path, tmp_path / "out", sim.base_url))
    s = result.summary
    assert result.exit_code == ExitCode.OK
    assert s["unique_ids"] == 400
    assert s["completed"] + s["failed"] == 400
    rows = read_rows(tmp_path / "out")
    assert sorted(rows.column("id").to_pylist()) == sorted(ids)
    by_id = {r["id"]: r for r in rows.to_pylist()}
    for conversation_id in ids[:50]:
        expected = expected_completion(conversation_id, seed=7, profile="instant")
        row = by_id[conversation_id]
        if expected is None:
            assert row["status"] == "failed"
            assert row["model"] is None
            continue
        assert row["status"] == "completed"
        for name in ("model", "query", "html", "prompt", "completion", "sources", "ads"):
            assert row[name] == expected[name]
        assert row["fanouts"] == expected["fanouts"]
        assert row["polls"] == 1
        assert row["harvested_at"].tzinfo is not None


async def test_dataset_reads_as_is_in_duckdb_and_pyarrow(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """DuckDB and plain pyarrow hive reads see the same rows and the partition columns."""
    path = write_csv(tmp_path / "ids.csv", make_ids(200))
    out = tmp_path / "out"
    async with sim_factory(profile="instant") as sim:
        await harvest(fast_settings(path, out, sim.base_url))
    table = read_hive(out)
    assert table.num_rows == 200
    assert {"harvest_date", "model", "id", "status", "fanouts", "polls"} <= set(table.column_names)
    glob = f"{out}/**/*.parquet"
    relation = duckdb.sql(
        f"SELECT count(*), count(DISTINCT model) "
        f"FROM read_parquet('{glob}', hive_partitioning=true)"
    )
    assert relation is not None
    [(count, models)] = relation.fetchall()
    assert count == 200
    assert models >= 1


async def test_retrieving_ids_are_polled_again_until_ready(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """Ids still retrieving are re-polled, and each row counts the polls it took."""
    calm = PROFILES["realistic"].without_faults()
    path = write_csv(tmp_path / "ids.csv", make_ids(60))
    async with sim_factory(profile=calm, time_scale=0.003) as sim:
        result = await harvest(fast_settings(path, tmp_path / "out", sim.base_url))
    assert result.exit_code == ExitCode.OK
    polls = read_rows(tmp_path / "out").column("polls").to_pylist()
    assert len(polls) == 60
    assert max(polls) > 1
    assert sum(polls) == result.summary["requests"]


async def test_rate_limit_holds_at_the_server(tmp_path: Path, sim_factory: SimFactory) -> None:
    """The server never sees more than R+1 requests in any sliding second, and about R sustained."""
    rate = 40
    path = write_csv(tmp_path / "ids.csv", make_ids(130))
    async with sim_factory(profile="instant") as sim:
        started = time.monotonic()
        result = await harvest(fast_settings(path, tmp_path / "out", sim.base_url, rate=rate))
        elapsed = time.monotonic() - started
        stats = sim.stats
    assert result.summary["requests"] == 130
    assert stats.max_per_second <= rate + 1
    assert elapsed >= (130 - rate - 1) / rate  # could not have gone faster than R
    assert elapsed < 130 / (0.7 * rate) + 10  # loose: sustained well above 0.7 R


async def test_concurrency_cap_holds_at_the_server(tmp_path: Path, sim_factory: SimFactory) -> None:
    """No more than C requests are ever in flight at the server, and C is reached."""
    slow = PROFILES["instant"].__class__(
        name="slow", models=PROFILES["instant"].models, html_bytes=500, latency_median_s=0.05
    )
    path = write_csv(tmp_path / "ids.csv", make_ids(120))
    async with sim_factory(profile=slow) as sim:
        await harvest(fast_settings(path, tmp_path / "out", sim.base_url, concurrency=5))
        peak = sim.stats.peak_in_flight
    assert peak <= 5
    assert peak >= 3  # loose: the cap is used, not just respected


async def test_every_outcome_against_a_scripted_server(
    tmp_path: Path, scripted: Callable[[dict[str, list[Reply]]], Any]
) -> None:
    """Each kind of answer leads to the documented outcome and nothing wrong is stored."""
    ids = make_ids(9)
    script = {
        ids[0]: [ok(api_document("gemini"))],
        ids[1]: [status("retrieving"), status("retrieving"), ok(api_document("copilot"))],
        ids[2]: [status("failed")],
        ids[3]: [text(422, "Character counts must be no more than 255")],
        ids[4]: [text(500), text(504), ok(api_document())],
        ids[5]: [text(429, "slow down", **{"Retry-After": "0.05"}), ok(api_document())],
        ids[6]: [raw(200, b'{"model": "chatgpt", "qu', "application/json"), ok(api_document())],
        ids[7]: [raw(200, b"<html></html>", "text/html"), ok(api_document())],
        ids[8]: [raw(200, b'{"model": 3}', "application/json"), ok(api_document(extra_field=1))],
    }
    server = await scripted(script)
    path = write_csv(tmp_path / "ids.csv", ids)
    result = await harvest(fast_settings(path, tmp_path / "out", base_url(server)))
    s = result.summary
    assert result.exit_code == ExitCode.OK
    assert (s["completed"], s["failed"], s["invalid"], s["unresolved"]) == (7, 1, 1, 0)
    assert s["errors"] == {
        "bad_json": 1,
        "bad_shape": 1,
        "http_429": 1,
        "http_500": 1,
        "http_504": 1,
        "not_json": 1,
    }
    rows = {r["id"]: r for r in read_rows(tmp_path / "out").to_pylist()}
    assert rows[ids[1]]["polls"] == 3
    assert rows[ids[2]]["status"] == "failed"
    assert rows[ids[3]]["status"] == "invalid"
    assert rows[ids[4]]["polls"] == 3
    assert rows[ids[8]]["extra"] == '{"extra_field":1}'
    assert all(r["query"] == "q" for r in rows.values() if r["status"] == "completed")


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (text(401, "Authorization header must be provided"), "HTTP 401"),
        (text(402, "Credit balance is 0; top up at https://x"), "out of credit"),
        (text(403, f"Valid API token must be provided, not {TOKEN}"), "HTTP 403"),
    ],
)
async def test_auth_and_credit_errors_stop_the_run_fast(
    tmp_path: Path,
    scripted: Callable[[dict[str, list[Reply]]], Any],
    reply: Reply,
    needle: str,
) -> None:
    """401/402/403 stop the whole run within a second, exit 3, and never echo the token."""
    ids = make_ids(300)
    server = await scripted({i: [reply] for i in ids})
    path = write_csv(tmp_path / "ids.csv", ids)
    started = time.monotonic()
    result = await harvest(fast_settings(path, tmp_path / "out", base_url(server), rate=100))
    # It stops within a second of the first answer; the bound is loose for a loaded machine,
    # and far below the 300 ids at 100/s (3 s) and their retries a run that went on would take.
    assert time.monotonic() - started < 6
    assert result.summary["requests"] < 300
    assert result.exit_code == ExitCode.REFUSED
    assert result.message is not None
    assert needle in result.message
    assert TOKEN not in result.message
    assert result.summary["requests"] < 50


async def test_no_credit_from_the_simulator_exits_3(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """The simulator's 402 reaches the same abort path as a real out-of-credit account."""
    path = write_csv(tmp_path / "ids.csv", make_ids(20))
    async with sim_factory(profile="instant", token=None) as sim:
        settings = fast_settings(path, tmp_path / "out", sim.base_url, token=NO_CREDIT_TOKEN)
        result = await harvest(settings)
    assert result.exit_code == ExitCode.REFUSED
    assert "402" in (result.message or "")


async def test_invalid_and_duplicate_input_values(tmp_path: Path, sim_factory: SimFactory) -> None:
    """Non-uuids become invalid rows without a request; duplicates (any spelling) count once."""
    ids = make_ids(30)
    values = [
        *ids,
        ids[0].upper(),
        "{" + ids[1] + "}",
        ids[2],
        "not-a-uuid",
        "not-a-uuid",
        "x" * 300,
    ]
    path = write_csv(tmp_path / "ids.csv", values)
    async with sim_factory(profile="instant") as sim:
        result = await harvest(fast_settings(path, tmp_path / "out", sim.base_url))
        served = sim.stats.requests
    s = result.summary
    assert s["unique_ids"] == 32
    assert s["duplicates"] == 4
    assert s["invalid"] == 2
    assert served == 30
    rows = read_rows(tmp_path / "out")
    invalid = rows.filter(pc.equal(rows.column("status"), "invalid")).column("id").to_pylist()
    assert sorted(invalid) == sorted(["not-a-uuid", "x" * 300])


async def test_rerun_resumes_without_requests_or_duplicates(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """A second run on the same DIR requests nothing and adds no row."""
    path = write_csv(tmp_path / "ids.csv", [*make_ids(150), "junk"])
    out = tmp_path / "out"
    async with sim_factory(profile="instant") as sim:
        first = await harvest(fast_settings(path, out, sim.base_url))
        second = await harvest(fast_settings(path, out, sim.base_url))
    assert first.exit_code == second.exit_code == ExitCode.OK
    assert second.summary["already_done"] == 151
    assert second.summary["requests"] == 0
    assert second.summary["files_written"] == 0
    assert read_rows(out).num_rows == 151


async def test_max_wait_leaves_ids_unresolved_and_a_rerun_finishes_them(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """Ids not ready by --max-wait get no row (exit 1); the rerun harvests exactly those."""
    calm = PROFILES["realistic"].without_faults()
    ids = make_ids(40)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    async with sim_factory(profile=calm, time_scale=0.005) as sim:
        first = await harvest(fast_settings(path, out, sim.base_url, max_wait=0.03))
        second = await harvest(fast_settings(path, out, sim.base_url, max_wait=20.0))
    assert first.exit_code == ExitCode.UNRESOLVED
    assert first.summary["unresolved"] > 0
    assert second.exit_code == ExitCode.OK
    assert second.summary["already_done"] == 40 - first.summary["unresolved"]
    column = read_rows(out).column("id").to_pylist()
    assert sorted(column) == sorted(ids)


async def test_hostile_model_values_stay_inside_the_dataset(
    tmp_path: Path, scripted: Callable[[dict[str, list[Reply]]], Any]
) -> None:
    """Server-chosen model names never place a file outside DIR and read back intact."""
    models = ["../../x", "a/b", "..", "a\\b", "nul\x00byte", "é漢", "m" * 300, ""]
    ids = make_ids(len(models))
    server = await scripted({i: [ok(api_document(m))] for i, m in zip(ids, models, strict=True)})
    out = tmp_path / "deep" / "out"
    path = write_csv(tmp_path / "ids.csv", ids)
    result = await harvest(fast_settings(path, out, base_url(server)))
    assert result.exit_code == ExitCode.OK
    files = list(tmp_path.rglob("*.parquet"))
    assert len(files) == len(models) + 1  # and the empty file a fresh DIR starts with
    assert all(out.resolve() in f.resolve().parents for f in files)
    rows = {r["id"]: r for r in read_hive(out).to_pylist()}
    for conversation_id, model in zip(ids, models, strict=True):
        assert rows[conversation_id]["model"] == model
        assert rows[conversation_id]["extra"] is None


@pytest.mark.slow
async def test_chaos_accounts_for_every_id_and_reruns_finish(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """Against the chaos profile every id is accounted for, and reruns reach exit 0."""
    ids = make_ids(1500, seed=3)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    async with sim_factory(profile="chaos", time_scale=0.01) as sim:
        settings = fast_settings(path, out, sim.base_url, max_retries=4, max_wait=5.0)
        first = await harvest(settings)
        s = first.summary
        assert s["completed"] + s["failed"] + s["invalid"] + s["unresolved"] == 1500
        codes = [first.exit_code]
        for _ in range(4):  # bounded: each rerun polls only what is still missing
            if codes[-1] == ExitCode.OK:
                break
            codes.append((await harvest(settings)).exit_code)
    assert codes[-1] == ExitCode.OK
    rows = read_rows(out)
    assert rows.num_rows == 1500
    assert len(set(rows.column("id").to_pylist())) == 1500


async def test_rerun_does_not_poll_ids_the_api_called_invalid(
    tmp_path: Path, scripted: Callable[[dict[str, list[Reply]]], Any]
) -> None:
    """An id the API answered 422 for is done: a rerun neither polls it nor writes it again."""
    ids = make_ids(6)
    script = {i: [text(422, "Character counts must be no more than 255")] for i in ids[:3]}
    script.update({i: [ok(api_document())] for i in ids[3:]})
    server = await scripted(script)
    path = write_csv(tmp_path / "ids.csv", [*ids, "not-a-uuid"])
    out = tmp_path / "out"
    first = await harvest(fast_settings(path, out, base_url(server)))
    second = await harvest(fast_settings(path, out, base_url(server)))
    assert first.summary["invalid"] == 4
    assert second.summary["already_done"] == 7
    assert second.summary["requests"] == 0
    assert read_rows(out).num_rows == 7


async def test_resume_on_a_dataset_built_elsewhere(tmp_path: Path, sim_factory: SimFactory) -> None:
    """A DIR written by another tool in the documented layout is resumed: only new ids polled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harvester.dataset import FILE_SCHEMA, partition_dir

    old = make_ids(3000, seed=40)
    new = make_ids(120, seed=41)
    out = tmp_path / "out"
    for part, model in enumerate(["chatgpt", "gemini", None]):
        chunk = old[part * 1000 : (part + 1) * 1000]
        status = "failed" if model is None else "completed"
        columns = {name: pa.nulls(len(chunk), field.type) for name, field in zip(
            FILE_SCHEMA.names, FILE_SCHEMA, strict=True)}  # fmt: skip
        columns.update(
            id=pa.array(chunk),
            status=pa.array([status] * len(chunk)),
            polls=pa.array([1] * len(chunk), pa.int32()),
            harvested_at=pa.array([0] * len(chunk), pa.timestamp("us", tz="UTC")),
        )
        directory = partition_dir(out, "2026-01-01", model)
        directory.mkdir(parents=True)
        pq.write_table(pa.table(columns, schema=FILE_SCHEMA), directory / f"part-x-{part}.parquet")
    path = write_csv(tmp_path / "ids.csv", [*old, *new])
    async with sim_factory(profile="instant") as sim:
        result = await harvest(fast_settings(path, out, sim.base_url))
        served = sim.stats.requests
    assert result.exit_code == ExitCode.OK
    assert result.summary["already_done"] == 3000
    assert served == 120
    ids = read_rows(out).column("id").to_pylist()
    assert sorted(ids) == sorted([*old, *new])


async def test_long_non_ascii_models_keep_the_dataset_readable(
    tmp_path: Path, scripted: Callable[[dict[str, list[Reply]]], Any]
) -> None:
    """A long emoji or CJK model is stored whole; its folder name is short and readers work."""
    models = ["a" + "😀" * 30, "漢" * 40, "é" * 100]
    ids = make_ids(len(models))
    server = await scripted({i: [ok(api_document(m))] for i, m in zip(ids, models, strict=True)})
    out = tmp_path / "out"
    result = await harvest(
        fast_settings(write_csv(tmp_path / "ids.csv", ids), out, base_url(server))
    )
    assert result.exit_code == ExitCode.OK
    assert read_hive(out).num_rows == 3
    relation = duckdb.sql(
        f"SELECT model FROM read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
    )
    assert relation is not None
    assert sorted(m for (m,) in relation.fetchall()) == sorted(models)
    assert all(len(p.parent.name.encode()) < 100 for p in out.rglob("*.parquet"))


def test_demo_never_deletes_a_directory_it_did_not_make(tmp_path: Path) -> None:
    """harvester demo --out on someone's data refuses (exit 2) and leaves it as it was."""
    from harvester.cli import main

    precious = tmp_path / "completions"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    assert main(["demo", "--ids", "10", "--out", str(precious), "--no-progress"]) == 2
    assert (precious / "keep.txt").read_text() == "mine"
