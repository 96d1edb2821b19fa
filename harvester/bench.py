"""``harvester bench``: an open-model capacity benchmark of the completions endpoint.

Each step sends requests at a constant arrival rate on a fixed schedule of intended send times
(``t0 + i/R``, R the ``paced_rate`` of the offered one), whatever the answers, so a slow server
cannot slow the load down (no coordinated omission). Latency is kept twice, in HDR histograms
(microseconds, 3 significant digits): from the intended send time (what a user arriving on
schedule would see) and from the actual send.

A request waits for one of ``--concurrency`` slots and for the sliding send log (never more than
``floor(R) + 1`` sends in any ``1 + DELIVERY_MARGIN_S`` seconds, see ``SendLog``), but at most
``MAX_LATENESS_S`` past its intended time (1 s, not the end of its step): past that it is
counted ``dropped`` and never sent. 401/402/403 stop the bench (exit 3); 429/503 are measured
as throttled, never retried.

Each step also keeps a per-second series (sent, answered, dropped, statuses, error kinds and
latency p50/p99 of the answers of that second), and with ``--out`` the raw timings go to
``requests.parquet`` in row groups, written in a worker thread as the bench goes: memory stays
bounded however long the bench runs.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
from hdrh.histogram import HdrHistogram
from yarl import URL

from .client import _FATAL_HINTS
from .collector import quiet_collector
from .errors import FatalApiError, InputError, OutputError, UsageError
from .exporter import Snapshot, hist_snapshot, serve_metrics
from .ids import IdReader
from .looplag import LoopLagMonitor
from .metrics import LatencyHistogram
from .session import make_session
from .settings import ENDPOINT_PATH, check_base_url, check_metrics_address, check_token

__all__ = [
    "BenchSettings",
    "Slo",
    "StepResult",
    "parse_ramp",
    "parse_rates",
    "parse_slo",
    "run_bench",
]

MAX_LATENESS_S: Final = 1.0  # a request not sent this long after its intended time is dropped
# How much deliveries may bunch on the way (the client's writes, the network, the server's
# reads) with the server still counting at most floor(R) + 1 in every sliding second: sends
# keep floor(R) + 1 in any 1 + DELIVERY_MARGIN_S seconds. With a margin of 1/R only (a window
# of (floor(R) + 1) / R) the simulator counted 604-616 in its busiest second at 600/s; the
# client's own writes (aiohttp's request-headers-sent trace) stayed within 601, so the
# bunching is the server's reads: 7-27 ms here, and more than 20 ms at 200/s with this 2-core
# machine at a load of 4. 50 ms is the margin `run`'s pacer allows too (pacer.py). It is paid
# for in rate wherever the +1 does not cover it: a step runs its schedule at
# min(R, (floor(R) + 1) / (1 + margin)), so exactly R up to 20/s, 96.2/s at 100, 572.4/s at
# 600, never under R / 1.05; `sent_per_s` reports what was sent.
DELIVERY_MARGIN_S: Final = 0.05
SETTLE_S: Final = 1.0  # pause between steps: the send log empties, the server drains
SUCCESS: Final = frozenset((200, 202, 422))
THROTTLED: Final = frozenset((429, 503))
FATAL: Final = frozenset((401, 402, 403))
PERCENTILES: Final = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
_HIST_MAX_US: Final = 3_600_000_000  # one hour, in microseconds
_MAX_RATE: Final = 100_000.0
_MAX_BISECT: Final = 3

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# -- parsing the command line's values ------------------------------------------------------


def _rate(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number of requests/s") from None
    if not 0 < value <= _MAX_RATE or not math.isfinite(value):
        raise UsageError(f"{what}: rates must be > 0 and <= {_MAX_RATE:.0f} (got {text})")
    return value


def parse_rates(text: str) -> tuple[float, ...]:
    """``"100,200,400"`` -> the offered rates, in the order given; raises ``UsageError``."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts) or not all(parts):
        raise UsageError(
            f"--rates: give rates separated by commas, like 100,200,400 (got {text!r})"
        )
    return tuple(_rate(p, "--rates") for p in parts)


