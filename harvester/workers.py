"""``--workers N``: N harvester processes on one machine, one merged progress and summary.

Each worker is an ordinary ``harvester run`` child on its own event loop and core, given
shard k of N (of the parent's shard, if any), 1/N of the rate, concurrency and ids in play.
Children report counters as JSON lines on stdout; the parent sums them for the progress
display and merges their final summaries (latency histograms merge exactly).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from .errors import ExitCode, worst_code
from .exporter import Snapshot, merge_snapshots, serve_metrics
from .ids import IdReader
from .metrics import LOOP_LAG_KEYS, RunStats
from .progress import Progress
from .report import RunResult, explain_unresolved, new_run_id, save_report
from .settings import RunSettings
from .shard import Shard

# The counters a child reports, summed across workers (in flight is a live figure, not a total).
_SUMMED = tuple(name for name in RunStats().counters() if name != "in_flight")
REPORT_INTERVAL = 0.5  # seconds between a child's counter lines
# Options the parent keeps for itself: it runs the workers and serves the one /metrics.
_PARENT_ONLY = frozenset(("--workers", "--metrics-port", "--metrics-host"))


def _check_input(settings: RunSettings) -> int:
    """Fail on a bad ids file before starting any child; return the ETA's line count."""
    reader = IdReader(settings.ids_path, id_column=settings.id_column)
    reader.open()
    reader.close()
    return max(1, round(reader.count_lines() / settings.shard.count))


