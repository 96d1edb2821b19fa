"""One harvest run: wires input, scheduler, pacer, client, sink and report inside the loop.

The limiter, transport and sink are created here, inside the running loop and once per run;
an aiohttp session can be injected so tests can replace the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from .allocator import fix_malloc_thresholds
from .bigbody import BigBodies
from .client import CompletionsClient
from .collector import quiet_collector
from .compact import CompactSettings, compact, roll_forward
from .dataset import check_layout, committed_files, load_done
from .errors import ExitCode, InputError, OutputError, UsageError, end_code
from .exporter import MetricsServer, run_snapshot, serve_metrics
from .http1 import Http1Transport
from .ids import Batch, IdReader
from .idset import DoneSet, IdSet
from .lean import skip_pandas_probe
from .lease import RunLease, clean_stale_temporaries
from .looplag import LoopLagMonitor
from .metrics import STOPPED, RunStats
from .open_files import ensure_open_files
from .pacer import Pacer
from .progress import Progress
from .report import RunResult, explain_unresolved, new_run_id, save_report
from .scheduler import Policy, Scheduler
from .settings import RunSettings
from .sink import ParquetSink, commit_empty
from .stopping import StopSignals
from .storage import open_store
from .workers import report_counters

if TYPE_CHECKING:
    from aiohttp import ClientSession

log = logging.getLogger("harvester")


async def _batches_from(it: Iterator[Batch]) -> AsyncIterator[Batch]:
    """Pull batches in a worker thread so that reading the file never blocks the loop."""
    while (batch := await asyncio.to_thread(next, it, None)) is not None:
        yield batch


class Run:
    """State of one ``harvester run`` between start and summary."""

    def __init__(self, settings: RunSettings, session: ClientSession | None) -> None:
        self.settings = settings
        self.stats = RunStats()
        self.run_id = new_run_id()
        self._session = session
        self._signals = StopSignals()
        self._scheduler: Scheduler | None = None
        self._pacer: Pacer | None = None
        self._task: asyncio.Task[None] | None = None
        self.metrics: MetricsServer | None = None  # /metrics while harvesting (--metrics-port)
        self.store = open_store(settings.out_dir)  # a local DIR or an object store
        self._lease = RunLease(self.store, self.run_id, settings.shard, ttl=settings.lease_ttl)

    async def execute(self) -> RunResult:
        """Harvest, commit and report; the session is closed only if this run opened it."""
        try:
            with self._signals:  # from the start: a SIGTERM while loading still ends cleanly
                reader, batches, total, done = await asyncio.to_thread(self._prepare)
                if self._signals.count:
                    reader.close()
                    return self._finish(0.0)
                return await self._run_prepared(batches, total, done)
        finally:
            self._lease.release()

    async def _run_prepared(self, batches: Iterator[Batch], total: int, done: DoneSet) -> RunResult:
        s = self.settings
        transport = self._open_transport()
        started = time.monotonic()
        sink = ParquetSink(
            self.store, run_id=self.run_id, flush_rows=s.flush_rows, flush_bytes=s.flush_bytes
        )
        try:
            await self._harvest(transport, sink, _batches_from(batches), done, total)
        finally:
            if transport is not self._session:  # an injected session is its owner's to close
                await transport.close()
        if s.compact and not self._signals.count and self._scheduler_ok():
            await asyncio.to_thread(self._compact_own_files)
        return self._finish(time.monotonic() - started)

    def _open_transport(self) -> Http1Transport | ClientSession:
        """The injected session if any, else what ``--transport`` names (made in the loop)."""
        s = self.settings
        if self._session is not None:
            return self._session
        if s.transport == "aiohttp":
            from .session import make_session  # aiohttp's client is loaded only for it

            return make_session(
                s.token,
                limit=s.concurrency,
                connect_timeout=s.connect_timeout,
                request_timeout=s.request_timeout,
            )
        return Http1Transport(
            s.endpoint_url,
            token=s.token,
            max_body_bytes=s.max_body_bytes,
            connect_timeout=s.connect_timeout,
            request_timeout=s.request_timeout,
        )

    def _scheduler_ok(self) -> bool:
        return self._scheduler is not None and self._scheduler.fatal is None

    def _compact_own_files(self) -> None:
        """``--compact``: merge this run's files, still under its lease; a compaction
        already running elsewhere is no failure (this run's files wait for the next one)."""
        try:
            result = compact(
                self.store, CompactSettings(only_run=self.run_id, lease_ttl=self.settings.lease_ttl)
            )
        except UsageError as exc:
            log.warning("not compacting: %s", exc)
            return
        log.info(
            "compacted this run's files: %d rows merged; %d data files before, %d after",
            result.rows_merged,
            result.files_before,
            result.files_after,
        )

    def _prepare(self) -> tuple[IdReader, Iterator[Batch], int, DoneSet]:
        """Blocking start-up, in a thread: check the input, lock the shard, load what is done."""
        s = self.settings
        skip_pandas_probe()  # lean.py: ~60 MiB and a GIL-holding import kept out of the run
        ensure_open_files(s.concurrency)
        reader = IdReader(s.ids_path, id_column=s.id_column, strict=s.strict)
        batches = reader.open()
        try:
            # Before anything is made on disk: a file with no id at all is a usage error
            # (exit 2) that leaves no trace in DIR.
            first = next(batches, None)
            if first is None:
                raise InputError(f"{s.ids_path}: no ids after the header; give at least one id")
            batches = itertools.chain([first], batches)
            total = reader.count_lines()
            check_layout(self.store)
            self._lease.acquire()
            files = committed_files(self.store)  # listed once: a big DIR has many
            if not files:
                # Right after the lease (which makes DIR/_harvester/, and without which another
                # run would take this file's temporary for a dead run's): from now on, whatever
                # happens (a signal while loading, kill -9), the DIR opens in every reader.
                commit_empty(self.store, self.run_id, time.time())
            removed = clean_stale_temporaries(self.store)
            if roll_forward(self.store):  # a killed compaction's inputs, kept in its output
                files = committed_files(self.store)
            if removed:
                log.info("removed %d temporary files left by stopped runs", removed)
            done = load_done(self.store, s.shard, files)
        except BaseException:
            reader.close()
            self._lease.release()
            raise
        return reader, batches, max(1, round(total / s.shard.count)), done

    async def _harvest(
        self,
        transport: Http1Transport | ClientSession,
        sink: ParquetSink,
        batches: AsyncIterator[Batch],
        done: DoneSet,
        total: int,
    ) -> None:
        s = self.settings
        client = CompletionsClient(
            transport,
            s.endpoint_url,
            token=s.token,
            max_body_bytes=s.max_body_bytes,
            retry_after_max=s.retry_after_max,
            big_bodies=(big := BigBodies()),
        )
        pacer = self._pacer = Pacer(s.rate)
        scheduler = self._scheduler = Scheduler(
            client=client,
            pacer=pacer,
            sink=sink,
            stats=self.stats,
            policy=Policy.of(s),
            concurrency=s.concurrency,
            max_in_play=in_play_cap(s),
            shard=s.shard,
        )
        interval = 0.0 if s.worker_stats else s.log_interval
        input_read = scheduler.input_read  # from then on, progress shows the exact total
        progress = Progress(
            self.stats,
            total=total,
            enabled=s.progress,
            interval=interval,
            note=pacer.note,
            input_read=input_read,
        )
        live = functools.partial(run_snapshot, self.stats, pacer, scheduler)  # for /metrics
        # A --workers child never serves: its parent does, for the whole run.
        port = None if s.worker_stats else s.metrics_port
        self.metrics = serve_metrics(s.metrics_host, port, live)  # first: a busy port stops here
        flusher = asyncio.create_task(sink.commit_periodically(s.flush_interval))
        flusher.add_done_callback(self._on_flusher_done)
        reporter = (
            asyncio.create_task(report_counters(self.stats, live, input_read))
            if s.worker_stats
            else None
        )
        lag = asyncio.create_task(LoopLagMonitor(self.stats.loop_lag).watch())
        fix_malloc_thresholds()  # freed buffers go back to the system (allocator.py)
        try:
            with progress, quiet_collector():
                await self._run_scheduler(scheduler, batches, done)
            await sink.flush()
        finally:
            big.close()
            if self.metrics is not None:
                self.metrics.close()
            for task in (flusher, reporter, lag):
                if task is not None:
                    task.cancel()
                    # A failed commit ended the flusher: settle raises it just below.
                    with contextlib.suppress(asyncio.CancelledError, OutputError):
                        await task
            try:
                # A write back-pressure handed over may still run: it ends (or its failure
                # is raised) before the files are counted and the lease is released.
                await sink.settle()
            finally:
                # Stopped early: no row, and the next run polls them.
                self.stats.count_unresolved(STOPPED, scheduler.in_play)
                self.stats.rows_written = sink.rows_written
                self.stats.files_written = sink.files_written
                self.stats.paused_s = pacer.paused_seconds()
                for start, end in pacer.controller.pauses(asyncio.get_running_loop().time()):
                    self.stats.timeline.add_pause(start, end, pacer.rate)

    async def _run_scheduler(
        self, scheduler: Scheduler, batches: AsyncIterator[Batch], done: DoneSet
    ) -> None:
        task = self._task = asyncio.create_task(scheduler.run(batches, IdSet(), done))
        self._signals.attach(stop=scheduler.stop, cancel=task.cancel, finished=task.done)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled from outside, not by a stop deadline
        finally:
            self._signals.disarm()

    def _on_flusher_done(self, task: asyncio.Task[None]) -> None:
        """A commit failed (disk full, say): stop now rather than harvest what cannot be kept."""
        if not task.cancelled() and task.exception() is not None:
            log.error("committing rows failed: %s; stopping", task.exception())
            if self._task is not None:
                self._task.cancel()

    def _finish(self, elapsed: float) -> RunResult:
        fatal = self._scheduler.fatal if self._scheduler else None
        code = end_code(
            fatal=fatal, interrupted=bool(self._signals.count), unresolved=self.stats.unresolved
        )
        if fatal is not None:
            message: str | None = str(fatal)
        elif self._signals.count:
            message = "interrupted; rerun the same command to resume"
        elif code is ExitCode.UNRESOLVED and not self.settings.worker_stats:
            # A --workers child stays quiet: its parent says it once for all of them.
            message = explain_unresolved(self.stats.unresolved_reasons, self.settings)
        else:
            message = None
        summary = self.stats.summary(
            elapsed,
            run_id=self.run_id,
            shard=str(self.settings.shard),
            out=str(self.settings.out_dir),
            exit_code=int(code),
        )
        if self.settings.worker_stats:
            summary["latency_buckets"] = self.stats.latency.buckets()
            if fatal is not None:  # every worker meets it: the parent says it once for all
                summary["fatal"], message = message, None
        save_report(self.store, self.run_id, summary)
        timeline = self.stats.timeline.as_dict()
        save_report(self.store, self.run_id, timeline, folder="timelines")
        return RunResult(code, summary, message)


def in_play_cap(s: RunSettings) -> int:
    """Ids to keep in play: --max-in-play, but no more than the rate can poll in time.

    Every id in play may be queued behind all the others, about in_play / rate seconds; an
    id should get a handful of polls before --max-wait, so a slow --rate keeps fewer in play.
    """
    affordable = int(s.rate * s.max_wait / 5)
    return max(s.concurrency, min(s.max_in_play, affordable))


async def harvest(settings: RunSettings, *, session: ClientSession | None = None) -> RunResult:
    """Run one harvest to the end and return its exit code and summary."""
    return await Run(settings, session).execute()
