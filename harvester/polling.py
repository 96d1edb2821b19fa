"""When to poll a ``retrieving`` id again: a schedule learned from the ready times of the run.

Ages are seconds since an id's first poll. Every id the run finds ready after at least one
``retrieving`` answer tells when it became ready, to within its last two polls; every
``retrieving`` answer tells that the id was not ready yet. ``ReadyTimes`` keeps both in fixed
histograms (bins ``poll_interval / 8`` wide, up to ``max_wait``; intervals by first bin and
width) and fits each bin's hazard to them: of the ids not ready at the bin's start, the share
that became ready within it. A life table, so ids still in play and ids given up count as well
as those found ready, and the first fast ids of a run do not pass for the whole distribution.

From the hazards, ``PollSchedule`` places the polls where they pay (a small dynamic program
over the bins): each poll costs one request for every id still retrieving at that age, each
second between an id's ready time and the poll that finds it costs ``1 / (LAG_PER_POLL *
poll_interval)``, or 32x less while fresh ids wait for a first poll (``LAG_PER_POLL_BUSY``: the
rate is then the limit, and each re-poll puts off a first one). So a spell in which many ids
become ready gets a poll at its end, and a stretch in which few do gets polls up to
``max_poll_interval`` apart; polls are never closer than ``poll_interval``. Only the ages that
enough ids have been seen at (``MIN_AT_RISK``) are planned; before the run has learned
(``WARMUP`` ids found ready) and beyond those ages, the policy's own rule applies
(``poll_interval`` growing 1.5x a poll up to ``max_poll_interval``).
The histogram decays a little at every re-plan, so a distribution that drifts is followed.

A run does not start from nothing: ``ExpectedReady`` (``--expected-ready``) seeds the table with
``PRIOR_IDS`` ids spread over the ready ranges the provider's public measurements give (one a
model; ``DOCUMENTED_READY``), so ids that all start together (a batch queued, then harvested)
are polled just after each range from their second poll on. Ids the run sees soon outweigh
them; ``none`` starts from the rule alone.

The plan alone would learn nothing new: once it polls at 10 s, an id found ready then says only
"between 0 and 10 s". So a share of ids (``PROBE_SHARE``) are probes, polled every
``poll_interval`` to twice that, at random phases; their narrow, shifted intervals (and the ids
seen still retrieving) are what sharpens the estimate, at a few percent more polls.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import UsageError

__all__ = [
    "DOCUMENTED_READY",
    "LAG_PER_POLL",
    "NO_EXPECTATION",
    "ExpectedReady",
    "PollSchedule",
    "ReadyTimes",
]

BINS_PER_INTERVAL: Final = 8  # histogram resolution: poll_interval / 8
MAX_BINS: Final = 4096  # ages past the last bin count in it (and are never planned)
# One poll is worth this many poll_intervals of detection lag (1 s at the default 4 s): a
# quarter of one, half the lag a fixed poll_interval spacing costs on average, so a spell in
# which a quarter of the ids become ready gets its poll with a wide margin (at 0.5 such a
# decision is close, and a run's noisy estimate can skip it).
LAG_PER_POLL: Final = 0.25
# While fresh ids wait for their first poll (the rate, not the ids, is the limit), every
# re-poll delays a first poll: then one is worth 8 poll_intervals of lag (32x more).
LAG_PER_POLL_BUSY: Final = 8.0
MIN_AT_RISK: Final = 20.0  # ids seen not ready at an age before that age is planned
WARMUP: Final = 32  # ids found ready before the first plan
REPLAN_SHARE: Final = 0.05  # re-plan after this share of the (decayed) ids found ready, or
REPLAN_AT_LEAST: Final = 32  # at least this many
DECAY: Final = 0.97  # every re-plan keeps this share of what was learned
_HAZARD_FLOOR: Final = 1e-3  # where the fit starts, and bins nothing was seen in
SPAN_INTERVALS: Final = 2.0  # intervals up to 2x max_poll_interval wide are kept
_JITTER: Final = 0.02  # planned polls land up to 2% later, never earlier
PROBE_SHARE: Final = 0.1  # ids polled densely, at random phases, to keep learning

PRIOR_IDS: Final = 64  # the expected ready ranges weigh as much as this many ids found ready
# ... plus this many seen not ready through a quarter past the last range (answers come later
# too): without them the plan would end inside the last range, where the expected ids thin out
# below MIN_AT_RISK, and its end fall back to the rule. Twice MIN_AT_RISK lasts ~20 re-plans.
PRIOR_TAIL_IDS: Final = 2 * MIN_AT_RISK
PRIOR_TAIL_PAST: Final = 1.25
MAX_RANGES: Final = 32

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ExpectedReady:
    """Age ranges (seconds from an id's first poll) in which answers are expected to become
    ready, weighed alike; the schedule's starting point, learned over during the run."""

    ranges: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ranges) > MAX_RANGES:
            raise UsageError(f"at most {MAX_RANGES} ready ranges can be given")
        for lo, hi in self.ranges:
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
                raise UsageError(
                    f"{lo:g}-{hi:g} is not a range of seconds (LO-HI with 0 <= LO <= HI)"
                )

    @classmethod
    def parse(cls, text: str) -> ExpectedReady:
        """``"7-8,14-15"`` (seconds, a single number for a point) or ``none``."""
        text = text.strip()
        if text.lower() == "none":
            return cls()
        ranges = []
        for part in text.split(","):
            match = _RANGE.fullmatch(part.strip())
            if match is None:
                raise UsageError(
                    f"give ready ranges in seconds, such as 7-8,14-15, or none "
                    f"(got {part.strip()!r})"
                )
            lo = float(match[1])
            ranges.append((lo, float(match[2]) if match[2] is not None else lo))
        return cls(tuple(ranges))

    def __str__(self) -> str:
        if not self.ranges:
            return "none"
        return ",".join(f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}" for lo, hi in self.ranges)

    def scaled(self, factor: float) -> ExpectedReady:
        """Every age times ``factor`` (the simulator's compressed clock, say)."""
        return ExpectedReady(tuple((lo * factor, hi * factor) for lo, hi in self.ranges))

    def ages(self, count: int) -> Floats:
        """``count`` ages spread evenly over the ranges, the same number in each."""
        if not self.ranges:
            return np.zeros(0)
        each = max(1, math.ceil(count / len(self.ranges)))
        steps = (np.arange(each) + 0.5) / each
        return np.concatenate([lo + (hi - lo) * steps for lo, hi in self.ranges])


