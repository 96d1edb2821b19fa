"""``--metrics-port``: Prometheus text at ``/metrics`` while a run or a bench goes on.

Nothing is counted twice and nothing on the hot path changes: a custom collector turns a
*snapshot* of the figures the run already keeps (``RunStats``, the pacer's rate and pauses,
the scheduler's ids in play) into metric families at scrape time, in a private registry per
run. The snapshot is a plain JSON-ready dict, so a ``--workers`` child sends the same one in
its counter lines and the parent serves the merged figures on one endpoint.

The server is prometheus_client's own (``start_http_server``: a daemon thread per scrape, on
its own socket), not a handler on the harvest's loop: a slow or stuck scraper then holds only
its thread. The snapshot itself is taken *on* the loop (``call_soon_threadsafe``), between two
callbacks, so it never sees a request counted in one field and not yet in another (which could
make a counter step back); a loop blocked past ``SNAPSHOT_WAIT_S`` is read from the scrape's
thread instead. ``close()`` shuts the server and frees the port before the run returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from .errors import UsageError
from .metrics import LatencyHistogram, RunStats

if TYPE_CHECKING:  # prometheus_client is imported only to serve (~90 ms a process otherwise)
    from prometheus_client.core import HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector

__all__ = [
    "LAG_BOUNDS_S",
    "LATENCY_BOUNDS_S",
    "MetricsServer",
    "collector",
    "merge_snapshots",
    "run_snapshot",
    "serve_metrics",
]

log = logging.getLogger("harvester")

SNAPSHOT_WAIT_S: Final = 1.0
# Histogram bucket bounds (seconds). Requests: 5 ms to a minute (the default timeout);
# loop lag: 1 ms to a second, around issue 10's targets (p99 10 ms, max 50 ms).
LATENCY_BOUNDS_S: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
LAG_BOUNDS_S: Final = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

Snapshot = dict[str, Any]
_SUMMED_GAUGES: Final = ("in_flight", "in_play", "allowed_rate")


class _Pacer(Protocol):
    @property
    def rate(self) -> float: ...

    def paused_seconds(self) -> float: ...


class _Scheduler(Protocol):
    @property
    def in_play(self) -> int: ...


def hist_snapshot(hist: LatencyHistogram) -> dict[str, Any]:
    """A histogram as JSON (its exact buckets), mergeable across processes."""
    return {"buckets": hist.buckets(), "max_ms": hist.max_ms, "sum_ms": hist.sum_ms}


def _hist_of(data: Mapping[str, Any]) -> LatencyHistogram:
    hist = LatencyHistogram()
    hist.merge(data.get("buckets", {}), data.get("max_ms", 0.0), data.get("sum_ms", 0.0))
    return hist


def run_snapshot(stats: RunStats, pacer: _Pacer, scheduler: _Scheduler) -> Snapshot:
    """What ``/metrics`` shows of one run, read from what the run keeps anyway.

    ``requests`` by status: the HTTP code of an error answer, ``ok`` for an answer the run
    used (200, 202, 422), ``error`` for none usable (transport or body errors: see
    ``retries``). ``retries`` by the error kind that caused them: every error but those that
    used up ``--max-retries`` (http_429/http_503 waited out, the others backed off)."""
    errors = stats.errors
    by_status: dict[str, int] = {}
    failed = 0
    for label, count in errors.items():
        failed += count
        key = label[5:] if label.startswith("http_") else "error"
        by_status[key] = by_status.get(key, 0) + count
    by_status["ok"] = stats.requests - stats.in_flight - failed
    reasons = stats.unresolved_reasons
    return {
        "requests": by_status,
        "ids": {
            "completed": stats.completed,
            "failed": stats.failed,
            "invalid": stats.invalid,
            "unresolved": stats.unresolved,
            "already_done": stats.already_done,
        },
        "retries": {k: n - reasons.get(f"retries:{k}", 0) for k, n in errors.items()},
        "in_flight": stats.in_flight,
        "in_play": scheduler.in_play,
        "allowed_rate": pacer.rate,
        "paused_s": pacer.paused_seconds(),
        "latency": hist_snapshot(stats.latency),
        "loop_lag": hist_snapshot(stats.loop_lag),
    }


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The whole run's figures from its workers': counters, ids in flight and in play, and
    the rate summed; histograms merged exactly; paused seconds the longest (each worker paces
    and pauses on its own, as the merged summary counts it)."""
    merged: Snapshot = {"requests": {}, "ids": {}, "retries": {}, "paused_s": 0.0}
    merged.update(dict.fromkeys(_SUMMED_GAUGES, 0))
    latency, lag = LatencyHistogram(), LatencyHistogram()
    for snap in snapshots:
        if not snap:
            continue
        for family in ("requests", "ids", "retries"):
            into = merged[family]
            for key, value in snap.get(family, {}).items():
                into[key] = into.get(key, 0) + value
        for name in _SUMMED_GAUGES:
            merged[name] += snap.get(name, 0)
        merged["paused_s"] = max(merged["paused_s"], snap.get("paused_s", 0.0))
        for hist, name in ((latency, "latency"), (lag, "loop_lag")):
            part = snap.get(name, {})
            hist.merge(part.get("buckets", {}), part.get("max_ms", 0.0), part.get("sum_ms", 0.0))
    merged["latency"] = hist_snapshot(latency)
    merged["loop_lag"] = hist_snapshot(lag)
    return merged


