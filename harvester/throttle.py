"""Request pacing: at most R requests in any sliding second, close to R while there is backlog.

aiolimiter's default bucket lets R requests through at once, so 2R can land in one second.
A bucket of capacity 1 cannot land more than R+1, but every late timer wake-up (1 ms is
common) is lost for good, which costs 10-40% of the rate above a few hundred per second.
So the bucket here holds 20 ms worth of requests, enough to catch up lateness, and a
sliding-window log of the last R send times is the hard guarantee: a request leaves only
when the R-th previous one is more than ``window`` seconds old. ``window`` is a little over
one second so that jitter between send and arrival cannot push the server's count over R+1.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

CATCH_UP_SECONDS = 0.02
WINDOW_SECONDS = 1.02
DECREASE_FACTOR = 0.7  # on overload: cut the rate by 30% ...
DECREASE_GAP = 0.25  # ... at most every 250 ms (a burst of 429s is one signal) ...
OVERLOAD_SHARE = 0.1  # ... when 10% of the last second's answers were 429/503 ...
INCREASE_SHARE = 0.02  # ... and win back 2% of the configured rate each calm second.


class _ShareWindow:
    """Share of 429/503 answers over the last second, in ten 100 ms buckets (O(1) a call)."""

    __slots__ = ("_bad", "_ok", "_tick")

    def __init__(self) -> None:
        self._ok = [0] * 10
        self._bad = [0] * 10
        self._tick = 0

    def add(self, now: float, throttled: bool) -> None:
        tick = self._advance(now)
        if throttled:
            self._bad[tick % 10] += 1
        else:
            self._ok[tick % 10] += 1

    def share(self, now: float) -> float:
        self._advance(now)
        bad = sum(self._bad)
        total = bad + sum(self._ok)
        return bad / total if total else 0.0

    def _advance(self, now: float) -> int:
        tick = int(now * 10)
        for t in range(max(self._tick + 1, tick - 9), tick + 1):
            self._ok[t % 10] = self._bad[t % 10] = 0
        self._tick = max(self._tick, tick)
        return tick


class Pacer:
    """Paces requests to ``rate`` per second and holds them all while the server asks us to.

    Every 429/503 pauses the whole client for its Retry-After. The rate also adapts (AIMD)
    when the server is overloaded, i.e. when at least 10% of the last second's answers were
    429/503 (a few scattered ones are the server's noise, not a signal to slow down): it drops
    by 30% at most every 250 ms, and each calm second wins back 2% of the configured rate,
    so the client settles just under what the server can take instead of hammering or
    stalling.
    """

    def __init__(self, rate: float, *, window: float = WINDOW_SECONDS) -> None:
        self._loop = asyncio.get_running_loop()
        self._window = window
        self._paused_until = 0.0
        self.max_rate = rate
        self._min_rate = min(1.0, rate)
        self._step = max(rate * INCREASE_SHARE, 0.1)
        self._last_change = self._loop.time()
        self._last_decrease = -DECREASE_GAP
        self._sent: deque[float] = deque()
        self._answers = _ShareWindow()
        self._set_rate(rate)

    def _set_rate(self, rate: float) -> None:
        self.rate = rate
        burst = max(1, math.ceil(rate * CATCH_UP_SECONDS))
        # Created inside the running loop (AsyncLimiter binds to the loop on first use).
        self._bucket = AsyncLimiter(burst, burst / rate)
        # Keeps the most recent send times, so a lower rate binds at once.
        self._sent = deque(self._sent, maxlen=max(1, math.floor(rate)))
        self._last_change = self._loop.time()

    def answered(self) -> None:
        """One answer that was not a 429/503 (for the overload share)."""
        self._answers.add(self._loop.time(), False)

    def throttled(self, retry_after: float) -> None:
        """The server said 429/503: pause everyone, and lower the rate if it is overloaded."""
        self.pause(retry_after)
        now = self._loop.time()
        self._answers.add(now, True)
        if (
            now - self._last_decrease >= DECREASE_GAP
            and self.rate > self._min_rate
            and self._answers.share(now) >= OVERLOAD_SHARE
        ):
            self._last_decrease = now
            self._set_rate(max(self._min_rate, self.rate * DECREASE_FACTOR))

    def _recover(self, now: float) -> None:
        if self.rate < self.max_rate and now - self._last_change >= 1.0:
            calm = now - self._last_decrease >= 1.0
            if calm:
                self._set_rate(min(self.max_rate, self.rate + self._step))

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (Retry-After applies to the whole client)."""
        self._paused_until = max(self._paused_until, self._loop.time() + seconds)

    async def acquire(self) -> None:
        """Wait until one more request may be sent now."""
        await self._wait_pause()
        self._recover(self._loop.time())
        await self._bucket.acquire()
        while True:
            sent = self._sent  # re-read: a rate change replaces it
            now = self._loop.time()
            if now < self._paused_until:
                await self._wait_pause()
                continue
            if len(sent) < (sent.maxlen or 1) or now - sent[0] >= self._window:
                sent.append(now)
                return
            await asyncio.sleep(sent[0] + self._window - now)

    async def _wait_pause(self) -> None:
        # A loop, not an Event: a later 429 may push the deadline out while we sleep.
        while (left := self._paused_until - self._loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)