NO_EXPECTATION: Final = ExpectedReady()  # start from the rule alone

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(_NUMBER + r"(?:\s*-\s*" + _NUMBER + r")?")

# The provider's public measurements (../shared/API-NOTES.md, "Timing"): gemini 7-8 s, chatgpt
# 14-15 s, perplexity 18-51 s, copilot about 35 s (its tail up to 152 s is left to learning).
# No shares are published, so each model weighs alike.
DOCUMENTED_READY: Final = ExpectedReady(((7.0, 8.0), (14.0, 15.0), (18.0, 51.0), (30.0, 40.0)))


class ReadyTimes:
    """A life table of ready ages, estimated from what the polls saw (bounded memory).

    Bin k holds ages in [k * width, (k + 1) * width). Two histograms, both decayed alike:
    ``survived[k]``, ids seen not ready through the whole of bin k; ``found[lo, n]``, ids
    found ready in bins lo .. lo + n (interval ends rounded to the nearest bin edge). The
    hazards (of the ids not ready at a bin's start, the share ready within it) are their
    maximum-likelihood fit, by the self-consistency (EM) iteration of Turnbull's estimator:
    each interval's id is placed in its bins as the current hazards say, in turn giving the
    hazards. Intervals wider than ``span`` bins (a long Retry-After, a queue) tell little
    and are not kept; the bins they survived through are.
    """

    def __init__(self, width: float, bins: int, span: int) -> None:
        """``bins`` bins of ``width`` seconds; intervals of up to ``span`` bins are kept."""
        if not (width > 0 and bins > 0 and span > 0):
            raise ValueError("ReadyTimes needs a positive width, bin count and span")
        self.width = width
        self.bins = bins
        self.span = span
        self.survived: Floats = np.zeros(bins)
        self.found_in: npt.NDArray[np.float32] = np.zeros((bins, span), dtype=np.float32)
        self.found = 0.0  # ids found ready (decayed like the bins)
        self.hazard: Floats = np.zeros(bins)
        self.exposure: Floats = np.zeros(bins)  # ids at risk in each bin, by the last fit

    def edge(self, age: float) -> int:
        """The bin edge nearest to an age (clipped to the table)."""
        return min(self.bins, max(0, round(age / self.width)))

    def not_ready(self, since: float, until: float) -> None:
        """An id known not ready at age ``since`` is still not ready at ``until``."""
        lo, hi = self.edge(since), self.edge(until)
        if hi > lo:
            self.survived[lo:hi] += 1.0

    def ready(self, after: float, by: float) -> None:
        """An id not ready at age ``after`` was found ready at ``by``."""
        lo = min(self.edge(after), self.bins - 1)
        n = max(self.edge(by), lo + 1) - 1 - lo
        if n < self.span:
            self.found_in[lo, n] += 1.0
        self.found += 1.0

    def fit(self, iterations: int = 100) -> None:
        """Fit the hazards to what was seen (warm-started from the last fit)."""
        lo, n = np.nonzero(self.found_in)
        counts = self.found_in[lo, n].astype(np.float64)
        hi = lo + n + 1  # one past the interval's last bin
        # Only the bins anything was seen in are fitted (the others keep the floor): cheaper.
        seen = np.flatnonzero(self.survived)
        used = max(int(hi.max(initial=0)), int(seen[-1]) + 1 if len(seen) else 0)
        survived = self.survived[:used]
        hazard = np.where(self.hazard[:used] > 0, self.hazard[:used], _HAZARD_FLOOR)
        exposure = survived
        for _ in range(iterations):
            alive = np.concatenate(([1.0], np.cumprod(1.0 - hazard)))  # at each bin's start
            ready = hazard * alive[:-1]
            share = np.maximum(alive[lo] - alive[hi], 1e-12)  # P(ready within the interval)
            weight = counts / share
            cover = _range_sum(used, lo, hi, weight)  # sum over the intervals holding bin k
            after = _range_sum(used, lo, hi, weight * alive[hi])
            events = ready * cover
            exposure = survived + alive[:-1] * cover - after
            with np.errstate(divide="ignore", invalid="ignore"):
                fitted = np.where(exposure > 1e-9, events / exposure, 0.0)
            hazard = np.maximum(fitted, _HAZARD_FLOOR * (exposure <= 1e-9))
            hazard = np.clip(hazard, _HAZARD_FLOOR * 1e-3, 0.999)  # no bin is ruled out for good
        self.hazard = np.full(self.bins, _HAZARD_FLOOR)
        self.hazard[:used] = np.nan_to_num(hazard, nan=_HAZARD_FLOOR)
        self.exposure = np.zeros(self.bins)
        self.exposure[:used] = exposure

    def decay(self, keep: float) -> None:
        """Weigh what was learned so far by ``keep`` (newer ids then count for more)."""
        self.survived *= keep
        self.found_in *= np.float32(keep)
        self.found *= keep


