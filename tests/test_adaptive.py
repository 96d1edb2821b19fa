"""Adaptive throttling against a server whose capacity is below --rate."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import orjson

from harvester.errors import ExitCode
from harvester.runner import harvest
from harvester.sim import PROFILES, Simulator

from .conftest import TOKEN, fast_settings, make_ids, write_csv


async def test_rate_settles_near_the_server_capacity(tmp_path: Path) -> None:
    """With capacity 60/s and --rate 600, the client neither hammers nor stalls (loose bounds)."""
    capacity, rate, count = 60.0, 600.0, 360
    profile = dataclasses.replace(
        PROFILES["instant"], name="capped", capacity_rps=capacity, retry_after_s=(1, 1)
    )
    path = write_csv(tmp_path / "ids.csv", make_ids(count))
    out = tmp_path / "out"
    async with Simulator(token=TOKEN, profile=profile, time_scale=0.2) as sim:
        started = time.monotonic()
        result = await harvest(fast_settings(path, out, sim.base_url, rate=rate))
        elapsed = time.monotonic() - started
    s = result.summary
    assert result.exit_code == ExitCode.OK
    assert s["completed"] + s["failed"] == count
    assert s["throttled"] > 0  # the server did push back
    assert s["throttled"] < 0.5 * s["requests"]  # ... and the client listened
    assert count / elapsed > 0.4 * capacity  # it did not stall either
    [timeline_file] = (out / "_harvester" / "timelines").glob("*.json")
    timeline = orjson.loads(timeline_file.read_bytes())
    assert min(timeline["rate"]) < capacity  # the allowed rate came down below capacity
    assert len(timeline["requests"]) == len(timeline["throttled_429"]) == len(timeline["rate"])
