"""``--metrics-port``: Prometheus text scraped over HTTP during real runs and benches against
the simulator (in its own process): names, labels, counters that never step back, figures
that equal the JSON summary at the end, and a port that is free again once the run is over."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester.bench import Bench, BenchSettings, paced_rate
from harvester.errors import UsageError
from harvester.exporter import MetricsServer, merge_snapshots, serve_metrics
from harvester.metrics import LatencyHistogram
from harvester.runner import Run
from harvester.settings import RunSettings

from .conftest import TOKEN, fast_settings, free_port, launch_simulator, make_ids, write_csv
from .readme_blocks import code_blocks, run_sh, section

FAMILIES = {
    "harvester_requests": "counter",
    "harvester_ids": "counter",
    "harvester_retries": "counter",
    "harvester_in_flight": "gauge",
    "harvester_in_play": "gauge",
    "harvester_allowed_rate": "gauge",
    "harvester_paused_seconds": "counter",
    "harvester_request_seconds": "histogram",
    "harvester_event_loop_lag_seconds": "histogram",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) of a scrape."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text: str = answer.read().decode()
    return text


class Scraper(threading.Thread):
    """Scrapes every 0.2 s, once ``port()`` is known, until stopped (at most 120 s)."""

    def __init__(self, port: Callable[[], int | None]) -> None:
        super().__init__(daemon=True)
        self._port = port
        self.texts: list[str] = []
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            port = self._port()
            if port is not None:
                try:
                    self.texts.append(scrape(port))
                except (urllib.error.URLError, ConnectionError) as exc:
                    self.failures.append(repr(exc))  # before it listens, or once it closed
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def assert_monotonic(texts: list[str]) -> None:
    """Every counter sample (and histogram bucket/count/sum) never decreases between scrapes."""
    previous: Samples = {}
    for text in texts:
        types, samples = parse(text)
        assert set(FAMILIES) <= set(types), set(FAMILIES) - set(types)
        for (name, labels), value in samples.items():
            counter_like = name.endswith(("_total", "_bucket", "_count", "_sum"))
            if counter_like and (name, labels) in previous:
                assert value >= previous[(name, labels)], (name, labels)
        previous = samples


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port``: a new server can (with SO_REUSEADDR, as servers do, since
    the scrapes' closed connections leave it in TIME_WAIT) and a connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- a run ------------------------------------------------------------------------------------


async def test_scraped_during_a_run_and_equal_to_its_summary_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """3000 ids at --rate 800 (~4 s) with --metrics-port 0: the chosen port is logged; scrapes
    during the run have every family, live figures and counters that never step back; at the
    end the endpoint's figures equal the JSON summary, and the port is free again."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(3000))
    with launch_simulator(tmp_path, "--profile", "instant", "--latency", "0.005") as url:
        settings = replace(fast_settings(ids, tmp_path / "out", url), rate=800, metrics_port=0)
        run = Run(settings, None)
        scraper = Scraper(lambda: run.metrics.port if run.metrics is not None else None)
        scraper.start()
        with caplog.at_level(logging.INFO, logger="harvester"):
            result = await run.execute()
        scraper.stop()
    assert result.exit_code == 0, result
    summary = result.summary
    assert run.metrics is not None
    port = run.metrics.port
    assert port > 0
    assert f"http://127.0.0.1:{port}/metrics" in caplog.text
    live = [t for t in scraper.texts if total(parse(t)[1], "harvester_requests_total") > 0]
    assert len(live) >= 3, (len(scraper.texts), scraper.failures[:3])
    assert_monotonic(scraper.texts)
    types, samples = parse(live[len(live) // 2])
    assert {name: types[name] for name in FAMILIES} == FAMILIES
    assert total(samples, "harvester_allowed_rate") == pytest.approx(800, rel=0.5)
    assert total(samples, "harvester_in_play") >= 1
    assert 0 < total(samples, "harvester_requests_total") < summary["requests"]
    # After the run: what the endpoint last showed is the summary (``render`` is a scrape).
    _, final = parse(run.metrics.render())
    assert total(final, "harvester_requests_total") == summary["requests"] == 3000
    assert total(final, "harvester_requests_total", status="ok") == 3000
    for outcome in ("completed", "failed", "invalid", "unresolved", "already_done"):
        assert total(final, "harvester_ids_total", outcome=outcome) == summary[outcome]
    assert total(final, "harvester_retries_total") == summary["retries"] == 0
    assert total(final, "harvester_in_flight") == 0
    assert total(final, "harvester_paused_seconds_total") == pytest.approx(
        summary["paused_s"], abs=0.05
    )
    assert total(final, "harvester_request_seconds_count") == summary["requests"]
    assert total(final, "harvester_request_seconds_bucket", le="+Inf") == summary["requests"]
    assert total(final, "harvester_request_seconds_bucket", le="60") == summary["requests"]
    lag_count = total(final, "harvester_event_loop_lag_seconds_count")
    assert lag_count >= 100  # one sample every 10 ms for ~4 s
    assert summary["loop_lag_ms"]["max"] >= summary["loop_lag_ms"]["p99"] > 0
    assert port_is_free(port)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


async def test_errors_and_retries_by_kind_add_up_to_the_summary(tmp_path: Path) -> None:
    """Against the chaos profile: requests by status and retries by kind are what the
    summary's errors and retries say."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(300))
    with launch_simulator(tmp_path, "--profile", "chaos", "--time-scale", "0.01") as url:
        settings = replace(
            fast_settings(ids, tmp_path / "out", url), metrics_port=free_port(), max_retries=3
        )
        run = Run(settings, None)
        result = await run.execute()
    summary = result.summary
    assert run.metrics is not None
    _, final = parse(run.metrics.render())
    errors = summary["errors"]
    assert errors, summary  # the chaos profile fails ~30% of requests
    assert total(final, "harvester_requests_total") == summary["requests"]
    for label, count in errors.items():
        if label.startswith("http_"):
            assert total(final, "harvester_requests_total", status=label[5:]) == count
    given_up = {
        reason.partition(":")[2]: n
        for reason, n in summary["unresolved_reasons"].items()
        if reason.startswith("retries:")
    }
    for label, count in errors.items():
        assert total(final, "harvester_retries_total", kind=label) == count - given_up.get(label, 0)
    throttles = ("http_429", "http_503")
    backed_off = sum(
        total(final, "harvester_retries_total", kind=k) for k in errors if k not in throttles
    )
    assert backed_off == summary["retries"]


async def test_a_busy_port_is_a_usage_error(tmp_path: Path) -> None:
    """A port another socket holds: exit 2's error naming the port, no task left behind."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UsageError, match=f"--metrics-port: cannot listen on 127.0.0.1:{port}"):
            serve_metrics("127.0.0.1", port, dict)
    assert serve_metrics("127.0.0.1", None, dict) is None


async def test_served_figures_of_an_empty_snapshot() -> None:
    """Before any worker has reported, every family is there with zeros."""
    server = serve_metrics("127.0.0.1", 0, dict)
    assert isinstance(server, MetricsServer)
    try:
        text = await asyncio.to_thread(scrape, server.port)
    finally:
        server.close()
    types, samples = parse(text)
    assert {name: types[name] for name in FAMILIES} == FAMILIES
    assert total(samples, "harvester_request_seconds_count") == 0
    assert port_is_free(server.port)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics_port": -1}, "--metrics-port must be 0-65535"),
        ({"metrics_port": 65536}, "--metrics-port must be 0-65535"),
        ({"metrics_port": 9100, "metrics_host": " "}, "--metrics-host must not be empty"),
    ],
)
def test_settings_refuse_a_bad_address(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    """Port outside 0-65535 or an empty host: refused when the settings are made."""
    with pytest.raises(UsageError, match=message):
        RunSettings(ids_path=tmp_path / "i.csv", out_dir=tmp_path / "o", token=TOKEN, **changes)
    with pytest.raises(UsageError, match=message):
        BenchSettings(base_url="http://127.0.0.1:9", token=TOKEN, rates=(1.0,), synthetic=1,
                      **changes)  # fmt: skip


def test_merged_snapshots_sum_counters_and_keep_the_longest_pause() -> None:
    """Workers' figures: counters and gauges summed, histograms merged, pause the longest."""
    a, b = LatencyHistogram(), LatencyHistogram()
    for s in (0.01, 0.02):
        a.record(s)
    b.record(0.5)

    def snap(hist: LatencyHistogram, paused: float, ok: int) -> dict[str, Any]:
        data = {"buckets": hist.buckets(), "max_ms": hist.max_ms, "sum_ms": hist.sum_ms}
        return {
            "requests": {"ok": ok, "500": 1}, "ids": {"completed": ok}, "retries": {"http_500": 1},
            "in_flight": 2, "in_play": 5, "allowed_rate": 50.0, "paused_s": paused,
            "latency": data, "loop_lag": data,
        }  # fmt: skip

    merged = merge_snapshots([snap(a, 1.5, 10), {}, snap(b, 0.5, 7)])
    assert merged["requests"] == {"ok": 17, "500": 2}
    assert merged["ids"] == {"completed": 17}
    assert merged["retries"] == {"http_500": 2}
    assert (merged["in_flight"], merged["in_play"], merged["allowed_rate"]) == (4, 10, 100.0)
    assert merged["paused_s"] == 1.5
    assert sum(merged["latency"]["buckets"].values()) == 3
    assert merged["latency"]["max_ms"] == pytest.approx(500.0)
    assert merged["latency"]["sum_ms"] == pytest.approx(530.0)


# -- a bench ----------------------------------------------------------------------------------


async def test_scraped_during_a_bench_and_equal_to_its_steps_after(tmp_path: Path) -> None:
    """Two 2 s steps (40/s, 120/s): scrapes show the step's offered rate and growing counts;
    at the end requests by status are the steps' sums; the port is free after."""
    port = free_port()
    with launch_simulator(tmp_path, "--profile", "instant", "--latency", "0.02") as url:
        settings = BenchSettings(
            base_url=url, token=TOKEN, rates=(40.0, 120.0), synthetic=50, step_seconds=2.0,
            metrics_port=port,
        )  # fmt: skip
        bench = Bench(settings, make_ids(50))
        scraper = Scraper(lambda: port)
        scraper.start()
        await bench.run(lambda step: None)
        scraper.stop()
    live = [parse(t)[1] for t in scraper.texts]
    assert len(live) >= 5, scraper.failures[:3]
    assert_monotonic(scraper.texts)
    rates = {total(s, "harvester_allowed_rate") for s in live}
    assert {40.0, 120.0} <= rates, rates
    final = parse("".join(_render(bench)))[1]
    sent = sum(step.sent for step in bench.steps)
    assert sent == math.ceil(paced_rate(40) * 2) + math.ceil(paced_rate(120) * 2)
    assert total(final, "harvester_requests_total") == sent
    assert total(final, "harvester_requests_total", status="200") == sum(
        step.status.get("200", 0) for step in bench.steps
    )
    assert total(final, "harvester_request_seconds_count") == sent
    assert total(final, "harvester_event_loop_lag_seconds_count") > 100
    assert total(final, "harvester_in_flight") == 0
    assert port_is_free(port)


def _render(bench: Bench) -> list[str]:
    """The endpoint's text for ``bench`` now (what a scrape gets), without a server."""
    from prometheus_client import CollectorRegistry, generate_latest

    from harvester.exporter import collector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(bench.snapshot))
    return [generate_latest(registry).decode()]


