"""Run counters and a constant-memory latency histogram, and the summary built from them."""

from __future__ import annotations

import math
import resource
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Kind
from .throttle import Answer

# Why an id was left unresolved: "<reason>:<its last answer>" (``retrieving`` or an error
# label), or just STOPPED for ids in play or unread when a run stopped early.
MAX_WAIT_REACHED = "max_wait"
RETRIES_USED_UP = "retries"
STOPPED = "stopped"

LOOP_LAG_KEYS = ("p50", "p99", "max")  # the summary's ``loop_lag_ms``

_MIN_MS = 0.01
_GROWTH = math.log(1.01)  # 1% wide buckets: percentiles within 1% whatever the range
_BUCKETS = 2200  # 0.01 ms * 1.01**2200 is past 10 minutes


class LatencyHistogram:
    """Log-bucketed request latencies; memory stays the same however many are recorded."""

    __slots__ = ("_counts", "count", "max_ms", "sum_ms")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.max_ms = 0.0
        self.sum_ms = 0.0  # for a Prometheus histogram's _sum

    def record(self, seconds: float) -> None:
        """Add one latency."""
        ms = seconds * 1000.0
        index = int(math.log(ms / _MIN_MS) / _GROWTH) if ms > _MIN_MS else 0
        self._counts[min(index, _BUCKETS - 1)] += 1
        self.count += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in milliseconds, at the top of its bucket."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return min(_MIN_MS * math.exp(_GROWTH * (index + 1)), self.max_ms)
        return self.max_ms

    def buckets(self) -> dict[str, int]:
        """The non-empty buckets, for merging histograms across processes."""
        return {str(i): n for i, n in enumerate(self._counts) if n}

    def merge(self, buckets: dict[str, int], max_ms: float, sum_ms: float = 0.0) -> None:
        """Add another histogram's ``buckets()`` (exact: same bucket bounds everywhere)."""
        for index, n in buckets.items():
            self._counts[int(index)] += n
            self.count += n
        self.max_ms = max(self.max_ms, max_ms)
        self.sum_ms += sum_ms

    def cumulative(self, bounds_ms: Sequence[float]) -> list[int]:
        """For each bound (ascending, ms), how many values are at or below it; a value counts
        under the first bound at or above its bucket's top (so within 1% of exact)."""
        out: list[int] = []
        seen = 0
        index = 0
        for bound in bounds_ms:
            # Buckets whose top, _MIN_MS * e**(_GROWTH * (i + 1)), is <= bound.
            top = math.floor(math.log(bound / _MIN_MS) / _GROWTH + 1e-9) if bound > _MIN_MS else 0
            top = min(top, _BUCKETS)
            while index < top:
                seen += self._counts[index]
                index += 1
            out.append(seen)
        return out

    def summary(self, names: Sequence[str] = ("p50", "p90", "p99", "max")) -> dict[str, float]:
        """The named percentiles (``p50``, ``p90``, ``p99``) and ``max`` in ms, rounded."""
        return {
            name: round(self.max_ms if name == "max" else self.percentile(float(name[1:])), 2)
            for name in names
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Timeline:
    """For each second of the run: requests sent, their 429s and 503s, the pacer's allowed
    rate and the seconds every request was held (for plots and post-mortems)."""

    __slots__ = ("_start", "paused", "rate", "requests", "throttled_429", "throttled_503")

    def __init__(self) -> None:
        self._start: float | None = None
        self.requests: list[int] = []
        self.throttled_429: list[int] = []
        self.throttled_503: list[int] = []
        self.rate: list[float] = []
        self.paused: list[float] = []

    def _second(self, now: float, rate: float) -> int:
        if self._start is None:
            self._start = now
        second = max(0, int(now - self._start))
        while len(self.requests) <= second:
            self.requests.append(0)
            self.throttled_429.append(0)
            self.throttled_503.append(0)
            self.rate.append(rate)
            self.paused.append(0.0)
        return second

    def record(self, now: float, rate: float, answer: Answer) -> None:
        """Count one request sent at ``now`` (loop time) while the pacer allowed ``rate``/s."""
        second = self._second(now, rate)
        self.requests[second] += 1
        if answer is Answer.THROTTLED_429:
            self.throttled_429[second] += 1
        elif answer is Answer.THROTTLED_503:
            self.throttled_503[second] += 1
        self.rate[second] = rate

    def add_pause(self, start: float, end: float, rate: float) -> None:
        """Spread one client-wide pause (loop times) over the seconds it covered."""
        while start < end:
            second = self._second(start, rate)
            assert self._start is not None
            edge = min(end, self._start + second + 1)
            self.paused[second] = round(self.paused[second] + edge - start, 3)
            start = edge

    def as_dict(self) -> dict[str, list[Any]]:
        """JSON-ready columns, one entry a second."""
        return {
            "requests": self.requests,
            "throttled_429": self.throttled_429,
            "throttled_503": self.throttled_503,
            "rate": self.rate,
            "paused_s": self.paused,
        }


@dataclass
class RunStats:
    """Everything counted during one run; the summary and the progress display read it."""

    unique_ids: int = 0
    duplicates: int = 0
    already_done: int = 0
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    unresolved: int = 0
    requests: int = 0
    retries: int = 0
    throttled_429: int = 0
    throttled_503: int = 0
    in_flight: int = 0
    rows_written: int = 0
    files_written: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unresolved_reasons: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    loop_lag: LatencyHistogram = field(default_factory=LatencyHistogram)  # see looplag.py
    timeline: Timeline = field(default_factory=Timeline)
    paused_s: float = 0.0  # seconds every request was held by a client-wide pause

    def count_outcome(self, kind: Kind) -> None:
        """One id reached a terminal outcome (its counter is named for the kind)."""
        setattr(self, kind.value, getattr(self, kind.value) + 1)

    def count_unresolved(self, reason: str, count: int = 1) -> None:
        """``count`` ids left without a row, for ``reason`` (see ``MAX_WAIT_REACHED``)."""
        if count:
            self.unresolved += count
            self.unresolved_reasons[reason] += count

    def count_throttled(self, status: int) -> None:
        """One 429 or 503 answer."""
        if status == 503:
            self.throttled_503 += 1
        else:
            self.throttled_429 += 1

    @property
    def finished(self) -> int:
        """Ids with an outcome this run (rows written or pending write, and unresolved)."""
        return self.completed + self.failed + self.invalid + self.unresolved

    def counters(self) -> dict[str, int]:
        """The integer counters, for a parent process summing its workers' progress."""
        return {
            name: value
            for name, value in vars(self).items()
            if isinstance(value, int) and not isinstance(value, bool)
        }

    def summary(self, elapsed: float, **extra: Any) -> dict[str, Any]:
        """The run's report, as printed with --json and saved in the dataset's metadata."""
        elapsed = max(elapsed, 1e-9)
        return {
            "unique_ids": self.unique_ids,
            "already_done": self.already_done,
            "completed": self.completed,
            "failed": self.failed,
            "invalid": self.invalid,
            "unresolved": self.unresolved,
            "duplicates": self.duplicates,
            "requests": self.requests,
            "retries": self.retries,
            "throttled": self.throttled_429 + self.throttled_503,
            "throttled_429": self.throttled_429,
            "throttled_503": self.throttled_503,
            "paused_s": round(self.paused_s, 1),
            "errors": dict(sorted(self.errors.items())),
            "unresolved_reasons": dict(self.unresolved_reasons.most_common()),
            "rows_written": self.rows_written,
            "files_written": self.files_written,
            "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(self.requests / elapsed, 1),
            "ids_per_s": round(self.finished / elapsed, 1),
            "latency_ms": self.latency.summary(),
            "loop_lag_ms": self.loop_lag.summary(LOOP_LAG_KEYS),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **extra,
        }
