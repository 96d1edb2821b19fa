"""The server goes away and comes back; ten thousand requests in flight at once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harvester.errors import ExitCode
from harvester.runner import harvest
from harvester.sim import PROFILES, Simulator

from .conftest import (
    TOKEN,
    fast_settings,
    free_port,
    launch_simulator,
    make_ids,
    read_rows,
    write_csv,
)


async def test_run_survives_a_server_restart(tmp_path: Path) -> None:
    """The server is gone for a while mid-run (refused connections), comes back; all ids done."""
    calm = PROFILES["realistic"].without_faults()
    ids = make_ids(300)
    path = write_csv(tmp_path / "ids.csv", ids)
    port = free_port()
    kwargs = {"token": TOKEN, "profile": calm, "seed": 4, "time_scale": 0.02, "port": port}
    settings = fast_settings(
        path, tmp_path / "out", f"http://127.0.0.1:{port}", max_retries=30, backoff_max=0.3
    )
    first = Simulator(**kwargs)  # type: ignore[arg-type]
    await first.__aenter__()
    run = asyncio.create_task(harvest(settings))
    await asyncio.sleep(0.6)
    served_before = first.stats.requests
    await first.__aexit__(None, None, None)  # 30 s of outage at this time scale: 1.5 s
    await asyncio.sleep(1.5)
    async with Simulator(**kwargs) as second:  # type: ignore[arg-type]
        result = await asyncio.wait_for(run, 60)
        served_after = second.stats.requests
    s = result.summary
    assert served_before > 0
    assert served_after > 0
    assert result.exit_code == ExitCode.OK
    assert s["completed"] + s["failed"] == len(ids)
    assert s["errors"].get("connect_error", 0) > 0  # the outage was seen...
    assert sorted(read_rows(tmp_path / "out").column("id").to_pylist()) == sorted(ids)


def server_stats(url: str) -> dict[str, int]:
    """What the simulator served."""
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as resp:
        return dict(json.load(resp))


@pytest.mark.slow
async def test_ten_thousand_requests_in_flight(tmp_path: Path) -> None:
    """10,000 concurrent requests to a slow server complete with every id accounted for."""
    count = 10_000
    ids = make_ids(count, seed=9)
    path = write_csv(tmp_path / "ids.csv", ids)
    # 5 s per answer: long enough that all 10k connections are open before the first
    # answers, even on a loaded machine, so the peak really is thousands.
    with launch_simulator(tmp_path, "--profile", "instant", "--latency", "5") as url:
        settings = fast_settings(
            path, tmp_path / "out", url, concurrency=count, max_in_play=count, rate=50_000,
            request_timeout=60.0,
        )  # fmt: skip
        result = await harvest(settings)
        server = await asyncio.to_thread(server_stats, url)
    s = result.summary
    assert result.exit_code == ExitCode.OK
    assert s["completed"] + s["failed"] == count
    assert s["requests"] == count
    assert server["peak_in_flight"] > count // 2  # loose: thousands really were in flight
    assert read_rows(tmp_path / "out").num_rows == count
    print(f"10k in flight: {s['elapsed_s']} s, peak RSS {s['peak_rss_mb']} MiB, "
          f"server peak in flight {server['peak_in_flight']}")  # fmt: skip


def test_sigterm_during_a_long_retry_after_pause_stops_at_once(tmp_path: Path) -> None:
    """Workers waiting out a 120 s Retry-After stop on SIGTERM now, not after the 10 s grace."""
    import dataclasses
    import signal

    from .conftest import ThreadedSimulator

    profile = dataclasses.replace(
        PROFILES["instant"], name="throttling", throttle_429_share=0.9, retry_after_s=(120, 120)
    )
    path = write_csv(tmp_path / "ids.csv", make_ids(50))
    with ThreadedSimulator(profile=profile) as sim:
        env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
        out_dir = str(tmp_path / "out")
        cmd = [sys.executable, "-m", "harvester", "run", "--ids", str(path), "--out", out_dir,
               "--base-url", sim.base_url, "--no-progress", "--json"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while sim.stats()["by_status"].get("429", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the client is paused by a 429
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
    assert proc.returncode == 130
    assert took < 8  # not the 10 s grace, let alone the 120 s wait (loose: a loaded machine)
    assert json.loads(out)["exit_code"] == 130
