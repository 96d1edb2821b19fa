"""How a run stops on SIGINT/SIGTERM: the first signal stops polling and lets the requests in
flight end within a grace period, the second stops at once; committed rows are kept either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger("harvester")

STOP_GRACE_SECONDS = 10.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Signal handlers for one run, installed from its start (a signal while it loads counts).

    ``attach`` names what to call once the harvest is under way: ``stop`` (no more polls),
    ``cancel`` (end the harvest now) and ``finished`` (every id is terminal already).
    """

    def __init__(self, grace: float = STOP_GRACE_SECONDS) -> None:
        self.count = 0  # signals received
        self._grace = grace
        self._stop: Callable[[], None] | None = None
        self._cancel: Callable[[], Any] | None = None
        self._finished: Callable[[], bool] = lambda: False
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.received, sig)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        self.disarm()

    def attach(
        self, *, stop: Callable[[], None], cancel: Callable[[], Any], finished: Callable[[], bool]
    ) -> None:
        """The harvest has started; a signal that came before it stops it now."""
        self._stop, self._cancel, self._finished = stop, cancel, finished
        if self.count:
            stop()

    def disarm(self) -> None:
        """The harvest has ended: no grace deadline is left to fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def received(self, sig: signal.Signals) -> None:
        """First signal: stop polling, let in-flight requests end (bounded). Second: now."""
        if self._finished():
            # Every id is already terminal: only the final commit is left, and it is short.
            log.warning("%s: all ids are done; finishing the last commit", sig.name)
            return
        self.count += 1
        if self._stop is None or self._cancel is None:
            log.warning("%s: stopping before the first request", sig.name)
            return
        if self.count == 1:
            log.warning(
                "%s: finishing in-flight requests (up to %.0f s), then committing; "
                "signal again to stop at once",
                sig.name,
                self._grace,
            )
            self._stop()
            self._timer = asyncio.get_running_loop().call_later(self._grace, self._cancel)
        else:
            log.warning("%s again: stopping now; committed rows are kept", sig.name)
            self._cancel()
