"""Clocks for timing logic tested without the wall clock.

``FakeClock`` is time a test moves by hand (injected where a ``clock`` is taken).
``VirtualTimeLoop`` is an event loop whose clock jumps to the next timer whenever nothing is
ready, so ten simulated seconds of pacing run in milliseconds and every expectation can be
exact. (looptime does the same as a pytest plugin; this is the dozen lines the tests need,
without its global hooks.)
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")
_TICK = 1e-6  # a timer due now or earlier fires one tick later, so time always moves


class FakeClock:
    """A clock the test moves by hand: windows, ready times and deadlines need no sleeping."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Selector(selectors.DefaultSelector):
    """Polls real I/O without waiting; the wait it was asked for moves virtual time instead."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)  # real I/O first (there is none in these tests)
        if not ready and timeout:
            self._advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``time()`` is virtual: waiting for a timer costs no real time."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_Selector(self._advance))

    def _advance(self, seconds: float) -> None:
        self._now += seconds

    def time(self) -> float:
        return self._now

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return super().call_at(max(when, self._now + _TICK), callback, *args, context=context)


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def virtual_time(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Make an async test run on virtual time (a plain test to pytest, so pytest-asyncio
    leaves it alone; parameters and docstring are kept)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        run_virtual(test(*args, **kwargs))

    return run