def _range_sum(bins: int, lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp], w: Floats) -> Floats:
    """For each of ``bins`` bins, the sum of ``w`` over the intervals [lo, hi) that hold it."""
    diff = np.zeros(bins + 1)
    np.add.at(diff, lo, w)
    np.add.at(diff, hi, -w)
    return np.cumsum(diff)[:-1]


class PollSchedule:
    """The re-poll spacing of one run, learned from its ready times (see the module doc)."""

    def __init__(
        self,
        *,
        poll_interval: float,
        max_poll_interval: float,
        max_wait: float,
        fallback: Callable[[int], float],
        learn: bool = True,
        expected: ExpectedReady = NO_EXPECTATION,
    ) -> None:
        """``fallback(polls)`` is the spacing before the run has learned and past what it has
        seen; ``learn=False`` (or ``poll_interval == max_poll_interval``) keeps to it;
        ``expected``: the ready ranges the first plan is made from (none: the rule first)."""
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._fallback = fallback
        self.learning = learn and max_poll_interval > poll_interval
        width = poll_interval / BINS_PER_INTERVAL
        bins = max(1, min(MAX_BINS, math.ceil(min(max_wait, 1e9) / width) + 1))
        span = math.ceil(SPAN_INTERVALS * max_poll_interval / width) + 1
        self.ready_times = ReadyTimes(width, bins, span)
        self._since_plan = 0
        self._next: npt.NDArray[np.int64] | None = None  # bin -> the bin of the next poll
        self._thrifty: npt.NDArray[np.int64] | None = None  # the same while busy
        self.horizon = 0.0  # ages below this are planned
        self.plans = 0
        if self.learning and expected.ranges:
            self._seed(expected.ages(PRIOR_IDS))

    def _seed(self, ages: Floats) -> None:
        """Count an id found ready at each of ``ages`` (within one bin), and the tail's ids
        still not ready past the last, then plan from them."""
        times = self.ready_times
        for age in ages:
            after = max(0.0, float(age) - times.width)
            times.not_ready(0.0, after)
            times.ready(after, after + times.width)
        tail = PRIOR_TAIL_PAST * float(ages.max())
        for _ in range(int(PRIOR_TAIL_IDS)):
            times.not_ready(0.0, tail)
        self.replan()

    def not_ready(self, since: float, age: float) -> None:
        """An id was not ready at ``since`` and is still not at ``age`` (both ages, seconds)."""
        if self.learning:
            self.ready_times.not_ready(since, age)

    def found_ready(self, after: float, by: float) -> None:
        """An id not ready at age ``after`` was ready at ``by``; re-plans now and then."""
        if not self.learning:
            return
        times = self.ready_times
        times.ready(after, by)
        self._since_plan += 1
        due = max(REPLAN_AT_LEAST, REPLAN_SHARE * times.found)
        if times.found >= WARMUP and self._since_plan >= due:
            self.replan()

    def is_probe(self) -> bool:
        """Draw whether a new id is a probe (never, when not learning)."""
        return self.learning and random.random() < PROBE_SHARE

    def next_poll(
        self, polls: int, age: float, *, probe: bool = False, busy: bool = False
    ) -> float:
        """Seconds from now (an id ``age`` seconds old, ``polls`` polls made) to its next poll;
        ``busy``: fresh ids are waiting for a first poll, so polls are dearer."""
        if probe and self.learning:
            return self.poll_interval * random.uniform(1.0, 2.0)
        plan = self._thrifty if busy else self._next
        if plan is None or age >= self.horizon:
            return self._fallback(polls)
        width = self.ready_times.width
        delay = float(plan[int(age / width)]) * width - age
        delay = min(max(delay, self.poll_interval), self.max_poll_interval)
        return delay * random.uniform(1.0, 1.0 + _JITTER)

    def replan(self) -> None:
        """Place the polls anew from the hazards learned so far, then decay them a little."""
        self._since_plan = 0
        times = self.ready_times
        times.fit()
        trusted = times.exposure >= MIN_AT_RISK
        horizon = int(np.argmin(trusted)) if not trusted.all() else times.bins
        lo = max(1, math.ceil(self.poll_interval / times.width - 1e-9))
        hi = max(lo, math.floor(self.max_poll_interval / times.width + 1e-9))
        if horizon <= lo:
            self._next = self._thrifty = None
            self.horizon = 0.0
        else:
            hazard, width = times.hazard[:horizon], times.width
            self._next = plan_polls(hazard, width, lo, hi, _lag_cost(self, LAG_PER_POLL))
            self._thrifty = plan_polls(hazard, width, lo, hi, _lag_cost(self, LAG_PER_POLL_BUSY))
            self.horizon = horizon * width
        self.plans += 1
        times.decay(DECAY)


