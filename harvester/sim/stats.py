"""What the simulator served: counters, the busiest sliding second, and a per-second timeline."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields
from typing import Final

__all__ = ["TIMELINE_KEYS", "Detection", "SimulatorStats", "Timeline"]

# The series of the per-second timeline: arrivals, answers by status, 2xx answers ("ok"),
# every other answered status, and connections closed without an answer.
TIMELINE_KEYS: Final = ("requests", "ok", "200", "202", "429", "503", "other", "dropped")
_BY_STATUS: Final = frozenset(("200", "202", "429", "503"))


class Timeline:
    """Counts per whole second since the first event: one list of ints per series.

    Second ``i`` covers ``[origin + i, origin + i + 1)`` where ``origin`` is the time of the
    first event counted (an arrival, normally). Every series has the same length.
    """

    def __init__(self) -> None:
        """Start empty; the first event sets the origin."""
        self.origin: float | None = None
        self.series: dict[str, list[int]] = {key: [] for key in TIMELINE_KEYS}

    def count(self, key: str, now: float) -> None:
        """Add one to ``key`` in the second ``now`` falls in."""
        if self.origin is None:
            self.origin = now
        index = max(0, int(now - self.origin))
        length = len(self.series["requests"])
        if index >= length:
            for values in self.series.values():
                values.extend([0] * (index + 1 - length))
        self.series[key][index] += 1

    def answered(self, status: int, now: float) -> None:
        """Count one answer under its status (or "other") and, if 2xx, under "ok"."""
        key = str(status)
        self.count(key if key in _BY_STATUS else "other", now)
        if 200 <= status < 300:
            self.count("ok", now)

    def clear(self) -> None:
        """Forget every count and the origin."""
        self.origin = None
        for values in self.series.values():
            values.clear()

    def as_dict(self) -> dict[str, list[int]]:
        """Return a copy of every series, JSON-ready."""
        return {key: list(values) for key, values in self.series.items()}


class Detection:
    """How soon clients found each conversation ready, and how many polls it took them.

    Every request for a valid id counts as a poll of that id (throttled and failed ones
    included); the first time an id's Completion is served, its lag (served - ready, in
    unscaled seconds) and its polls so far are recorded. Memory is per id: one dict entry per
    id polled (about 150 bytes) and one float per id completed, which a simulator can afford.
    """

    def __init__(self) -> None:
        """Start empty."""
        self._polls: dict[str, int] = {}  # ids not yet completed -> polls so far
        self._done: set[str] = set()
        self._lags: list[float] = []
        self._polls_of_completed = 0

    def clear(self) -> None:
        """Forget every id."""
        self._polls = {}
        self._done = set()
        self._lags = []
        self._polls_of_completed = 0

    def polled(self, id_: str) -> None:
        """Count one request for ``id_`` (a canonical id)."""
        if id_ not in self._done:
            self._polls[id_] = self._polls.get(id_, 0) + 1

    def completed(self, id_: str, lag_s: float) -> None:
        """``id_``'s Completion is being served ``lag_s`` unscaled seconds after it was ready;
        only the first time counts."""
        if id_ in self._done:
            return
        self._done.add(id_)
        self._polls_of_completed += self._polls.pop(id_, 1)
        self._lags.append(max(0.0, lag_s))

    def as_dict(self) -> dict[str, float | int | None]:
        """``completed``, ``polls_per_completed``, ``lag_s_p50/p90/p99/mean``: JSON-ready."""
        lags = sorted(self._lags)
        n = len(lags)

        def pct(q: float) -> float | None:
            return None if not n else round(lags[min(n - 1, int(q * n))], 4)

        return {
            "completed": n,
            "polls_of_completed": self._polls_of_completed,
            "polls_per_completed": round(self._polls_of_completed / n, 4) if n else None,
            "lag_s_mean": round(sum(lags) / n, 4) if n else None,
            "lag_s_p50": pct(0.5),
            "lag_s_p90": pct(0.9),
            "lag_s_p99": pct(0.99),
        }


@dataclass
class SimulatorStats:
    """What the server served; answered + dropped + in_flight == requests at any time."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0
    max_per_second: int = 0  # most arrivals inside any sliding 1-second window
    dropped: int = 0  # connections closed on purpose without an answer
    truncated: int = 0  # 200 answers whose body was cut short (also counted in by_status)
    # 429/503 answers by cause: "fault", "capacity", "saturated", "first_poll".
    throttled: dict[str, int] = field(default_factory=dict)
    _arrivals: deque[float] = field(default_factory=deque, init=False, repr=False, compare=False)
    _timeline: Timeline = field(default_factory=Timeline, init=False, repr=False, compare=False)
    detection: Detection = field(default_factory=Detection, init=False, repr=False, compare=False)

    def arrive(self, now: float) -> None:
        """Count a request at its arrival time; amortised O(1) sliding-window maximum."""
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        arrivals = self._arrivals
        arrivals.append(now)
        while arrivals[0] <= now - 1.0:
            arrivals.popleft()
        self.max_per_second = max(self.max_per_second, len(arrivals))
        self._timeline.count("requests", now)

    def current_per_second(self) -> int:
        """Arrivals in the last second, as of the latest arrival."""
        return len(self._arrivals)

    def answered(self, status: int, now: float, *, cause: str | None = None) -> None:
        """Count one answer by status code at time ``now``; ``cause`` names why it throttled."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if cause is not None:
            self.throttled[cause] = self.throttled.get(cause, 0) + 1
        self._timeline.answered(status, now)

    def drop(self, now: float) -> None:
        """Count a connection closed without an answer."""
        self.dropped += 1
        self._timeline.count("dropped", now)

    @property
    def per_second(self) -> dict[str, list[int]]:
        """The timeline: for each whole second since the first request, counts per series."""
        return self._timeline.as_dict()

    def reset(self) -> None:
        """Zero every counter but keep requests still in flight, so the invariant holds."""
        self.requests = self.peak_in_flight = self.in_flight
        self.by_status = {}
        self.throttled = {}
        self.max_per_second = self.dropped = self.truncated = 0
        self._arrivals.clear()
        self._timeline.clear()
        self.detection.clear()

    def as_dict(self) -> dict[str, object]:
        """Return the counters as a JSON-ready dict (status codes as string keys).

        ``per_second`` holds one list per series of ``TIMELINE_KEYS``, entry ``i`` counting
        second ``i`` since the first request (arrivals under "requests", answers by when they
        were sent). ``detection`` says how soon completions were collected (see Detection).
        """
        data: dict[str, object] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not f.name.startswith("_") and f.name != "detection"
        }
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        data["throttled"] = dict(sorted(self.throttled.items()))
        data["per_second"] = self.per_second
        data["detection"] = self.detection.as_dict()
        return data
