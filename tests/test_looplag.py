"""The event-loop lag monitor: a blocked loop shows as lag, an idle one does not, and the run
summary (text and JSON, one process and --workers) carries ``loop_lag_ms``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from harvester.looplag import SAMPLE_PERIOD_S, LoopLagMonitor
from harvester.metrics import LatencyHistogram, RunStats
from harvester.report import format_summary
from harvester.settings import RunSettings
from harvester.workers import WorkerPool, child_argv

from .conftest import TOKEN


async def test_a_blocked_loop_shows_as_lag() -> None:
    """A callback that blocks the loop for 0.2 s makes the max lag >= 150 ms."""
    monitor = LoopLagMonitor()
    task = asyncio.create_task(monitor.watch())
    await asyncio.sleep(0.05)
    asyncio.get_running_loop().call_soon(time.sleep, 0.2)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lag = monitor.hist.summary(("p50", "p99", "max"))
    assert lag["max"] >= 150, lag
    assert lag["max"] < 5000, lag  # the stall, not the whole test


async def test_an_idle_loop_has_little_lag_and_samples_at_its_period() -> None:
    """0.3 s of an idle loop: about one sample per period, none late by 100 ms (loose: a
    shared machine), and nothing recorded after cancelling."""
    monitor = LoopLagMonitor()
    task = asyncio.create_task(monitor.watch())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    count = monitor.hist.count
    assert 0.3 / SAMPLE_PERIOD_S / 4 <= count <= 0.3 / SAMPLE_PERIOD_S + 2, count
    assert monitor.hist.max_ms < 100
    await asyncio.sleep(3 * SAMPLE_PERIOD_S)
    assert monitor.hist.count == count  # stopped: the timer chain was cancelled


async def test_stop_before_start_and_twice_is_harmless() -> None:
    """``stop()`` is idempotent, and a monitor can record into a histogram it is given."""
    hist = LatencyHistogram()
    monitor = LoopLagMonitor(hist, period=0.001)
    monitor.stop()
    monitor.start()
    await asyncio.sleep(0.02)
    monitor.stop()
    monitor.stop()
    assert hist.count >= 1
    assert monitor.hist is hist


def test_summary_has_loop_lag_in_json_and_text() -> None:
    """``loop_lag_ms`` holds p50/p99/max; the text summary shows them; other keys stay."""
    stats = RunStats()
    for ms in (1.0, 2.0, 3.0, 250.0):
        stats.loop_lag.record(ms / 1000)
    summary = stats.summary(1.0, out="x")
    assert set(summary["loop_lag_ms"]) == {"p50", "p99", "max"}
    assert summary["loop_lag_ms"]["max"] == 250.0
    assert summary["loop_lag_ms"]["p50"] == pytest.approx(2.0, rel=0.02)
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert "event-loop lag ms p50 2.0" in format_summary(summary)
    # A summary saved before this key existed still prints.
    del summary["loop_lag_ms"]
    assert "event-loop lag ms p50 0.0" in format_summary(summary)


def test_workers_summary_gives_the_worst_workers_lag(tmp_path: Path) -> None:
    """--workers: the merged summary's loop_lag_ms is each figure's worst over the workers
    (every worker has its own loop; an average would hide the one that stalled)."""
    settings = RunSettings(ids_path=tmp_path / "ids.csv", out_dir=tmp_path / "out", token=TOKEN)
    pool = WorkerPool([], settings, 2)
    base = RunStats().summary(1.0, run_id="r", out="o")
    pool._finals = [
        {**base, "loop_lag_ms": {"p50": 0.5, "p99": 40.0, "max": 60.0}},
        {**base, "loop_lag_ms": {"p50": 0.7, "p99": 9.0, "max": 310.0}},
    ]
    result = pool._merge([0, 0], 1.0)
    assert result.summary["loop_lag_ms"] == {"p50": 0.7, "p99": 40.0, "max": 310.0}
    assert child_argv(
        ["run", "--metrics-port", "9464", "--metrics-host=0.0.0.0", "--workers", "2", "--rate",
         "5"], settings.shard, settings, 2,
    )[:3] == ["run", "--rate", "5"]  # fmt: skip