def parse_ramp(text: str) -> tuple[float, ...]:
    """``"FROM:TO:STEP"`` -> FROM, FROM+STEP, ... up to TO (included when reached)."""
    hint = (
        f"--ramp: give FROM:TO:STEP with FROM <= TO and STEP > 0, like 100:500:100 (got {text!r})"
    )
    parts = text.split(":")
    if len(parts) != 3:
        raise UsageError(hint)
    start, stop = _rate(parts[0], "--ramp"), _rate(parts[1], "--ramp")
    step = _rate(parts[2], "--ramp")
    if start > stop:
        raise UsageError(hint)
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise UsageError(f"--ramp: {count} steps is too many; use a larger STEP")
    return tuple(round(start + i * step, 6) for i in range(count))


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)\s*$")


@dataclass(frozen=True, slots=True)
class Slo:
    """A service-level objective: a minimum success ratio and latency bounds (ms) by percentile."""

    success: float | None = None
    bounds_ms: dict[str, float] = field(default_factory=dict)

    def holds(self, step: StepResult) -> bool:
        """True when ``step`` met every bound, from intended send time, with nothing dropped."""
        if step.dropped or step.sent == 0:
            return False
        if self.success is not None and step.success_ratio < self.success:
            return False
        latency = step.latency_ms()
        return all(latency[name] <= bound for name, bound in self.bounds_ms.items())