def _histogram(
    name: str, doc: str, data: Mapping[str, Any], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily

    hist = _hist_of(data)
    counts = hist.cumulative([b * 1000.0 for b in bounds])
    buckets = [(f"{b:g}", float(c)) for b, c in zip(bounds, counts, strict=True)]
    buckets.append(("+Inf", float(hist.count)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum_ms / 1000.0)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot (an empty one gives every family, zeroed)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labelled = (
        ("harvester_requests", "Requests answered or failed, by HTTP status "
         "(ok: an answer used; error: none usable).", "status", "requests"),
        ("harvester_ids", "Ids with an outcome this run, by outcome.", "outcome", "ids"),
        ("harvester_retries", "Requests retried, by the error that caused it.", "kind",
         "retries"),
    )  # fmt: skip
    for name, doc, label, key in labelled:
        counter = CounterMetricFamily(name, doc, labels=[label])
        for value, count in sorted(snap.get(key, {}).items()):
            counter.add_metric([value], count)
        yield counter
    yield GaugeMetricFamily(
        "harvester_in_flight", "Requests in flight now.", value=snap.get("in_flight", 0)
    )
    yield GaugeMetricFamily(
        "harvester_in_play",
        "Ids in play now (polled or waiting to be polled again).",
        value=snap.get("in_play", 0),
    )
    yield GaugeMetricFamily(
        "harvester_allowed_rate",
        "Requests per second the pacer allows now (the bench: the step's offered rate).",
        value=snap.get("allowed_rate", 0.0),
    )
    yield CounterMetricFamily(
        "harvester_paused_seconds",
        "Seconds every request was held by a client-wide pause.",
        value=snap.get("paused_s", 0.0),
    )
    yield _histogram(
        "harvester_request_seconds",
        "Request latency (the bench: from the intended send time).",
        snap.get("latency", {}),
        LATENCY_BOUNDS_S,
    )
    # A histogram, not a gauge of the latest lag: a gauge read every 15 s would miss a
    # 200 ms stall between two scrapes; buckets keep it, and histogram_quantile gives the
    # p99 over any window.
    yield _histogram(
        "harvester_event_loop_lag_seconds",
        "How late a loop timer fired (sampled every 10 ms).",
        snap.get("loop_lag", {}),
        LAG_BOUNDS_S,
    )


def collector(take: Callable[[], Snapshot]) -> Collector:
    """A prometheus_client collector over ``take()``, called at every scrape."""
    from prometheus_client.registry import Collector

    class SnapshotCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            """The families of a fresh snapshot."""
            yield from families(take())

    return SnapshotCollector()


def on_loop(
    take: Callable[[], Snapshot], loop: asyncio.AbstractEventLoop
) -> Callable[[], Snapshot]:
    """``take`` run on ``loop`` between callbacks when called from another thread (see the
    module docstring), or directly when the loop is blocked or gone."""

    loop_thread = threading.get_ident()  # called on the loop's own thread

    def snapshot() -> Snapshot:
        if loop.is_closed() or threading.get_ident() == loop_thread:
            return take()
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(take())
                except Exception as exc:  # pragma: no cover - take() reads counters
                    future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            return future.result(SNAPSHOT_WAIT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):
            future.cancel()
            return take()

    return snapshot


class MetricsServer:
    """``/metrics`` on ``host:port`` in a thread, over a private registry."""

    def __init__(self, host: str, port: int, take: Callable[[], Snapshot]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector(take))
        self._httpd, self._thread = start_http_server(port, host, registry=self.registry)
        self.port: int = self._httpd.server_port
        self.host = host

    def render(self) -> str:
        """The text a scrape would get now."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop serving and free the port (waits for the serving thread to end)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(
    host: str, port: int | None, take: Callable[[], Snapshot], what: str = "run"
) -> MetricsServer | None:
    """Start the endpoint when ``port`` is set (0: any free port); log where it listens."""
    if port is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        server = MetricsServer(host, port, on_loop(take, loop))
    except OSError as exc:
        raise UsageError(
            f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror}); "
            "pick another port, or 0 for any free one"
        ) from exc
    log.info("metrics of this %s at http://%s:%d/metrics", what, host, server.port)
    return server
