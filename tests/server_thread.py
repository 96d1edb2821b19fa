"""A test server on its own event loop in a daemon thread, for tests whose code under test
blocks (the CLI, ``asyncio.run``) or runs in a child process."""

from __future__ import annotations

import asyncio
import threading
from typing import Self


class ServerThread:
    """``with`` starts the server and waits until it listens; leaving stops it.

    Subclasses implement ``_serve``: start listening, call ``self._ready.set()``, then await
    ``stop`` and clean up.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    async def _serve(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        async def run() -> None:
            self._stop = asyncio.Event()
            await self._serve(self._stop)

        self._loop.run_until_complete(run())
        self._loop.close()

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
