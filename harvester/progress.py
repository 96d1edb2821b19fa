"""Live progress on stderr (a rich bar on a terminal, a periodic log line otherwise) and the
log setup: text or JSON lines, a level, ``--quiet``, and the token masked in every line.

Progress only reads ``RunStats``; it never touches the hot path. Schedulers and pipelines get
quiet, greppable lines every ``interval`` seconds instead of terminal escape codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from .errors import UsageError
from .metrics import RunStats

log = logging.getLogger("harvester")
_REFRESH_SECONDS = 0.25


class Progress:
    """Shows ids done/total, completions/s, outcomes, requests in flight and an ETA.

    ``total`` is an estimate (the input's lines: duplicates and invalid lines count too),
    shown as ``~N`` until ``input_read()`` says the whole input has been read; from then on
    the total is the exact count of unique ids (``RunStats.unique_ids``).
    """

    def __init__(
        self,
        stats: RunStats,
        *,
        total: int,
        enabled: bool = True,
        interval: float = 10.0,
        note: Callable[[], str] = str,
        input_read: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stats = stats
        self._note = note  # why requests are held, if they are ("paused 180 s: ...")
        self._input_read = input_read
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

    def totals(self) -> tuple[int, int, bool]:
        """Ids done, the ids total, and whether that total is exact (not an estimate)."""
        s = self._stats
        done = s.finished + s.already_done
        if self._input_read():
            return done, max(s.unique_ids, done), True
        return done, max(self._total, s.unique_ids, done), False

    def line(self) -> str:
        """One line of status, for logs."""
        s = self._stats
        done, total, exact = self.totals()
        about = "" if exact else "~"
        return (
            f"ids {done}/{about}{total} (completed {s.completed}, failed {s.failed}, "
            f"invalid {s.invalid}, unresolved {s.unresolved}, skipped {s.already_done}) "
            f"requests {s.requests} ({self._rate(s.requests):.0f}/s) in flight {s.in_flight}"
            + (f"; {note}" if (note := self._note()) else "")
        )

    def _rate(self, count: int) -> float:
        return count / max(time.monotonic() - self._started, 1e-9)

    def fields(self) -> dict[str, int | bool]:
        """The progress line's figures, as fields of a JSON log line."""
        s = self._stats
        done, total, exact = self.totals()
        return {
            "ids_done": done,
            "ids_total": total,
            "ids_total_exact": exact,
            "completed": s.completed,
            "failed": s.failed,
            "invalid": s.invalid,
            "unresolved": s.unresolved,
            "skipped": s.already_done,
            "requests": s.requests,
            "in_flight": s.in_flight,
        }

    async def _log_lines(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if log.isEnabledFor(logging.INFO):  # not with --quiet
                log.info("%s", self.line(), extra=self.fields())

    async def _show_bar(self) -> None:
        columns = (
            TextColumn("[bold]harvest"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.fields[approx]}{task.total:.0f} ids"),
            TextColumn("{task.fields[speed]} done/s"),
            TextColumn("{task.fields[outcomes]}"),
            TextColumn("in flight {task.fields[in_flight]}"),
            TextColumn("[yellow]{task.fields[note]}"),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, console=self._console, transient=False) as bar:
            task = bar.add_task(
                "harvest",
                total=self._total,
                approx="~",
                speed="0",
                outcomes="",
                in_flight=0,
                note="",
            )
            with contextlib.suppress(asyncio.CancelledError):
                while True:
                    self._update(bar, task)
                    await asyncio.sleep(_REFRESH_SECONDS)
            self._update(bar, task, final=True)

    def _update(self, bar: RichProgress, task: object, *, final: bool = False) -> None:
        s = self._stats
        done, total, exact = self.totals()
        if final:
            total, exact = done, True  # at the end, the truth
        outcomes = f"✓{s.completed} ✗{s.failed} ?{s.invalid} …{s.unresolved}"
        bar.update(
            task,  # type: ignore[arg-type]
            completed=done,
            total=total,
            approx="" if exact else "~",
            speed=f"{self._rate(s.finished):.0f}",
            outcomes=outcomes,
            in_flight=s.in_flight,
            note=self._note(),
        )


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How a command logs: the one place these defaults live (``run`` and ``bench`` share it)."""

    log_format: str = "text"  # text: one readable line; json: one JSON object a line
    log_level: str = "info"
    quiet: bool = False  # only warnings and errors, and no progress bar

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")

    @property
    def level(self) -> int:
        """The logging level to let through: at least WARNING when quiet."""
        level = logging.getLevelNamesMapping()[self.log_level.upper()]
        return max(level, logging.WARNING) if self.quiet else level


# Values that must never reach a log line (the API token): replaced by "***" in every record.
_SECRETS: set[str] = set()
# Shorter values are not masked: a token of one or a few characters (a test's "t") would turn
# every line into "harves***er ... comple***ed", and guessing it takes no log line anyway.
MIN_SECRET_CHARS = 6


def hide_in_logs(secret: str) -> None:
    """Mask ``secret`` in every log line from now on, whichever code logs it."""
    if len(secret) >= MIN_SECRET_CHARS:
        _SECRETS.add(secret)
        _SECRETS.add(orjson.dumps(secret).decode()[1:-1])  # as it reads inside a JSON string


def _redact(text: str) -> str:
    # Longest first: a secret that contains another is masked whole, not around the other.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class TextFormatter(logging.Formatter):
    """``2026-12-02T01:02:03 harvester INFO message``: one greppable line a record."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s harvester %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


# Attributes every LogRecord has: anything else on a record came from ``extra=`` (a field).
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``timestamp`` (UTC, ISO 8601), ``level``, ``event``, ``logger``
    and the record's ``extra=`` fields, for log search (Loki, CloudWatch, Elasticsearch)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "timestamp": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _redact(orjson.dumps(entry, default=str).decode())


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when it was set up: a
    caller that swaps stderr (a test capturing it, a daemon redirecting it) is followed, and a
    stream closed since is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always sys.stderr


def setup_logging(settings: LogSettings | None = None) -> None:
    """Log lines on stderr in the chosen format and level; replaces what an earlier call set.

    The handler sits on the root logger so that library warnings (asyncio, aiohttp) come out
    in the same format; only harvester's own logger goes below WARNING.
    """
    settings = settings or LogSettings()
    handler = _StderrHandler()
    handler.set_name("harvester")
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.setLevel(settings.level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "harvester"]:
        root.removeHandler(old)
    root.addHandler(handler)
    log.setLevel(settings.level)
