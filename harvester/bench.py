"""``harvester bench``: an open-model capacity benchmark of the completions endpoint.

Each step sends requests at a constant arrival rate on a fixed schedule of intended send times
(``t0 + i/R``), whatever the answers, so a slow server cannot slow the load down (no coordinated
omission). Latency is kept twice, in HDR histograms (microseconds, 3 significant digits): from
the intended send time (what a user arriving on schedule would see) and from the actual send.

A request waits for one of ``--concurrency`` slots and for the sliding send log (never more than
``floor(R) + 1`` sends in any second, see ``SendLog``), but at most ``MAX_LATENESS_S`` past its
intended time (1 s, not the end of its step): past that it is counted ``dropped`` and never
sent. 401/402/403 stop the bench (exit 3); 429/503 are measured as throttled, never retried.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from hdrh.histogram import HdrHistogram
from yarl import URL

from .client import _FATAL_HINTS, make_session
from .errors import FatalApiError, InputError, UsageError
from .ids import IdReader
from .settings import ENDPOINT_PATH, check_base_url, check_token

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

    @property
    def endpoint(self) -> str:
        """Full URL of the completions endpoint."""
        return self.base_url.rstrip("/") + ENDPOINT_PATH


# -- timing logic (pure, on an injected clock) --------------------------------------------------


class SendLog:
    """The recent send times: at most ``limit = floor(R) + 1`` sends in any sliding window of
    ``limit / R`` seconds (so in any second too), and consecutive sends at least ``1 / (4R)``
    apart, even when the sender catches up after a stall.

    The window is as long as the fixed schedule allows (its sends are exactly ``1/R`` apart):
    ``1/R`` seconds past one second, a margin for deliveries that bunch on the way.
    """

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self.limit = 1
        self.window = 1.0
        self.gap = 0.0

    def set_rate(self, rate: float) -> None:
        """Hold later sends to ``rate``."""
        self.limit = math.floor(rate) + 1
        self.window = self.limit / rate
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
        """Nothing dropped and at least 95% of the offered rate sent."""
        return self.dropped == 0 and self.sent_per_s >= 0.95 * self.offered

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
        }


@dataclass
class Timings:
    """The raw per-request records, column-wise (for requests.parquet)."""

    step: list[int] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)
    intended_at: list[float] = field(default_factory=list)
    sent_at: list[float | None] = field(default_factory=list)
    latency_ms: list[float | None] = field(default_factory=list)
    latency_ms_from_send: list[float | None] = field(default_factory=list)
    status: list[int | None] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)

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
        self.step.append(step)
        self.offered.append(offered)
        self.intended_at.append(round(intended, 6))
        self.sent_at.append(None if sent is None else round(sent, 6))
        answered = done is not None and status is not None
        self.latency_ms.append(
            None if not answered or done is None else round((done - intended) * 1000, 3)
        )
        self.latency_ms_from_send.append(
            None if not answered or done is None or sent is None else round((done - sent) * 1000, 3)
        )
        self.status.append(status)
        self.error.append(error)


def classify_exception(exc: BaseException) -> str:
    """The error kind of a transport failure: timeout, connect_error or disconnected."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "disconnected"
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
        self.timings = Timings()
        self.fatal: FatalApiError | None = None
        self._log = SendLog()
        self._session: aiohttp.ClientSession | None = None
        self._prefix = settings.endpoint + "?id="

    def _take_id(self) -> str:
        value = self._ids[self._next_id % len(self._ids)]
        self._next_id += 1
        return value

    async def run_step(self, offered: float, seconds: float, *, bisect: bool = False) -> StepResult:
        """One step at ``offered`` requests/s for ``seconds``; waits for every answer."""
        assert self._session is not None
        index = len(self.steps)
        step = StepResult(offered=offered, seconds=seconds, bisect=bisect)
        self.steps.append(step)
        slots = Slots(self.settings.concurrency)
        self._log.set_rate(offered)
        tasks: set[asyncio.Task[None]] = set()

        def send(intended: float, sent_at: float) -> None:
            step.sent += 1
            task = asyncio.create_task(self._request(index, step, slots, intended, sent_at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def drop(intended: float) -> None:
            step.dropped += 1
            self.timings.add(index, offered, intended - self.started, None, None, None, "dropped")

        await dispatch(
            intended_times(self.clock(), offered, seconds),
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
        done = self.clock()
        if status is not None:
            step.answered += 1
            key = str(status)
            step.status[key] = step.status.get(key, 0) + 1
            if status in SUCCESS:
                step.success += 1
            step.hist.record_value(max(1, round((done - intended) * 1e6)))
            step.hist_from_send.record_value(max(1, round((done - sent_at) * 1e6)))
            if status in FATAL and self.fatal is None:
                hint = _FATAL_HINTS.get(status, "")
                self.fatal = FatalApiError(status, f"the API answered {status}: {hint}")
        else:
            assert error is not None
            step.errors[error] = step.errors.get(error, 0) + 1
        base = self.started
        self.timings.add(
            index, step.offered, intended - base, sent_at - base, done - base, status, error
        )

    async def run(self, on_step: Callable[[StepResult], None]) -> float | None:
        """Every step, then the bisection; returns max_rate_within_slo (None without --slo)."""
        s = self.settings
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
            return await self._bisect(s.slo, on_step)
        finally:
            await self._session.close()

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


async def run_bench(settings: BenchSettings) -> tuple[list[StepResult], float | None, Timings]:
    """Run the whole bench; raises ``FatalApiError`` on 401/402/403."""
    ids = await asyncio.to_thread(load_ids, settings)
    bench = Bench(settings, ids)

    def on_step(step: StepResult) -> None:
        print(step_line(step, settings.slo), file=sys.stderr, flush=True)

    best = await bench.run(on_step)
    return bench.steps, best, bench.timings
