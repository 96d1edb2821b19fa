"""The fault matrix's cases: one harvest per kind of failure, each against a simulator that
fails 40% of requests that way, and what became of every id.

``test_faults.py`` asserts on them that nothing is lost or stored wrong;
``benchmarks/fault_matrix.py`` prints the same rows as a table for the README.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from harvester.dataset import open_dataset
from harvester.model import LIST_FIELDS, TEXT_FIELDS
from harvester.runner import harvest
from harvester.settings import RunSettings
from harvester.sim import PROFILES, Simulator, expected_completion

from .conftest import free_port

TOKEN = "fault-matrix-token"
SEED = 11
FAULT_RATE = 0.4
CONTENT_FIELDS = (*TEXT_FIELDS, *LIST_FIELDS)


@dataclass(frozen=True)
class Case:
    """One row of the matrix: how the simulator misbehaves and how the client should see it."""

    profile: dict[str, Any]
    error_kinds: frozenset[str]
    settings: dict[str, Any] = field(default_factory=dict)
    down_s: float = 0.0  # the server starts listening only this long after the run starts


CASES: dict[str, Case] = {
    "500": Case({"error_500_share": FAULT_RATE}, frozenset({"http_500"})),
    "502": Case({"error_502_share": FAULT_RATE}, frozenset({"http_502"})),
    "503 + Retry-After": Case({"unavailable_503_share": FAULT_RATE}, frozenset({"http_503"})),
    "504": Case({"error_504_share": FAULT_RATE}, frozenset({"http_504"})),
    "429 + Retry-After (seconds)": Case(
        {"throttle_429_share": FAULT_RATE}, frozenset({"http_429"})
    ),
    "429 + Retry-After (HTTP date)": Case(
        {"throttle_429_share": 0.05, "retry_after_http_date": True, "retry_after_s": (1, 1)},
        frozenset({"http_429"}),
    ),
    "dropped before headers": Case({"drop_share": FAULT_RATE}, frozenset({"disconnected"})),
    "dropped after headers": Case(
        {"drop_after_headers_share": FAULT_RATE}, frozenset({"truncated_body", "disconnected"})
    ),
    "read timeout (stall)": Case(
        {"stall_share": 0.2, "stall_s": 200.0}, frozenset({"timeout"}), {"request_timeout": 0.5}
    ),
    "slow-drip body": Case(
        {"slow_drip_share": 0.2, "drip_s": 200.0}, frozenset({"timeout"}), {"request_timeout": 0.5}
    ),
    "truncated JSON": Case({"truncate_share": FAULT_RATE}, frozenset({"bad_json"})),
    "JSON of the wrong shape": Case({"wrong_shape_share": FAULT_RATE}, frozenset({"bad_shape"})),
    "200 text/html": Case({"html_body_share": FAULT_RATE}, frozenset({"not_json"})),
    "body over the size cap": Case(
        {"oversize_share": FAULT_RATE, "oversize_bytes": 256 * 1024},
        frozenset({"too_large"}),
        {"max_body_bytes": 128 * 1024},
    ),
    "unknown status code (404, 418)": Case(
        {"unknown_code_share": FAULT_RATE}, frozenset({"http_404", "http_418"})
    ),
    "202 with an unknown status": Case(
        {"unknown_status_share": FAULT_RATE}, frozenset({"unknown_status"})
    ),
    "connection refused (server down 1 s)": Case(
        {}, frozenset({"connect_error"}), {"max_retries": 20, "backoff_max": 0.2}, down_s=1.0
    ),
}


def case_ids(count: int) -> list[str]:
    """The same ids for every case."""
    return [str(uuid.UUID(int=(SEED << 64) + i, version=4)) for i in range(count)]


async def run_case(name: str, workdir: Path, count: int = 200) -> dict[str, Any]:
    """Harvest ``count`` ids against the faulty simulator; return the matrix row."""
    case = CASES[name]
    profile = dataclasses.replace(PROFILES["instant"], name=name, **case.profile)
    ids = case_ids(count)
    ids_path = workdir / "ids.csv"
    ids_path.write_text("id\n" + "\n".join(ids) + "\n")
    out = workdir / "out"
    port = free_port()
    base = RunSettings(
        ids_path=ids_path, out_dir=out, token=TOKEN, base_url=f"http://127.0.0.1:{port}",
        rate=2000, concurrency=32, poll_interval=0.02, max_poll_interval=0.1, max_wait=60.0,
        max_retries=12, backoff_base=0.01, backoff_max=0.1, flush_interval=0.5, progress=False,
    )  # fmt: skip
    sim = Simulator(token=TOKEN, profile=profile, seed=SEED, time_scale=0.01, port=port)
    run = asyncio.create_task(harvest(dataclasses.replace(base, **case.settings)))
    await asyncio.sleep(case.down_s)  # nothing listens yet: connections are refused
    async with sim:
        result = await run
    return _row(name, result.summary, out, ids, profile)


def _row(
    name: str, summary: dict[str, Any], out: Path, ids: list[str], profile: Any
) -> dict[str, Any]:
    table = open_dataset(out).to_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    wrong = 0
    for conversation_id, row in rows.items():
        expected = expected_completion(conversation_id, seed=SEED, profile=profile)
        if expected is None:
            wrong += row["status"] != "failed"
        else:
            wrong += any(row[f] != expected[f] for f in CONTENT_FIELDS)
    polls = table.column("polls")
    terminal = summary["completed"] + summary["failed"] + summary["invalid"]
    return {
        "fault": name,
        "ids": len(ids),
        "ids_affected": int(pc.sum(pc.greater(polls, 1)).as_py() or 0),
        "errors": summary["errors"],
        "retries": summary["retries"],
        "throttled": summary["throttled"],
        "max_polls_per_id": int(pc.max(polls).as_py() or 0),
        "completed": summary["completed"],
        "failed": summary["failed"],
        "unresolved": summary["unresolved"],
        "rows": len(rows),
        "duplicate_rows": table.num_rows - len(rows),
        "wrong_rows": wrong,
        "rows_lost": terminal - len(rows),
    }
