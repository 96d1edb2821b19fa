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


class Pacer:
    """Paces requests to ``rate`` per second and holds them all while the server asks us to."""

    def __init__(self, rate: float, *, window: float = WINDOW_SECONDS) -> None:
        burst = max(1, math.ceil(rate * CATCH_UP_SECONDS))
        # Created inside the running loop (AsyncLimiter binds to the loop on first use).
        self._bucket = AsyncLimiter(burst, burst / rate)
        self._sent: deque[float] = deque(maxlen=max(1, math.floor(rate)))
        self._window = window
        self._paused_until = 0.0
        self._loop = asyncio.get_running_loop()
        self.rate = rate

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (Retry-After applies to the whole client)."""
        self._paused_until = max(self._paused_until, self._loop.time() + seconds)

    @property
    def paused_for(self) -> float:
        """Seconds left in the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._loop.time())

    async def acquire(self) -> None:
        """Wait until one more request may be sent now."""
        await self._wait_pause()
        await self._bucket.acquire()
        sent = self._sent
        while True:
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
