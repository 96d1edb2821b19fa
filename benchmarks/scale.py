"""Memory and event-loop lag at scale: a whole harvest in-process, sampled as it goes.

``harvester.runner.harvest`` runs end to end (CSV reader thread, intake and the seen-set,
scheduler, pacer, client parsing and validation, sink and Parquet commits, summary) with the
HTTP transport replaced by ``FakeSession``: an aiohttp-like session whose every GET answers
at once with one fixed 200 Completion (or, for the ids ``BigBodies`` picks, a ~25 MiB one).
Every structure that grows with the number of ids is exercised; what is not is aiohttp's
socket path (``benchmarks/throughput.py`` and ``--http URL`` here cover that).

A sampler task reads VmRSS from ``/proc/self/status`` every 0.2 s and a second loop-lag
monitor (the harvester's own, a 10 ms timer chain) is reset at every step of ``--step`` ids
harvested, so each step reports its RSS (at the step's end and the most during it) and its
own loop-lag p50/p99/max. The run's summary gives the whole-run figures.

    python -m benchmarks.scale fresh --ids 10000000          # one case, in this process
    python -m benchmarks.scale fresh --ids 1000000 --http nginx   # the same over real HTTP
    python -m benchmarks.scale big --ids 20000 --big-every 2000   # 25 MiB bodies mixed in
    python -m benchmarks.scale sizes --ids 50000             # memory by page size (5, 200 KB)

Results are written to ``benchmarks/results/scale-<case>.json`` (and a PNG for ``fresh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import orjson

from harvester.looplag import LoopLagMonitor
from harvester.metrics import LatencyHistogram, RunStats
from harvester.runner import Run
from harvester.settings import RunSettings

from ._common import RESULTS, SCRATCH, TOKEN, save
from .resume import uuid_rows

BUDGET_CONSTANT_MIB = 150.0
BUDGET_BYTES_PER_ID = 48


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def hwm_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ids_csv(count: int, seed: int = 11) -> Path:
    """A CSV of ``count`` distinct random uuids (made once with numpy, reused)."""
    path = SCRATCH / f"scale-ids-{count}-{seed}.csv"
    if path.exists():
        return path
    SCRATCH.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        out.write(b"id\n")
        for start in range(0, count, 1_000_000):
            n = min(1_000_000, count - start)
            rows = uuid_rows(rng, n)
            out.write(np.hstack((rows, np.full((n, 1), 10, np.uint8))).tobytes())
    tmp.replace(path)
    return path


def completion_body(html_bytes: int, *, non_ascii: bool = False, seed: int = 7) -> bytes:
    """One realistic Completion (the simulator's), its html ~``html_bytes`` long."""
    from harvester.sim.content import build_completion

    doc = build_completion(
        random.Random(seed).randbytes(32),
        model="chatgpt",
        fanouts=(2, 4),
        seed=seed,
        html_bytes=min(html_bytes, 400_000),
        targeted_share=0.0,
    )
    if html_bytes > 400_000 or non_ascii:
        # A huge page: repeat a non-ASCII paragraph (2-4 bytes a char in UTF-8, and a
        # UCS-2/UCS-4 str in Python) up to the size asked.
        unit = "<p>Überprüfung der Qualität — 品質の確認 — проверка качества 🚀</p>\n"
        reps = max(1, html_bytes // len(unit.encode()))
        doc["html"] = '<!DOCTYPE html><html lang="de"><body>' + unit * reps + "</body></html>"
    return orjson.dumps(doc)


class _Response:
    __slots__ = ("_body", "content_length", "headers", "status")

    def __init__(self, body: bytes) -> None:
        self.status = 200
        self._body = body
        self.content_length = len(body)
        self.headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> _Response:
        # One suspension a request, as aiohttp waits for the answer: without it a worker
        # would go from id to id without ever yielding, and no timer would fire meanwhile.
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class FakeSession:
    """Answers every GET at once with ``body``; ids for which ``big(id)`` is true get
    ``big_body``. Only what ``CompletionsClient.poll`` uses is implemented."""

    def __init__(self, body: bytes, big_body: bytes | None = None, big_every: int = 0) -> None:
        self._ok = _Response(body)
        self._big = _Response(big_body) if big_body is not None else None
        self._every = big_every
        self.requests = 0
        self.big_served = 0

    def get(self, url: Any, **_: Any) -> _Response:
        self.requests += 1
        if self._big is not None and self.requests % self._every == 0:
            self.big_served += 1
            return self._big
        return self._ok

    async def close(self) -> None:
        return None


@contextlib.contextmanager
def _http_server(kind: str, body: bytes) -> Iterator[str]:
    if kind == "nginx":
        from .nginx import find_nginx, nginx_serving

        if find_nginx() is None:
            raise SystemExit("nginx is not installed (apt-get install nginx-light)")
        with nginx_serving(body) as url:
            yield url
    else:
        yield kind  # a base URL given as is


class Sampler:
    """RSS and loop lag per ``step`` ids harvested, read from the run's own counters."""

    def __init__(self, stats: RunStats, step: int, started: float) -> None:
        self._stats = stats
        self._step = step
        self._started = started
        self.lag = LoopLagMonitor(LatencyHistogram())
        self.steps: list[dict[str, Any]] = []
        self.series: list[tuple[float, int, float]] = []  # (seconds, ids done, RSS MiB)
        self._next = step
        self._step_max = 0.0

    def done_ids(self) -> int:
        s = self._stats
        return s.completed + s.failed + s.invalid + s.already_done

    def sample(self, final: bool = False) -> None:
        now = time.monotonic() - self._started
        done = self.done_ids()
        rss = rss_mib()
        self._step_max = max(self._step_max, rss)
        self.series.append((round(now, 2), done, round(rss, 1)))
        if done >= self._next or (final and done > (self.steps[-1]["ids"] if self.steps else 0)):
            lag = self.lag.hist.summary(("p50", "p99", "max"))
            budget = BUDGET_CONSTANT_MIB + BUDGET_BYTES_PER_ID * done / 2**20
            self.steps.append(
                {
                    "ids": done,
                    "seconds": round(now, 1),
                    "rss_mib": round(rss, 1),
                    "step_max_rss_mib": round(self._step_max, 1),
                    "peak_rss_mib": round(hwm_mib(), 1),
                    "budget_mib": round(budget, 1),
                    "loop_lag_ms": lag,
                }
            )
            print(
                f"  {done:>10,} ids {now:7.1f} s  RSS {rss:6.1f} MiB (step max "
                f"{self._step_max:6.1f}, peak {hwm_mib():6.1f}, budget {budget:6.1f})  "
                f"lag p50 {lag['p50']:6.2f} p99 {lag['p99']:6.2f} max {lag['max']:7.2f} ms",
                flush=True,
            )
            self.lag.hist = LatencyHistogram()
            self._step_max = 0.0
            while self._next <= done:
                self._next += self._step

    async def watch(self) -> None:
        self.lag.start()
        try:
            while True:
                await asyncio.sleep(0.2)
                self.sample()
        finally:
            self.lag.stop()


async def _harvest(
    settings: RunSettings, session: Any, step: int
) -> tuple[dict[str, Any], Sampler, float]:
    started = time.monotonic()
    run = Run(settings, session)
    sampler = Sampler(run.stats, step, started)
    watcher = asyncio.create_task(sampler.watch())
    try:
        result = await run.execute()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    sampler.sample(final=True)
    return result.summary, sampler, time.monotonic() - started


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One harvest in this process; returns its per-step figures and summary."""
    rss_start = rss_mib()
    ids = ids_csv(args.ids)
    out = SCRATCH / f"scale-out-{args.case}"
    if not args.resume_dir:
        shutil.rmtree(out, ignore_errors=True)
    else:
        out = Path(args.resume_dir)
    body = completion_body(args.html_kb * 1000)
    big = completion_body(args.big_mib * 2**20, non_ascii=True) if args.big_every else None
    settings = RunSettings(
        token=TOKEN,
        ids_path=Path(args.ids_path or ids),
        out_dir=out,
        rate=1_000_000.0,
        concurrency=args.concurrency,
        progress=False,
        max_body_bytes=max(25 * 2**20, len(big or b"") + 1),
        allow_insecure=True,
        flush_bytes=int(args.flush_mib * 2**20),
        flush_rows=args.flush_rows,
    )
    rss_ready = rss_mib()
    print(
        f"{args.case}: {args.ids:,} ids, body {len(body):,} B"
        + (f", every {args.big_every}th a {len(big or b''):,} B body" if big else "")
        + f", C={args.concurrency}, {'HTTP ' + args.http if args.http else 'in-process'}; "
        f"RSS after imports {rss_start:.1f} MiB",
        flush=True,
    )
    if args.http:
        with _http_server(args.http, body) as url:
            settings = RunSettings(**{**_fields(settings), "base_url": url})
            summary, sampler, wall = asyncio.run(_harvest(settings, None, args.step))
        served = None
    else:
        session = FakeSession(body, big, args.big_every)
        summary, sampler, wall = asyncio.run(_harvest(settings, session, args.step))
        served = {"requests": session.requests, "big": session.big_served}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    unique = summary["unique_ids"]
    budget = BUDGET_CONSTANT_MIB + BUDGET_BYTES_PER_ID * unique / 2**20
    peak = hwm_mib()
    print(
        f"  done in {wall:.1f} s ({summary['completed'] / wall:,.0f} rows/s): peak RSS "
        f"{peak:.1f} MiB (budget {budget:.1f}), loop lag {summary['loop_lag_ms']}",
        flush=True,
    )
    return {
        "case": args.case,
        "transport": f"HTTP ({args.http})" if args.http else "in-process FakeSession",
        "ids": args.ids,
        "body_bytes": len(body),
        "big_body_bytes": len(big) if big else None,
        "big_every": args.big_every or None,
        "served": served,
        "concurrency": args.concurrency,
        "wall_s": round(wall, 1),
        "rows_per_s": round(summary["completed"] / wall, 1),
        "rss_after_imports_mib": round(rss_start, 1),
        "rss_before_run_mib": round(rss_ready, 1),
        "peak_rss_mib": round(peak, 1),
        "budget_mib": round(budget, 1),
        "steps": sampler.steps,
        "series": sampler.series[:: max(1, len(sampler.series) // 400)],
        "summary": {k: v for k, v in summary.items() if k not in ("run_id", "out")},
    }


def _fields(settings: RunSettings) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.init}


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS and loop-lag p99/max per step against the budget line."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    xs = [s["ids"] / 1e6 for s in steps]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    a.plot(xs, [s["step_max_rss_mib"] for s in steps], "o-", label="RSS (step max)")
    a.plot(xs, [s["budget_mib"] for s in steps], "--", label="budget 150 MiB + 48 B/id")
    a.set_xlabel("ids harvested (M)")
    a.set_ylabel("MiB")
    a.legend()
    a.set_title(f"memory, {result['transport']}")
    b.plot(xs, [s["loop_lag_ms"]["p99"] for s in steps], "o-", label="p99")
    b.plot(xs, [s["loop_lag_ms"]["max"] for s in steps], "s-", label="max")
    b.axhline(10, ls="--", color="C0", lw=0.8)
    b.axhline(50, ls="--", color="C1", lw=0.8)
    b.set_xlabel("ids harvested (M)")
    b.set_ylabel("ms")
    b.set_title("event-loop lag per step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"  -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case", choices=("fresh", "big", "sizes", "resume"))
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--step", type=int, default=1_000_000)
    parser.add_argument("--html-kb", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--big-every", type=int, default=0, help="every Nth request is big")
    parser.add_argument("--big-mib", type=int, default=25)
    parser.add_argument("--http", default="", help="'nginx', or a base URL: real HTTP")
    parser.add_argument("--resume-dir", default="", help="harvest into this existing DIR")
    parser.add_argument("--ids-path", default="", help="read this CSV instead of a made one")
    parser.add_argument("--flush-mib", type=float, default=32.0, help="--flush-bytes, MiB")
    parser.add_argument("--flush-rows", type=int, default=50_000)
    parser.add_argument("--keep", action="store_true", help="keep the output DIR")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--no-offload", action="store_true", help="decode big bodies on the loop (as before)"
    )
    args = parser.parse_args()
    if args.case == "big" and not args.big_every:
        args.big_every = 2000
    if args.case == "sizes":
        # Each page size in a fresh process: a peak RSS is per process.
        results = {}
        for kb in (5, 200):
            cmd = [sys.executable, "-m", "benchmarks.scale", "fresh", "--ids", str(args.ids)]
            cmd += ["--html-kb", str(kb), "--step", str(args.ids), "--no-save"]
            cmd += ["--tag", f"{kb}kb"] + (["--http", args.http] if args.http else [])
            env = {**os.environ, "SCALE_RESULT_FD": "1"}
            import subprocess

            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            print(done.stdout.split("RESULT ")[0], end="")
            results[f"{kb}kb"] = json.loads(done.stdout.split("RESULT ", 1)[1])
        name = f"scale-sizes{'-' + args.tag if args.tag else ''}"
        print(f"-> {save(name, {'cases': results})}")
        return
    if args.no_offload:
        from harvester import client

        setattr(client, "BIG_BODY_BYTES", 1 << 62)  # noqa: B010
    result = run_case(args)
    if os.environ.get("SCALE_RESULT_FD"):
        print("RESULT " + json.dumps(result))
        return
    if args.no_save:
        return
    name = f"scale-{args.case}{'-' + args.tag if args.tag else ''}"
    print(f"-> {save(name, result)}")
    if args.case in ("fresh", "resume") and len(result["steps"]) > 1:
        plot(result, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