def parse_slo(text: str) -> Slo:
    """``"success=0.99,p99=500ms"`` (also p50/p90/p999; ms or s) -> a :class:`Slo`."""
    hint = "--slo: give name=value pairs like success=0.99,p99=500ms (p50, p90, p99, p999; ms or s)"
    success: float | None = None
    bounds: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip().lower()
        if not sep or not value.strip():
            raise UsageError(f"{hint} (got {part.strip()!r})")
        if name == "success":
            try:
                success = float(value)
            except ValueError:
                raise UsageError(f"{hint} (success {value!r} is not a number)") from None
            if not 0 < success <= 1:
                raise UsageError(f"--slo: success must be > 0 and <= 1 (got {value})")
        elif name in PERCENTILES:
            match = _DURATION.match(value)
            if match is None:
                raise UsageError(f"{hint} ({name} {value!r} needs a unit: 500ms or 0.5s)")
            amount = float(match[1]) * (1000.0 if match[2] == "s" else 1.0)
            if amount <= 0:
                raise UsageError(f"--slo: {name} must be > 0 (got {value})")
            bounds[name] = amount
        else:
            raise UsageError(f"{hint} (unknown name {name!r})")
    if success is None and not bounds:
        raise UsageError(hint)
    return Slo(success=success, bounds_ms=bounds)


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Everything ``harvester bench`` needs; every value checked in ``__post_init__``."""

    base_url: str
    token: str
    rates: tuple[float, ...]
    ids_path: Path | None = None
    synthetic: int | None = None
    id_column: str = "id"
    step_seconds: float = 5.0
    concurrency: int = 256
    slo: Slo | None = None
    json_output: bool = False
    out_dir: Path | None = None
    request_timeout: float = 10.0
    connect_timeout: float = 5.0
    allow_insecure: bool = False
    metrics_port: int | None = None  # serve Prometheus text at /metrics (0: any free port)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        check_token(self.token)
        require(
            (self.ids_path is None) != (self.synthetic is None),
            "give exactly one of --ids IDS.csv or --synthetic N",
        )
        require(
            self.synthetic is None or self.synthetic >= 1,
            f"--synthetic must be >= 1 (got {self.synthetic})",
        )
        require(bool(self.rates), "give the rates to offer: --rates R1,R2 or --ramp FROM:TO:STEP")
        require(
            all(0 < r <= _MAX_RATE for r in self.rates),
            f"every rate must be > 0 and <= {_MAX_RATE:.0f}",
        )
        require(
            0 < self.step_seconds <= 3600,
            f"--step-seconds must be > 0 and <= 3600 (got {self.step_seconds})",
        )
        require(self.concurrency >= 1, f"--concurrency must be >= 1 (got {self.concurrency})")
        require(self.request_timeout > 0, "--request-timeout must be > 0 seconds")
        check_base_url(self.base_url, allow_insecure=self.allow_insecure)
        check_metrics_address(self.metrics_host, self.metrics_port)

    @property
    def endpoint(self) -> str:
        """Full URL of the completions endpoint."""
        return self.base_url.rstrip("/") + ENDPOINT_PATH


# -- timing logic (pure, on an injected clock) --------------------------------------------------


def paced_rate(offered: float, margin: float = DELIVERY_MARGIN_S) -> float:
    """The rate a step's schedule runs at: ``offered``, or less where ``floor(offered) + 1``
    sends in any ``1 + margin`` seconds cannot carry it (see ``DELIVERY_MARGIN_S``)."""
    return min(offered, (math.floor(offered) + 1) / (1.0 + margin))


class SendLog:
    """The recent send times: at most ``limit = floor(R) + 1`` sends in any sliding window of
    ``1 + margin`` seconds (so in any second at the server, deliveries bunched by up to
    ``margin`` included), and consecutive sends at least ``1 / (4R)`` apart, even when the
    sender catches up after a stall.

    The window is never shorter than ``limit / R``, the most a schedule at R allows: under
    ``1 / margin`` requests/s the +1 alone gives a margin of ``1/R`` or more.
    """

    def __init__(self, margin: float = DELIVERY_MARGIN_S) -> None:
        self._times: deque[float] = deque()
        self._margin = margin
        self.limit = 1
        self.window = 1.0
        self.gap = 0.0

    def set_rate(self, rate: float) -> None:
        """Hold later sends to ``rate``."""
        self.limit = math.floor(rate) + 1
        self.window = max(1.0 + self._margin, self.limit / rate)
        self.gap = 0.25 / rate

    def next_free(self, now: float) -> float:
        """The earliest time, ``now`` or later, a send keeps within the limit and the gap."""
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()
        at = now
        if times:
            at = max(at, times[-1] + self.gap)
        if len(times) >= self.limit:
            at = max(at, times[len(times) - self.limit] + self.window)
        return at

    def record(self, at: float) -> None:
        """Count a send made at ``at``."""
        self._times.append(at)


def intended_times(t0: float, rate: float, seconds: float) -> Iterator[float]:
    """The fixed schedule of one step: ``t0 + i/rate`` for every i with ``i/rate < seconds``."""
    count = max(1, math.ceil(rate * seconds - 1e-9))
    for i in range(count):
        yield t0 + i / rate


class Slots:
    """``--concurrency`` slots; ``acquire`` gives up at a deadline (on the loop's clock)."""

    def __init__(self, count: int) -> None:
        self._sem = asyncio.Semaphore(count)

    async def acquire(self, within: float) -> bool:
        """Take a slot within ``within`` seconds; False when none freed in time."""
        if within <= 0:
            if self._sem.locked():
                return False
            await self._sem.acquire()
            return True
        try:
            await asyncio.wait_for(self._sem.acquire(), within)
        except TimeoutError:
            return False
        return True

    def release(self) -> None:
        """Give a slot back."""
        self._sem.release()


async def dispatch(
    schedule: Iterator[float],
    *,
    clock: Clock,
    sleep: Sleep,
    slots: Slots,
    log: SendLog,
    send: Callable[[float, float], None],
    drop: Callable[[float], None],
    stopped: Callable[[], bool],
    max_lateness: float = MAX_LATENESS_S,
) -> None:
    """Go through ``schedule`` in order: at each intended time wait for a slot and the send log,
    then ``send(intended, sent_at)`` (which must release the slot), or ``drop(intended)`` when
    neither came within ``max_lateness`` of the intended time."""
    for intended in schedule:
        if stopped():
            return
        now = clock()
        if intended > now:
            await sleep(intended - now)
        deadline = intended + max_lateness
        if not await slots.acquire(deadline - clock()):
            drop(intended)
            continue
        at = log.next_free(clock())
        if at > deadline:
            slots.release()
            drop(intended)
            continue
        if at > clock():
            await sleep(at - clock())
        sent_at = clock()
        log.record(sent_at)
        send(intended, sent_at)


# -- one step ---------------------------------------------------------------------------------


def new_histogram() -> Any:
    """An HDR histogram of microseconds, 1 us to an hour, 3 significant digits."""
    return HdrHistogram(1, _HIST_MAX_US, 3)


@dataclass
class StepResult:
    """What one step offered, sent and got back."""

    offered: float
    seconds: float
    sent: int = 0
    answered: int = 0
    dropped: int = 0
    success: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    hist: Any = field(default_factory=new_histogram)
    hist_from_send: Any = field(default_factory=new_histogram)
    bisect: bool = False
    series: Series | None = None  # per-second figures, from the step's start

    @property
    def success_ratio(self) -> float:
        """Share of sent requests that got 200, 202 or 422 (0.0 when none was sent)."""
        return self.success / self.sent if self.sent else 0.0

    @property
    def sent_per_s(self) -> float:
        """Requests sent per second of the step's schedule."""
        return self.sent / self.seconds

    @property
    def answered_per_s(self) -> float:
        """Answers (any HTTP status) per second of the step's schedule."""
        return self.answered / self.seconds

    @property
    def rate_reached(self) -> bool:
        """Nothing dropped and at least 95% of the step's schedule sent (``paced_rate``: the
        offered rate less the delivery margin)."""
        return self.dropped == 0 and self.sent_per_s >= 0.95 * paced_rate(self.offered)

    def latency_ms(self, *, from_send: bool = False) -> dict[str, float]:
        """p50/p90/p99/p999/max in ms, from intended (default) or actual send time."""
        hist = self.hist_from_send if from_send else self.hist
        if hist.get_total_count() == 0:
            return {**dict.fromkeys(PERCENTILES, 0.0), "max": 0.0}
        out = {
            name: round(hist.get_value_at_percentile(pct) / 1000.0, 3)
            for name, pct in PERCENTILES.items()
        }
        out["max"] = round(hist.get_max_value() / 1000.0, 3)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The step as the JSON output names it."""
        return {
            "offered": int(self.offered) if self.offered.is_integer() else self.offered,
            "sent": self.sent,
            "answered": self.answered,
            "dropped": self.dropped,
            "success_ratio": round(self.success_ratio, 6),
            "status": dict(sorted(self.status.items())),
            "errors": dict(sorted(self.errors.items())),
            "latency_ms": self.latency_ms(),
            "latency_ms_from_send": self.latency_ms(from_send=True),
            "sent_per_s": round(self.sent_per_s, 3),
            "answered_per_s": round(self.answered_per_s, 3),
            "rate_reached": self.rate_reached,
            "series": self.series.seconds if self.series is not None else [],
        }


class Series:
    """One step's figures second by second (second ``i`` covers ``[t0 + i, t0 + i + 1)``):
    requests sent, answered and dropped in it, answers by status, errors by kind, and the
    p50/p99 latency (from intended send time, ms) of the answers that came in it.

    Events come in loop-clock order, so only the latest second is open: its latencies are
    kept as a list and reduced to two percentiles when the next second starts.
    """

    def __init__(self, t0: float) -> None:
        self._t0 = t0
        self.seconds: list[dict[str, Any]] = []
        self._latencies: list[float] = []

    def _at(self, now: float) -> dict[str, Any]:
        index = max(0, int(now - self._t0))
        while len(self.seconds) <= index:
            self._close()
            self.seconds.append(
                {"second": len(self.seconds), "sent": 0, "answered": 0, "dropped": 0,
                 "status": {}, "errors": {}, "latency_ms": {"p50": 0.0, "p99": 0.0}}
            )  # fmt: skip
        return self.seconds[index]

    def _close(self) -> None:
        if self.seconds and self._latencies:
            ordered = sorted(self._latencies)
            self.seconds[-1]["latency_ms"] = {
                name: round(ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)], 3)
                for name, q in (("p50", 50.0), ("p99", 99.0))
            }
        self._latencies = []

    def sent(self, now: float) -> None:
        """One request sent at ``now``."""
        self._at(now)["sent"] += 1

    def dropped(self, now: float) -> None:
        """One request dropped at ``now``."""
        self._at(now)["dropped"] += 1

    def answered(self, now: float, status: int, latency_ms: float) -> None:
        """One answer with ``status`` at ``now``, ``latency_ms`` after its intended time."""
        second = self._at(now)
        second["answered"] += 1
        key = str(status)
        second["status"][key] = second["status"].get(key, 0) + 1
        self._latencies.append(latency_ms)

    def failed(self, now: float, kind: str) -> None:
        """One request that got no answer (``kind``: timeout, connect_error, ...) at ``now``."""
        errors = self._at(now)["errors"]
        errors[kind] = errors.get(kind, 0) + 1

    def finish(self) -> None:
        """Reduce the last second's latencies (call once the step's answers are in)."""
        self._close()


# requests.parquet: one row a request (dropped ones too), times in seconds since the bench began.
TIMINGS_SCHEMA: Final = pa.schema(
    [
        ("step", pa.int32()),
        ("offered", pa.float64()),
        ("intended_at", pa.float64()),
        ("sent_at", pa.float64()),
        ("latency_ms", pa.float64()),
        ("latency_ms_from_send", pa.float64()),
        ("status", pa.int32()),
        ("error", pa.string()),
    ]
)
ROW_GROUP_ROWS: Final = 65_536  # rows held before they are written out as one row group


class Timings:
    """The raw per-request records, column-wise, written to ``path`` (requests.parquet) a row
    group at a time in a worker thread, in order; kept nowhere when ``path`` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows = 0
        self._columns: dict[str, list[Any]] = {name: [] for name in TIMINGS_SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None
        self._pending: asyncio.Task[None] | None = None

    def add(
        self,
        step: int,
        offered: float,
        intended: float,
        sent: float | None,
        done: float | None,
        status: int | None,
        error: str | None,
    ) -> None:
        """Append one request (times in seconds since the bench started)."""
        if self.path is None:
            return
        c = self._columns
        c["step"].append(step)
        c["offered"].append(offered)
        c["intended_at"].append(round(intended, 6))
        c["sent_at"].append(None if sent is None else round(sent, 6))
        answered = done is not None and status is not None
        c["latency_ms"].append(
            None if not answered or done is None else round((done - intended) * 1000, 3)
        )
        c["latency_ms_from_send"].append(
            None if not answered or done is None or sent is None else round((done - sent) * 1000, 3)
        )
        c["status"].append(status)
        c["error"].append(error)
        self.rows += 1
        if len(c["step"]) >= ROW_GROUP_ROWS:
            self.spill()

    def spill(self) -> None:
        """Hand the rows held so far to the writer thread (after any earlier group)."""
        if self.path is None or not self._columns["step"]:
            return
        columns = self._columns
        self._columns = {name: [] for name in TIMINGS_SCHEMA.names}
        self._pending = asyncio.create_task(self._write(self._pending, columns))

    async def _write(
        self, before: asyncio.Task[None] | None, columns: dict[str, list[Any]]
    ) -> None:
        if before is not None:
            await before
        await asyncio.to_thread(self._write_group, columns)

    def _write_group(self, columns: dict[str, list[Any]] | None) -> None:
        assert self.path is not None
        try:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.path, TIMINGS_SCHEMA, compression="zstd")
            if columns is not None:
                self._writer.write_table(pa.table(columns, schema=TIMINGS_SCHEMA))
            else:
                self._writer.close()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path} ({exc.strerror or exc})") from exc

    async def close(self) -> None:
        """Write what is held and close the file (a file of no rows if nothing was sent)."""
        if self.path is None:
            return
        self.spill()
        if self._pending is not None:
            await self._pending
        await asyncio.to_thread(self._write_group, None)


