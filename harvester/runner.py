"""One harvest run: wires input, scheduler, client, sink and report together inside the loop.

The limiter, session and sink are created here, inside the running loop and once per run;
a session can be injected so tests can replace the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .client import CompletionsClient, make_session
from .dataset import META_DIR, load_done
from .errors import InputError, SinkError
from .ids import Batch, IdReader
from .idset import DoneSet, IdSet
from .lease import RunLease, clean_stale_temporaries
from .limits import ensure_open_files
from .metrics import RunStats
from .progress import Progress
from .scheduler import Policy, Scheduler
from .settings import RunSettings
from .sink import ParquetSink, new_run_id
from .throttle import Pacer

log = logging.getLogger("harvester")

EXIT_OK = 0
EXIT_UNRESOLVED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 130
STOP_GRACE_SECONDS = 10.0


@dataclass
class RunResult:
    """What the command line needs: an exit code, the summary, and the abort reason if any."""

    exit_code: int
    summary: dict[str, Any]
    message: str | None = None


async def _batches_from(it: Iterator[Batch]) -> AsyncIterator[Batch]:
    """Pull batches in a worker thread so that reading the file never blocks the loop."""
    while (batch := await asyncio.to_thread(next, it, None)) is not None:
        yield batch


async def _first_batch_checked(it: Iterator[Batch], path: Path) -> AsyncIterator[Batch]:
    """Like ``_batches_from``, but a file with no id at all is a usage error (exit 2)."""
    first = await asyncio.to_thread(next, it, None)
    if first is None:
        raise InputError(f"{path}: no ids after the header; give at least one id")
    yield first
    async for batch in _batches_from(it):
        yield batch


class Run:
    """State of one ``harvester run`` between start and summary."""

    def __init__(self, settings: RunSettings, session: aiohttp.ClientSession | None) -> None:
        self.settings = settings
        self.stats = RunStats()
        self.run_id = new_run_id()
        self._session = session
        self._interrupted = 0
        self._scheduler: Scheduler | None = None
        self._task: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._lease = RunLease(settings.out_dir, self.run_id, settings.shard)

    async def execute(self) -> RunResult:
        """Harvest, commit and report; the session is closed only if this run opened it."""
        self._install_signals()  # from the start: a SIGTERM while loading still ends cleanly
        try:
            reader, batches, total, done = await asyncio.to_thread(self._prepare)
            if self._interrupted:
                reader.close()
                return self._finish(0.0)
            return await self._run_prepared(batches, total, done)
        finally:
            self._remove_signals()
            self._lease.release()

    async def _run_prepared(self, batches: Iterator[Batch], total: int, done: DoneSet) -> RunResult:
        s = self.settings
        session = self._session or make_session(
            s.token,
            limit=s.concurrency,
            connect_timeout=s.connect_timeout,
            request_timeout=s.request_timeout,
        )
        started = time.monotonic()
        sink = ParquetSink(
            s.out_dir, run_id=self.run_id, flush_rows=s.flush_rows, flush_bytes=s.flush_bytes
        )
        try:
            await self._harvest(
                session, sink, _first_batch_checked(batches, s.ids_path), done, total
            )
        finally:
            if self._session is None:
                await session.close()
        return self._finish(time.monotonic() - started)

    def _prepare(self) -> tuple[IdReader, Iterator[Batch], int, DoneSet]:
        """Blocking start-up, in a thread: check the input, lock the shard, load what is done."""
        s = self.settings
        ensure_open_files(s.concurrency)
        reader = IdReader(s.ids_path, id_column=s.id_column, strict=s.strict)
        batches = reader.open()
        try:
            total = reader.count_lines()
            self._lease.acquire()
            removed = clean_stale_temporaries(s.out_dir)
            if removed:
                log.info("removed %d temporary files left by stopped runs", removed)
            done = load_done(s.out_dir, s.shard)
        except BaseException:
            reader.close()
            self._lease.release()
            raise
        return reader, batches, max(1, round(total / s.shard.count)), done

    async def _harvest(
        self,
        session: aiohttp.ClientSession,
        sink: ParquetSink,
        batches: AsyncIterator[Batch],
        done: DoneSet,
        total: int,
    ) -> None:
        s = self.settings
        client = CompletionsClient(
            session,
            s.endpoint,
            token=s.token,
            max_body_bytes=s.max_body_bytes,
            retry_after_max=s.retry_after_max,
            clock=asyncio.get_running_loop().time,
        )
        scheduler = self._scheduler = Scheduler(
            client=client,
            pacer=Pacer(s.rate),
            sink=sink,
            stats=self.stats,
            policy=Policy(
                poll_interval=s.poll_interval,
                max_poll_interval=s.max_poll_interval,
                max_wait=s.max_wait,
                max_retries=s.max_retries,
                backoff_base=s.backoff_base,
                backoff_max=s.backoff_max,
            ),
            concurrency=s.concurrency,
            max_in_play=in_play_cap(s),
            shard=s.shard,
        )
        interval = 0.0 if s.worker_stats else s.log_interval
        progress = Progress(self.stats, total=total, enabled=s.progress, interval=interval)
        flusher = asyncio.create_task(sink.commit_periodically(s.flush_interval))
        flusher.add_done_callback(self._on_flusher_done)
        reporter = asyncio.create_task(self._report_counters()) if s.worker_stats else None
        try:
            with progress:
                await self._run_scheduler(scheduler, batches, done)
            await sink.flush()
        finally:
            for task in (flusher, reporter):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self.stats.unresolved += scheduler.in_play  # stopped early: no row, next run polls
            self.stats.rows_written = sink.rows_written
            self.stats.files_written = sink.files_written

    async def _run_scheduler(
        self, scheduler: Scheduler, batches: AsyncIterator[Batch], done: DoneSet
    ) -> None:
        task = self._task = asyncio.create_task(scheduler.run(batches, IdSet(), done))
        if self._interrupted:
            scheduler.stop()  # a signal came between start-up and now
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled from outside, not by a stop deadline
        finally:
            if self._grace is not None:
                self._grace.cancel()

    async def _report_counters(self) -> None:
        """As a ``--workers`` child: counters as JSON lines on stdout for the parent's display."""
        while True:
            await asyncio.sleep(0.5)
            line = orjson.dumps({"progress": self.stats.counters()}) + b"\n"
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        """First signal: stop polling, let in-flight requests end (bounded). Second: now."""
        if self._task is not None and self._task.done():
            # Every id is already terminal: only the final commit is left, and it is short.
            log.warning("%s: all ids are done; finishing the last commit", sig.name)
            return
        self._interrupted += 1
        if self._scheduler is None:
            log.warning("%s: stopping before the first request", sig.name)
            return
        if self._interrupted == 1:
            log.warning(
                "%s: finishing in-flight requests (up to %.0f s), then committing; "
                "signal again to stop at once",
                sig.name,
                STOP_GRACE_SECONDS,
            )
            self._scheduler.stop()
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(STOP_GRACE_SECONDS, self._cancel_scheduler)
        else:
            log.warning("%s again: stopping now; committed rows are kept", sig.name)
            self._cancel_scheduler()

    def _on_flusher_done(self, task: asyncio.Task[None]) -> None:
        """A commit failed (disk full, say): stop now rather than harvest what cannot be kept."""
        if not task.cancelled() and task.exception() is not None:
            log.error("committing rows failed: %s; stopping", task.exception())
            self._cancel_scheduler()

    def _cancel_scheduler(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _finish(self, elapsed: float) -> RunResult:
        fatal = self._scheduler.fatal if self._scheduler else None
        if fatal is not None:
            code, message = EXIT_AUTH, str(fatal)
        elif self._interrupted:
            code, message = EXIT_INTERRUPTED, "interrupted; rerun the same command to resume"
        elif self.stats.unresolved:
            code, message = EXIT_UNRESOLVED, None
        else:
            code, message = EXIT_OK, None
        summary = self.stats.summary(
            elapsed,
            run_id=self.run_id,
            shard=str(self.settings.shard),
            out=str(self.settings.out_dir),
            exit_code=code,
        )
        if self.settings.worker_stats:
            summary["latency_buckets"] = self.stats.latency.buckets()
        save_report(self.settings.out_dir, self.run_id, summary)
        timeline = self.stats.timeline.as_dict()
        save_report(self.settings.out_dir, self.run_id, timeline, kind="timelines")
        return RunResult(code, summary, message)


def in_play_cap(s: RunSettings) -> int:
    """Ids to keep in play: --max-in-play, but no more than the rate can poll in time.

    Every id in play may be queued behind all the others, about in_play / rate seconds; an
    id should get a handful of polls before --max-wait, so a slow --rate keeps fewer in play.
    """
    affordable = int(s.rate * s.max_wait / 5)
    return max(s.concurrency, min(s.max_in_play, affordable))


def save_report(root: Path, run_id: str, summary: dict[str, Any], kind: str = "runs") -> None:
    """Keep the run's report beside the data, in a metadata path readers skip."""
    directory = root / META_DIR / kind
    tmp = directory / f".{run_id}.json.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        tmp.replace(directory / f"{run_id}.json")
    except OSError as exc:
        raise SinkError(f"cannot save the run report in {directory} ({exc.strerror})") from exc


async def harvest(
    settings: RunSettings, *, session: aiohttp.ClientSession | None = None
) -> RunResult:
    """Run one harvest to the end and return its exit code and summary."""
    return await Run(settings, session).execute()