def child_argv(argv: list[str], shard: Shard, settings: RunSettings, workers: int) -> list[str]:
    """The parent's own arguments without ``--workers``, plus this child's share."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        name = arg.partition("=")[0]
        if skip:
            skip = False
        elif arg in _PARENT_ONLY:
            skip = True
        elif name not in _PARENT_ONLY:
            kept.append(arg)
    # argparse keeps the last value given, so these override whatever the user passed.
    return [
        *kept,
        "--shard", str(shard),
        "--rate", repr(settings.rate / workers),
        "--concurrency", str(math.ceil(settings.concurrency / workers)),
        "--max-in-play", str(math.ceil(settings.max_in_play / workers)),
        "--json", "--no-progress", "--worker-stats",
    ]  # fmt: skip


class WorkerPool:
    """Starts the children, follows their counters, and merges what they report."""

    def __init__(self, argv: list[str], settings: RunSettings, workers: int) -> None:
        self._argv = argv
        self._settings = settings
        self._workers = workers
        self._stats = RunStats()
        self._latest: list[dict[str, Any]] = [{} for _ in range(workers)]
        self._snapshots: list[Snapshot] = [{} for _ in range(workers)]  # for /metrics
        self._finals: list[dict[str, Any] | None] = [None] * workers
        self._read: list[bool] = [False] * workers  # each child has read its whole input
        self._procs: list[asyncio.subprocess.Process] = []

    async def run(self) -> RunResult:
        """Run every worker to its end and return the merged result."""
        started = time.monotonic()
        s = self._settings
        total = await asyncio.to_thread(_check_input, s)
        shards = s.shard.split(self._workers)
        # Before any child starts: a busy port is exit 2 with nothing running.
        metrics = serve_metrics(s.metrics_host, s.metrics_port, self.snapshot)
        try:
            self._forward_signals()  # before the first child starts, so none is ever orphaned
            for shard in shards:
                args = child_argv(self._argv, shard, s, self._workers)
                self._procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "harvester",
                        *args,
                        stdout=asyncio.subprocess.PIPE,
                        # Its own session: a terminal's Ctrl-C reaches only the parent, which
                        # forwards it once (twice would mean "stop at once" to each child).
                        start_new_session=True,
                    )
                )
            progress = Progress(
                self._stats,
                total=total,
                enabled=s.progress,
                interval=s.log_interval,
                input_read=lambda: all(self._read),
            )
            with progress:
                await asyncio.gather(*(self._follow(i) for i in range(self._workers)))
                codes = [await proc.wait() for proc in self._procs]
        finally:
            if metrics is not None:
                metrics.close()
        return self._merge(codes, time.monotonic() - started)

    def snapshot(self) -> Snapshot:
        """The whole run's /metrics figures, from each worker's latest counter line."""
        return merge_snapshots(self._snapshots)

    def _forward_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._forward, sig)

    def _forward(self, sig: signal.Signals) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _follow(self, index: int) -> None:
        stream = self._procs[index].stdout
        assert stream is not None
        async for line in stream:
            with contextlib.suppress(orjson.JSONDecodeError):
                message = orjson.loads(line)
                if "progress" in message:
                    self._latest[index] = message["progress"]
                    self._snapshots[index] = message.get("metrics", {})
                    self._read[index] = bool(message.get("input_read"))
                    self._sum_progress()
                else:
                    self._finals[index] = message

    def _sum_progress(self) -> None:
        for name in (*_SUMMED, "in_flight"):
            setattr(self._stats, name, sum(snap.get(name, 0) for snap in self._latest))

    def _merge(self, codes: list[int], elapsed: float) -> RunResult:
        finals = [f for f in self._finals if f is not None]
        merged = RunStats()
        errors: Counter[str] = Counter()
        for final in finals:
            for name in _SUMMED:
                setattr(merged, name, getattr(merged, name) + final.get(name, 0))
            errors.update(final.get("errors", {}))
            merged.unresolved_reasons.update(final.get("unresolved_reasons", {}))
            merged.latency.merge(final.get("latency_buckets", {}), final["latency_ms"]["max"])
        merged.errors = errors
        code = worst_code(codes)
        run_id = new_run_id()
        summary = merged.summary(
            elapsed,
            run_id=run_id,
            shard=str(self._settings.shard),
            workers=self._workers,
            worker_run_ids=[f.get("run_id") for f in finals],
            out=str(self._settings.out_dir),
            exit_code=code,
        )
        summary["peak_rss_mb"] = round(sum(f.get("peak_rss_mb", 0.0) for f in finals), 1)
        # Each worker paces and pauses on its own: the longest pause is what a user waited.
        summary["paused_s"] = max((f.get("paused_s", 0.0) for f in finals), default=0.0)
        # Each worker has its own loop: the worst one's lag is what its requests waited.
        lags = [f["loop_lag_ms"] for f in finals if "loop_lag_ms" in f]
        if lags:
            summary["loop_lag_ms"] = {k: max(lag[k] for lag in lags) for k in LOOP_LAG_KEYS}
        save_report(self._settings.out_dir, run_id, summary)
        if len(finals) != self._workers:
            message: str | None = "a worker ended without a summary"
        elif code == ExitCode.UNRESOLVED:
            message = explain_unresolved(merged.unresolved_reasons, self._settings)
        else:  # a fatal stop (401/402/403, TLS, nothing answers): the first worker's line
            fatal = (f["fatal"] for f in finals if f.get("exit_code") == code and "fatal" in f)
            message = next(fatal, None)
        return RunResult(code, summary, message)


async def report_counters(
    stats: RunStats,
    snapshot: Callable[[], Snapshot],
    input_read: Callable[[], bool] = lambda: False,
) -> None:
    """In a ``--workers`` child: counters as JSON lines on stdout, for the parent's display,
    with the ``snapshot()`` its /metrics would show (the parent serves their sum), and
    whether its input is read (then its ``unique_ids`` is exact)."""
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        message = {"progress": stats.counters(), "metrics": snapshot(), "input_read": input_read()}
        line = orjson.dumps(message) + b"\n"
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


async def run_workers(argv: list[str], settings: RunSettings, workers: int) -> RunResult:
    """Harvest with ``workers`` processes; see the module docstring."""
    return await WorkerPool(argv, settings, workers).run()