def _lag_cost(schedule: PollSchedule, lag_per_poll: float) -> float:
    """Polls a second of detection lag is worth."""
    return 1.0 / (lag_per_poll * schedule.poll_interval)


def plan_polls(
    hazard: Floats, width: float, lo: int, hi: int, lag_cost: float
) -> npt.NDArray[np.int64]:
    """For each bin i (an id polled at age ``i * width``, not ready), the bin of its next poll,
    between ``lo`` and ``hi`` bins later (clipped to the end), minimising the expected polls plus
    ``lag_cost`` times the expected seconds from ready to found, over the bins given.

    ``W[i]`` is that cost for the ids still retrieving at bin i, weighed by their share
    ``S[i]``: ``W[i] = S[i] + min_j (lag_cost * lag(i, j) + W[j])``, ``W[end] = 0``, where the
    ids ready in bin k are taken to be ready at its middle.
    """
    n = len(hazard)
    survive = np.concatenate(([1.0], np.cumprod(1.0 - hazard)))  # S at each bin's start, n + 1
    found = -np.diff(survive)  # share ready in each bin
    mass = np.concatenate(([0.0], np.cumsum(found)))  # ready before bin j
    moment = np.concatenate(([0.0], np.cumsum(found * (np.arange(n) + 0.5) * width)))
    ages = np.arange(n + 1) * width
    cost = np.zeros(n + 1)
    nxt = np.full(n, n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        js = np.arange(min(i + lo, n), min(i + hi, n) + 1)
        lag = ages[js] * (mass[js] - mass[i]) - (moment[js] - moment[i])
        total = lag_cost * lag + cost[js]
        best = int(np.argmin(total))
        nxt[i] = js[best]
        cost[i] = survive[i] + total[best]
    return nxt
