"""Request pacing: at most R+1 requests reach the server in any second, close to R sustained.

aiolimiter's default bucket lets R requests through at once, so 2R can land in one second.
A bucket of capacity 1 cannot land more than R+1, but every late timer wake-up (1 ms is
common) is lost for good, which costs 10-40% of the rate above a few hundred per second.
So the bucket here holds 20 ms worth of requests, enough to catch up lateness, and a
sliding-window log of the last R+1 send times is the hard guarantee: a request leaves only
when the (R+1)-th previous one is at least ``window`` seconds old. ``window`` is one second
plus ``JITTER_SECONDS``: deliveries that bunch by up to that much (a loaded machine or
network) still land at most R+1 in any second at the server, and R / 1.05 is 0.95 R.

The rate and the client-wide pause come from the ``ThrottleController`` (``throttle.py``);
this module only enforces them: the log always at ``--rate``, the bucket at the controller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from aiolimiter import AsyncLimiter

from .throttle import PROBES, Answer, ThrottleController

CATCH_UP_SECONDS = 0.02
JITTER_SECONDS = 0.05
WINDOW_SECONDS = 1.0 + JITTER_SECONDS
# A new bucket starts empty, so it is made only when the rate has grown by 2% (CUBIC moves it
# a little on every request) or has been cut: one made per request would never hold anyone.
RATE_STEP = 0.02


class Pacer:
    """Lets requests go at the controller's rate; holds them all while it says pause."""

    def __init__(
        self,
        rate: float,
        *,
        window: float = WINDOW_SECONDS,
        controller: ThrottleController | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._window = window
        self.controller = controller or ThrottleController(rate, clock=self._loop.time)
        # The log holds --rate, the user's contract, whatever the controller does; a cut rate
        # is the bucket's to keep. (A log shrunk to a cut rate would still hold the last
        # second's sends at the old rate, and stop every request until they age out.)
        self._sent: deque[float] = deque(maxlen=math.floor(rate) + 1)
        self._woken = asyncio.Event()  # set (and replaced) when a probe comes back
        self._set_rate(self.controller.rate)

    @property
    def rate(self) -> float:
        """Requests per second allowed now."""
        return self._rate

    def _set_rate(self, rate: float) -> None:
        self._rate = rate
        burst = max(1, math.ceil(rate * CATCH_UP_SECONDS))
        # Created inside the running loop (AsyncLimiter binds to the loop on first use).
        self._bucket = AsyncLimiter(burst, burst / rate)

    async def acquire(self) -> int:
        """Wait until one more request may be sent now; its probe round if it goes as a probe
        (pass it to ``record``), else 0. Probes keep the log and the bucket like any other."""
        control = self.controller
        while True:
            control.tick()
            if abs(control.rate - self._rate) > RATE_STEP * self._rate or (
                control.rate < self._rate and control.rate != self._rate
            ):
                self._set_rate(control.rate)
            if control.probing:
                left = control.paused_until - self._loop.time()
                if left > 0:
                    # Until the pause ends, or an accepted probe (still out from before it)
                    # ends it early; a later answer may push it out instead: loop.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._woken.wait(), left)
                    continue
                if control.probes_out >= PROBES:
                    await self._woken.wait()  # the probes are out; wait for one to come back
                    continue
            # The log first, the bucket last: the bucket spaces requests right before they
            # go. (The other way round, requests spaced by the bucket queue up behind a full
            # log and leave in a burst when it frees, copying the last second's bunching.)
            if (wait := self._log_wait()) > 0:
                await asyncio.sleep(wait)
                continue
            bucket = self._bucket
            await bucket.acquire()
            if bucket is not self._bucket or self._log_wait() > 0:
                continue  # the rate changed, or another took the room, meanwhile: again
            # From here to the return nothing awaits: a cancel cannot leave a probe counted.
            if control.probing:
                if control.paused_until > self._loop.time():
                    continue  # a pause began while this one waited its turn
                probe = control.may_probe()
                if not probe:
                    continue
            else:
                probe = 0
            self._sent.append(self._loop.time())
            return probe

    def _log_wait(self) -> float:
        """Seconds until the sliding log has room for one more send (<= 0: room now)."""
        sent = self._sent
        if len(sent) < (sent.maxlen or 1):
            return 0.0
        # One subtraction decides both whether to go and how long to wait: two that could
        # disagree in the last bit would spin on sleep(0).
        return sent[0] + self._window - self._loop.time()

    def record(self, answer: Answer, retry_after: float | None = None, *, probe: int) -> None:
        """Tell the controller how a request ended (``probe``: what ``acquire`` returned)."""
        self.controller.record(answer, retry_after, probe=probe)
        if probe:
            self._woken.set()
            self._woken = asyncio.Event()

    def paused_seconds(self) -> float:
        """Seconds every request was held so far."""
        return self.controller.paused_seconds()

    def note(self) -> str:
        """Why requests are held, for the progress line ("" when they are not)."""
        control = self.controller
        if not control.probing:
            return ""
        left = control.paused_until - self._loop.time()
        if left > 0:
            return f"{control.note} ({left:.0f} s left)"
        return "probing: the rate resumes when one of a few requests is accepted"