def classify_exception(exc: BaseException) -> str:
    """The error kind of a request that got no answer, named as ``run`` names it where the
    two share one: tls_error, connect_timeout, timeout, connect_error, truncated_body,
    disconnected, bad_answer or client_error. Order matters: the TLS and timeout classes
    are subclasses of the connection ones."""
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch | ssl.SSLError):
        return "tls_error"  # a certificate that does not verify, or a failed handshake
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"  # no connection within the connect timeout: a full backlog
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated_body"  # the headers came, the body ended early
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad_answer"  # not a valid HTTP answer
    return "client_error"


class Bench:
    """Runs the steps against one session; keeps results, raw timings and a fatal answer."""

    def __init__(self, settings: BenchSettings, ids: list[str], clock: Clock = time.monotonic):
        self.settings = settings
        self._ids = ids
        self._next_id = 0
        self.clock = clock
        self.started = clock()
        self.steps: list[StepResult] = []
        out = settings.out_dir
        self.timings = Timings(out / "requests.parquet" if out is not None else None)
        self.fatal: FatalApiError | None = None
        self._log = SendLog()
        self._session: aiohttp.ClientSession | None = None
        self._prefix = settings.endpoint + "?id="
        # For /metrics only: every answer's latency from intended time, the loop's lag, what
        # is in flight and the step's rate (the JSON keeps its HDR histograms per step).
        self.latency = LatencyHistogram()
        self.loop_lag = LatencyHistogram()
        self.in_flight = 0
        self.offered_now = 0.0

    def _take_id(self) -> str:
        value = self._ids[self._next_id % len(self._ids)]
        self._next_id += 1
        return value

    async def run_step(self, offered: float, seconds: float, *, bisect: bool = False) -> StepResult:
        """One step at ``offered`` requests/s for ``seconds``; waits for every answer."""
        assert self._session is not None
        index = len(self.steps)
        t0 = self.clock()
        series = Series(t0)
        step = StepResult(offered=offered, seconds=seconds, bisect=bisect, series=series)
        self.steps.append(step)
        slots = Slots(self.settings.concurrency)
        self._log.set_rate(offered)
        self.offered_now = offered
        tasks: set[asyncio.Task[None]] = set()

        def send(intended: float, sent_at: float) -> None:
            step.sent += 1
            self.in_flight += 1
            series.sent(sent_at)
            task = asyncio.create_task(self._request(index, step, slots, intended, sent_at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def drop(intended: float) -> None:
            step.dropped += 1
            series.dropped(self.clock())
            self.timings.add(index, offered, intended - self.started, None, None, None, "dropped")

        try:
            await dispatch(
                intended_times(t0, paced_rate(offered), seconds),
                clock=self.clock,
                sleep=asyncio.sleep,
                slots=slots,
                log=self._log,
                send=send,
                drop=drop,
                stopped=lambda: self.fatal is not None,
            )
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.settings.request_timeout + 5)
        finally:
            self.offered_now = 0.0
            series.finish()
            self.timings.spill()
        if self.fatal is not None:
            raise self.fatal
        return step

    async def _request(
        self, index: int, step: StepResult, slots: Slots, intended: float, sent_at: float
    ) -> None:
        status: int | None = None
        error: str | None = None
        try:
            assert self._session is not None
            url = URL(self._prefix + self._take_id(), encoded=True)
            async with self._session.get(url, allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except Exception as exc:
            error = classify_exception(exc)
        finally:
            slots.release()
            self.in_flight -= 1
        done = self.clock()
        if status is not None:
            step.answered += 1
            key = str(status)
            step.status[key] = step.status.get(key, 0) + 1
            if status in SUCCESS:
                step.success += 1
            late = done - intended
            step.hist.record_value(max(1, round(late * 1e6)))
            step.hist_from_send.record_value(max(1, round((done - sent_at) * 1e6)))
            self.latency.record(late)
            if step.series is not None:
                step.series.answered(done, status, late * 1000.0)
            if status in FATAL and self.fatal is None:
                hint = _FATAL_HINTS.get(status, "")
                self.fatal = FatalApiError(status, f"the API answered {status}: {hint}")
        else:
            assert error is not None
            step.errors[error] = step.errors.get(error, 0) + 1
            if step.series is not None:
                step.series.failed(done, error)
        base = self.started
        self.timings.add(
            index, step.offered, intended - base, sent_at - base, done - base, status, error
        )

    def snapshot(self) -> Snapshot:
        """What /metrics shows of the bench (see exporter.py): requests by status (``error``
        for none), in flight, the step's offered rate, latency from intended time, loop lag."""
        by_status: dict[str, int] = {}
        for step in self.steps:
            for key, count in step.status.items():
                by_status[key] = by_status.get(key, 0) + count
            failed = sum(step.errors.values())
            if failed:
                by_status["error"] = by_status.get("error", 0) + failed
        return {
            "requests": by_status,
            "in_flight": self.in_flight,
            "in_play": self.in_flight,  # each request is its own id
            "allowed_rate": self.offered_now,
            "latency": hist_snapshot(self.latency),
            "loop_lag": hist_snapshot(self.loop_lag),
        }

    async def run(self, on_step: Callable[[StepResult], None]) -> float | None:
        """Every step, then the bisection; returns max_rate_within_slo, the paced rate of the
        fastest step that held (None without --slo, or when none held)."""
        s = self.settings
        metrics = serve_metrics(s.metrics_host, s.metrics_port, self.snapshot, what="bench")
        lag = LoopLagMonitor(self.loop_lag)
        lag.start()
        connections = min(s.concurrency, 4096)
        self._session = make_session(
            s.token,
            limit=connections,
            connect_timeout=s.connect_timeout,
            request_timeout=s.request_timeout,
        )
        try:
            for i, rate in enumerate(s.rates):
                if i:
                    await asyncio.sleep(SETTLE_S)
                on_step(await self.run_step(rate, s.step_seconds))
            if s.slo is None:
                return None
            best = await self._bisect(s.slo, on_step)
            # The rate the server got from that step (its schedule), not the rate asked for:
            # above 20/s the delivery margin makes them differ by up to 5%.
            return None if best is None else round(paced_rate(best), 1)
        finally:
            await self._session.close()
            lag.stop()
            if metrics is not None:
                metrics.close()
            await self.timings.close()

    async def _bisect(self, slo: Slo, on_step: Callable[[StepResult], None]) -> float | None:
        held = [st.offered for st in self.steps if slo.holds(st)]
        if not held:
            return None
        best = max(held)
        failing = [st.offered for st in self.steps if st.offered > best and not slo.holds(st)]
        if not failing:
            return best
        low, high = best, min(failing)
        for _ in range(_MAX_BISECT):
            mid = round((low + high) / 2, 3)
            if high - low < 1 or mid in (low, high):
                break
            await asyncio.sleep(SETTLE_S)
            step = await self.run_step(mid, self.settings.step_seconds / 2, bisect=True)
            on_step(step)
            if slo.holds(step):
                low = mid
            else:
                high = mid
        return low


def load_ids(settings: BenchSettings) -> list[str]:
    """The ids to cycle through: N random uuids, or the valid ids of ``--ids`` in order."""
    if settings.synthetic is not None:
        return [str(uuid.uuid4()) for _ in range(settings.synthetic)]
    assert settings.ids_path is not None
    reader = IdReader(settings.ids_path, id_column=settings.id_column)
    ids: list[str] = []
    try:
        for batch in reader.open():
            ids.extend(i for i, ok in zip(batch.ids, batch.valid, strict=True) if ok)
    finally:
        reader.close()
    if not ids:
        raise InputError(f"{settings.ids_path}: no valid uuid in it; give at least one id")
    return ids


def step_line(step: StepResult, slo: Slo | None) -> str:
    """The live line of one step (stderr)."""
    lat = step.latency_ms()
    held = "" if slo is None else ("  SLO held" if slo.holds(step) else "  SLO failed")
    line = (
        f"bench: {step.offered:g}/s{' (bisect)' if step.bisect else ''}: sent {step.sent} "
        f"({step.sent_per_s:.1f}/s), answered {step.answered}, dropped {step.dropped}, "
        f"success {step.success_ratio:.3f}, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
        f"{held}"
    )
    if not step.rate_reached:
        line += (
            f"\nbench: warning: target rate {step.offered:g}/s not reached "
            f"({step.sent_per_s:.1f}/s sent, {step.dropped} dropped); raise --concurrency "
            "or check the client machine"
        )
    return line


async def run_bench(settings: BenchSettings) -> tuple[list[StepResult], float | None]:
    """Run the whole bench (with ``--out``, requests.parquet is written as it goes); raises
    ``FatalApiError`` on 401/402/403."""
    ids = await asyncio.to_thread(load_ids, settings)
    bench = Bench(settings, ids)

    def on_step(step: StepResult) -> None:
        print(step_line(step, settings.slo), file=sys.stderr, flush=True)

    with quiet_collector():  # a gc walk of the imports would show in the latency tail
        best = await bench.run(on_step)
    return bench.steps, best