# -- --workers N: one endpoint, served by the parent -----------------------------------------------


def test_workers_share_one_endpoint_served_by_the_parent(tmp_path: Path) -> None:
    """``run --workers 2 --metrics-port P``: the children do not bind it (they would fail:
    the parent holds it), scrapes show both workers' requests summed, and the summary
    gives the worst worker's loop lag; the port is free once the command has exited."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(2000))
    port = free_port()
    with launch_simulator(tmp_path, "--profile", "instant", "--latency", "0.005") as url:
        env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
        proc = subprocess.Popen(
            [sys.executable, "-m", "harvester", "run", "--ids", str(ids),
             "--out", str(tmp_path / "out"), "--base-url", url, "--rate", "600",
             "--workers", "2", "--metrics-port", str(port), "--json", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        scraper = Scraper(lambda: port)
        scraper.start()
        out, err = proc.communicate(timeout=100)
        scraper.stop()
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    live = [parse(t)[1] for t in scraper.texts]
    counted = [total(s, "harvester_requests_total") for s in live]
    assert any(0 < n < summary["requests"] for n in counted), counted
    assert_monotonic(scraper.texts)
    # Both workers' figures are in one scrape: each has half the rate.
    assert max(total(s, "harvester_allowed_rate") for s in live) == pytest.approx(600, rel=0.3)
    assert max(counted) <= summary["requests"] == 2000
    assert set(summary["loop_lag_ms"]) == {"p50", "p99", "max"}
    assert summary["loop_lag_ms"]["max"] > 0
    assert port_is_free(port)


# -- the README -----------------------------------------------------------------------------------


def test_the_readme_metrics_block_runs_as_written(tmp_path: Path) -> None:
    """The README's Metrics block against ``harvester serve`` (free ports for 8412 and
    9464): exit 0, a scrape with the families it greps for, and the run's JSON summary."""
    [block] = code_blocks(section("### Metrics"))
    command = block.replace("8412", str(free_port())).replace("9464", str(free_port()))
    done = run_sh(command, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    _, samples = parse(done.stdout)
    assert total(samples, "harvester_requests_total", status="ok") > 0, done.stdout
    assert total(samples, "harvester_allowed_rate") > 0
    assert total(samples, "harvester_event_loop_lag_seconds_count") > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert summary["requests"] >= total(samples, "harvester_requests_total")


def test_workers_with_a_busy_port_exit_2_before_starting_any(tmp_path: Path) -> None:
    """``--workers 2`` on a port another socket holds: exit 2, one line naming the port, and
    no worker started (nothing written in DIR)."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(10))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "harvester", "run", "--ids", str(ids),
             "--out", str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9",
             "--workers", "2", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "MASSIVE_API_TOKEN": TOKEN},
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"harvester: error: --metrics-port: cannot listen on 127.0.0.1:{port} (Address already "
        "in use); pick another port, or 0 for any free one"
    ]
    assert not (tmp_path / "out").exists()
