"""Live progress on stderr: a rich bar on a terminal, a periodic log line otherwise.

It only reads ``RunStats``; it never touches the hot path. Schedulers and pipelines get quiet,
greppable lines every ``interval`` seconds instead of terminal escape codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from .metrics import RunStats

log = logging.getLogger("harvester")
_REFRESH_SECONDS = 0.25


class Progress:
    """Shows ids done/total, completions/s, outcomes, requests in flight and an ETA."""

    def __init__(
        self,
        stats: RunStats,
        *,
        total: int,
        enabled: bool = True,
        interval: float = 10.0,
        note: Callable[[], str] = str,
    ) -> None:
        self._stats = stats
        self._note = note  # why requests are held, if they are ("paused 180 s: ...")
        self._total = max(total, 1)
        self._interval = interval
        self._console = Console(stderr=True)
        self._bar = enabled and self._console.is_terminal
        self._quiet = interval <= 0  # a --workers child: the parent shows the progress
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if not self._quiet:
            self._task = asyncio.create_task(self._show_bar() if self._bar else self._log_lines())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()

    def line(self) -> str:
        """One line of status, for logs."""
        s = self._stats
        done = s.finished + s.already_done
        total = max(self._total, s.unique_ids, done)
        return (
            f"ids {done}/{total} (completed {s.completed}, failed {s.failed}, "
            f"invalid {s.invalid}, unresolved {s.unresolved}, skipped {s.already_done}) "
            f"requests {s.requests} ({self._rate(s.requests):.0f}/s) in flight {s.in_flight}"
            + (f"; {note}" if (note := self._note()) else "")
        )

    def _rate(self, count: int) -> float:
        return count / max(time.monotonic() - self._started, 1e-9)

    async def _log_lines(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            log.info("%s", self.line())

    async def _show_bar(self) -> None:
        columns = (
            TextColumn("[bold]harvest"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} ids"),
            TextColumn("{task.fields[speed]} done/s"),
            TextColumn("{task.fields[outcomes]}"),
            TextColumn("in flight {task.fields[in_flight]}"),
            TextColumn("[yellow]{task.fields[note]}"),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, console=self._console, transient=False) as bar:
            task = bar.add_task(
                "harvest", total=self._total, speed="0", outcomes="", in_flight=0, note=""
            )
            with contextlib.suppress(asyncio.CancelledError):
                while True:
                    self._update(bar, task)
                    await asyncio.sleep(_REFRESH_SECONDS)
            self._update(bar, task, final=True)

    def _update(self, bar: RichProgress, task: object, *, final: bool = False) -> None:
        s = self._stats
        done = s.finished + s.already_done
        # The line count is an estimate (duplicates, blank lines); at the end, the truth.
        total = done if final else max(self._total, s.unique_ids, done)
        outcomes = f"✓{s.completed} ✗{s.failed} ?{s.invalid} …{s.unresolved}"
        bar.update(
            task,  # type: ignore[arg-type]
            completed=done,
            total=total,
            speed=f"{self._rate(s.finished):.0f}",
            outcomes=outcomes,
            in_flight=s.in_flight,
            note=self._note(),
        )


def setup_logging(verbose: bool = False) -> None:
    """One-line logs on stderr; quiet unless something happens or ``verbose``."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s harvester %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
