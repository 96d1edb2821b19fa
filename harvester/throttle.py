"""The throttling policy: what the shared rate and the client-wide pause should be, given answers.

A 429 or 503 is first the business of the id that got it (it waits its own Retry-After, see
``scheduler.py``). This controller looks at the *share* of such answers over the last second,
429 and 503 apart, and decides for everyone:

* **hold**: a few scattered 429s (>= ``HOLD_SHARE``) stop the rate from growing, no more;
  503s ("autoscaling, keep the traffic") count only when they are a large share;
* **cut**: 429s on >= ``CUT_SHARE_429`` of answers (or 503s on >= ``CUT_SHARE_503``) cut the
  rate toward what the server accepted in the last second (``BETA`` of it, and never more
  than to ``MAX_CUT`` of the rate at once), at most every ``CUT_GAP`` so that the effect of a
  cut is seen before the next;
* **win back**: when calm, the rate grows back along a CUBIC curve (as botocore's adaptive
  retry does): slowly near the rate of the last cut, faster away from it, up to ``--rate``;
* **start** as after a pause of no length: ``PROBES`` requests first, the rate once one is
  accepted (a server that refuses everyone from the start gets two requests, not C);
* **pause**: only when the server is saturated (of at least ``SATURATED_MIN`` answers in the
  last 300 ms, at most ``SATURATED_ACCEPTED`` were not 429/503), everyone waits for the latest
  Retry-After; then ``PROBES``
  requests go first, within the rate as any other, and the rate resumes once one is accepted.

Pure logic on an injected clock: ``record`` takes answers; ``rate``, ``paused_until`` and
``probing`` say what the pacer must do. Unit-tested with a fake clock.

At a ``--rate`` under about 10/s the window never holds enough answers to judge a share:
such a client does not cut, and pauses after ``_FEWEST`` throttled answers in a row.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable

log = logging.getLogger("harvester")

WINDOW_SECONDS = 1.0  # shares are taken over the answers of the last second
_BUCKETS = 10  # ... kept in ten 100 ms buckets (O(1) an answer)
HOLD_SHARE = 0.02  # 429s on 2% of answers: do not grow the rate
CUT_SHARE_429 = 0.10  # 429s on 10%: cut toward what the server accepted
CUT_SHARE_503 = 0.30  # 503 means "autoscaling, keep going": cut only when it is most answers
CALM_SHARE_503 = 0.10  # ... and grow only while 503s stay below this
SATURATED_ACCEPTED = 0.02  # at most 2% of the answers of the last 300 ms accepted ...
SATURATED_MIN = 24  # ... of at least this many (the whole second's, if fewer came in 300 ms):
# the server takes nothing, pause everyone. Each answer judged before a pause is one more
# request sent into a wall; 24 all throttled when 10% pass happens 8% of the time, and then
# costs one Retry-After of waiting.
CUT_MIN = 50  # a share is judged from this many answers at least (fewer at a low --rate)
_FEWEST = 10  # ... but never fewer than this
_SATURATED_BUCKETS = 3  # (the last 300 ms: a saturated server is seen at once)
MIN_MEASURE_SECONDS = 0.05  # the accepted rate is never judged from less time than this
CUT_GAP = 0.5  # seconds between two cuts: the first one's effect shows before the next
BETA = 0.9  # a cut sets the rate to 90% of the accepted rate ...
MAX_CUT = 0.1  # ... but never below a tenth of the rate before: a bad estimate costs 10x
CUBIC_C = 0.4  # botocore's scale constant: requests/s per s^3
PROBES = 2  # requests sent after a pause before the rate resumes
MIN_PROBE_GAP = 0.1  # a probe answered 429 "retry after 0" still waits this long
DEFAULT_RETRY_AFTER = 1.0  # a 429/503 without Retry-After


class Answer(enum.Enum):
    """What the pacer learns from one finished request."""

    ACCEPTED = "accepted"  # any answer the server gave that is not 429/503
    THROTTLED_429 = "429"
    THROTTLED_503 = "503"
    NONE = "none"  # no answer at all (refused, dropped, timed out): no signal about load


class _Window:
    """Counts of accepted, 429 and 503 answers over the last second, in 100 ms buckets."""

    __slots__ = ("_counts", "_tick", "since")

    def __init__(self) -> None:
        self._counts = [[0, 0, 0] for _ in range(_BUCKETS)]
        self._tick = -(1 << 62)
        self.since = math.inf  # when its first answer came (older buckets may have expired)

    def add(self, now: float, column: int) -> None:
        if self.since > now:
            self.since = now
        self._counts[self._advance(now) % _BUCKETS][column] += 1

    def totals(self, now: float, buckets: int = _BUCKETS) -> tuple[int, int, int]:
        """(accepted, 429, 503) in the last ``buckets`` tenths of the window ending at ``now``."""
        tick = self._advance(now)
        accepted = t429 = t503 = 0
        for t in range(tick - buckets + 1, tick + 1):
            a, b, c = self._counts[t % _BUCKETS]
            accepted += a
            t429 += b
            t503 += c
        return accepted, t429, t503

    def span(self, now: float) -> float:
        """Seconds from the oldest answer still in the window to ``now``."""
        tick = self._advance(now)
        for t in range(tick - _BUCKETS + 1, tick + 1):
            if any(self._counts[t % _BUCKETS]):
                return now - max(self.since, t * WINDOW_SECONDS / _BUCKETS)
        return 0.0

    def clear(self) -> None:
        for counts in self._counts:
            counts[:] = (0, 0, 0)
        self.since = math.inf

    def _advance(self, now: float) -> int:
        tick = math.floor(now * _BUCKETS / WINDOW_SECONDS)
        if tick > self._tick:
            for t in range(max(self._tick + 1, tick - _BUCKETS + 1), tick + 1):
                self._counts[t % _BUCKETS][:] = (0, 0, 0)
            self._tick = tick
        return self._tick


_COLUMN = {Answer.ACCEPTED: 0, Answer.THROTTLED_429: 1, Answer.THROTTLED_503: 2}


class ThrottleController:
    """Decides the shared rate and the client-wide pause from the share of throttled answers."""

    def __init__(self, max_rate: float, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.max_rate = max_rate
        self.min_rate = min(1.0, max_rate)
        self.rate = max_rate
        self._started = clock()
        # A run starts as after a pause of no length: PROBES requests go first and the rate
        # opens once one is accepted. That costs one round trip, and a server that answers
        # 429 to everything from the start gets two requests, not C in flight and a second's
        # worth behind them.
        self.paused_until = self._started
        self.paused_total = 0.0  # seconds every request was held, for the summary
        self.probing = True  # after a pause: only PROBES requests until one is accepted
        self.probes_out = 0  # probes of the current round still out
        self._round = 1  # probing rounds: a probe from an earlier one decides nothing now
        self._held = False  # a pause really held requests (the start's probing does not)
        self.note = ""  # why the client is paused, for the progress line
        self._window = _Window()
        # A slow client sees fewer answers a second: judge it from what it can see.
        self._cut_min = max(_FEWEST, min(CUT_MIN, round(max_rate / 2)))
        self._saturated_min = max(_FEWEST, min(SATURATED_MIN, round(max_rate * 0.3)))
        self._last_cut = -math.inf
        self._w_max = max_rate  # the rate at the last cut (CUBIC's plateau)
        self._k = 0.0  # seconds of calm CUBIC needs to climb back to _w_max
        self._calm = 0.0  # seconds of calm since the last cut
        self._last_tick = self._started
        self._paused_from = self._started
        self._streak = 0  # throttled answers since the last accepted one
        # Under ~10/s a second never holds _FEWEST answers: there, that many throttled in a
        # row is the saturation test instead.
        self._streak_min = _FEWEST if max_rate < _FEWEST else math.inf
        self._pauses: list[tuple[float, float]] = []  # (start, end) of each ended pause

    # -- what the pacer asks ----------------------------------------------------------------

    def tick(self) -> None:
        """Let calm time pass: win the rate back along the CUBIC curve (called by the pacer)."""
        now = self._clock()
        elapsed, self._last_tick = now - self._last_tick, now
        if self.rate >= self.max_rate or now < self.paused_until or self.probing:
            return
        accepted, t429, t503 = self._window.totals(now)
        total = accepted + t429 + t503
        if total and (t429 >= HOLD_SHARE * total or t503 >= CALM_SHARE_503 * total):
            return  # hold: a few are being throttled; growing would make it more
        self._calm += elapsed
        grown = _CUBIC(self._calm, self._w_max, self._k)
        self.rate = min(self.max_rate, max(self.rate, grown))

    def may_probe(self) -> int:
        """While probing: the round number (counted out) if one more probe may go, else 0."""
        if self.probes_out >= PROBES:
            return 0
        self.probes_out += 1
        return self._round

    # -- what the scheduler tells -----------------------------------------------------------

    def record(self, answer: Answer, retry_after: float | None = None, *, probe: int = 0) -> None:
        """One request finished with ``answer``; ``probe``: the round it was sent as a probe
        in (``may_probe``'s number), 0 for an ordinary request."""
        now = self._clock()
        if probe:
            if probe == self._round:
                self.probes_out -= 1
            else:
                probe = 0  # a probe of an earlier round: an ordinary answer now
        if answer is Answer.NONE:
            return
        self._window.add(now, _COLUMN[answer])
        if answer is Answer.ACCEPTED:
            self._streak = 0
            if self.probing and probe:
                self._resume(now)
            return
        self._streak += 1
        wait = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        if self.probing:  # paused, or probing after a pause
            if probe:  # still saturated: wait again for what it says (a moment at least)
                why = f"{answer.value} on 100% of the last {self._streak} answers"
                self._pause(now, max(wait, MIN_PROBE_GAP, 1.0 / self.max_rate), why)
            elif now < self.paused_until:
                # Answers to requests sent before the pause: the server may push it out.
                self.paused_until = max(self.paused_until, now + wait)
            return
        window = self._window
        accepted, t429, t503 = window.totals(now)
        total = accepted + t429 + t503
        recent_ok, recent_429, recent_503 = window.totals(now, _SATURATED_BUCKETS)
        recent = recent_ok + recent_429 + recent_503
        if recent < self._saturated_min:  # too few in 300 ms: judge the whole second instead
            recent_ok, recent_429, recent_503, recent = accepted, t429, t503, total
        saturated = recent >= self._saturated_min and recent_ok <= SATURATED_ACCEPTED * recent
        if saturated or self._streak >= self._streak_min:
            kind = "429" if recent_429 >= recent_503 else "503"
            if saturated:
                why = f"{kind} on {(recent - recent_ok) / recent:.0%} of the last {recent} answers"
            else:
                why = f"{answer.value} on 100% of the last {self._streak} answers"
            self._pause(now, wait, why)
            if accepted:  # some got through this second: that much the server takes
                self._cut(now, accepted, gap=0.0)  # a saturated server is news: no wait
        elif total >= self._cut_min and (
            t429 >= CUT_SHARE_429 * total or t503 >= CUT_SHARE_503 * total
        ):
            self._cut(now, accepted)

    def pauses(self, now: float) -> list[tuple[float, float]]:
        """(start, end) clock times of every client-wide pause so far, one under way included."""
        if not (self.probing and self._held):
            return list(self._pauses)
        return [*self._pauses, (self._paused_from, now)]

    def paused_seconds(self) -> float:
        """Seconds every request was held so far, the pause under way included."""
        if not (self.probing and self._held):
            return self.paused_total
        return self.paused_total + self._clock() - self._paused_from

    # -- decisions --------------------------------------------------------------------------

    def _cut(self, now: float, accepted: int, gap: float = CUT_GAP) -> None:
        """Cut toward what the server accepted in the window, at most once every ``gap``."""
        if now - self._last_cut < gap or not accepted:
            return  # nothing accepted yet: no capacity to cut toward (saturation may follow)
        # The answers span less than the window early on (or after a pause): scale up what
        # it holds. A server that admits its capacity at the start of each second looks
        # faster than it is at first; the next cut, half a second on, corrects that.
        seen = min(WINDOW_SECONDS, max(self._window.span(now), MIN_MEASURE_SECONDS))
        accepted_rate = accepted / seen
        new = max(self.min_rate, MAX_CUT * self.rate, BETA * min(self.rate, accepted_rate))
        if new >= self.rate:
            return
        self._last_cut = now
        self._w_max = new / BETA
        self._k = math.cbrt(self._w_max * (1 - BETA) / CUBIC_C)
        self._calm = 0.0
        log.info("throttled: rate %.0f/s -> %.0f/s (the server accepted %.0f/s)",
                 self.rate, new, accepted_rate)  # fmt: skip
        self.rate = new

    def _pause(self, now: float, wait: float, why: str) -> None:
        if not (self.probing and self._held):
            self._paused_from = now
        if not self.probing:
            self._round += 1  # probes still out from the last round decide nothing now
            self.probes_out = 0
        self._held = True
        self.paused_until = max(self.paused_until, now + wait)
        self.probing = True  # what follows the pause
        self.note = f"paused {round(wait, 1):g} s: {why}"
        log.warning("%s", self.note)

    def _resume(self, now: float) -> None:
        """A probe was accepted: the rate opens. A pause counts as held until this moment."""
        self.probing = False
        self._last_tick = now
        if not self._held:  # the start's probe: there was no pause
            return
        self._held = False
        self.paused_total += now - self._paused_from
        self._pauses.append((self._paused_from, now))
        self.note = ""
        self._window.clear()  # the saturated window says nothing about the server now
        log.info("resumed after a pause: a probe was accepted")


def _CUBIC(calm: float, w_max: float, k: float) -> float:
    """CUBIC's window: ``BETA * w_max`` at 0, back to ``w_max`` after ``k`` s, growing past it."""
    return CUBIC_C * (calm - k) ** 3 + w_max
