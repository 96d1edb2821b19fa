"""Throttling at real scale: every Retry-After in real seconds, every figure taken at the server.

One row per server behaviour (issue 7's table), each against ``harvester serve`` in its own
process at time scale 1:

* clean: the scattered row's server without its throttling, for reference;
* scattered: 6% of ids get one 429 or one 503 (Retry-After 1) on their first poll;
* chaos: the simulator's chaos profile;
* capacity: the server takes 300 requests/s (a token bucket) and answers 429 past it;
* saturated: every request gets 429 (Retry-After 2) for the first 6 s;
* retry-180: every request gets 429 "retry in 180 seconds" (``--long`` only: 3 minutes);
* realistic: the demo, timed as a whole.

Writes results/throttling.json and results/throttling.png (requests/s, 429/s, 503/s and the
allowed rate over time, one panel a row).

    python -m benchmarks.throttling [--runs 3] [--long]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import RESULTS, SCRATCH, TOKEN, ids_file, save, server_stats, simulator

FAST = ("--latency", "0.02")  # answers after 20 ms; the instant profile is ready at once


@dataclass
class Row:
    """One server behaviour, the harvester's command line against it, and its judge."""

    name: str
    server: str  # "harvester serve" profile
    server_args: tuple[str, ...]
    ids: int
    run_args: tuple[str, ...]
    judge: Callable[[dict[str, Any]], dict[str, Any]]
    stop_after: float | None = None  # SIGINT the harvester after this many seconds
    target: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)


def harvest(row: Row, url: str, out: Path) -> dict[str, Any]:
    """One harvest of ``row`` as a child process; its summary, timeline and the server's view."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    ids = ids_file(row.ids, seed=7)
    cmd = [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(out),
        "--base-url", url, "--json", "--no-progress", *row.run_args,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=row.stop_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - started
    if proc.returncode not in (0, 1, 130):
        raise RuntimeError(f"{row.name}: exit {proc.returncode}: {stderr.decode()[-2000:]}")
    summary = json.loads(stdout)
    [timeline_file] = (out / "_harvester" / "timelines").glob("*.json")
    return {
        "summary": summary,
        "timeline": json.loads(timeline_file.read_text()),
        "server": server_stats(url),
        "wall_s": elapsed,
        "log": stderr.decode()[-4000:],
    }


def busy_seconds(per_second: dict[str, list[int]]) -> list[int]:
    """Requests a second at the server, without the first and last (partial) seconds."""
    requests = per_second["requests"]
    return requests[1:-1] if len(requests) > 2 else requests


def judge_scattered(run: dict[str, Any]) -> dict[str, Any]:
    s, per = run["summary"], run["server"]["per_second"]
    rate = 2000.0
    backlog = busy_seconds(per)[:-1]  # the last seconds are the throttled ids' second try
    return {
        "sustained_per_s": statistics.median(backlog),
        "sustained_share_of_R": round(statistics.median(backlog) / rate, 3),
        "elapsed_s": s["elapsed_s"],
        "elapsed_vs_time_at_R": round(s["elapsed_s"] / (20_000 / rate), 2),
        "throttled_429": s["throttled_429"],
        "throttled_503": s["throttled_503"],
        "paused_s": s["paused_s"],
        "max_per_second_at_server": run["server"]["max_per_second"],
        "exit_code": s["exit_code"],
    }


def judge_chaos(run: dict[str, Any]) -> dict[str, Any]:
    per = run["server"]["per_second"]
    rate = 500.0
    steady = busy_seconds(per)
    return {
        "sustained_per_s": statistics.median(steady),
        "sustained_share_of_R": round(statistics.median(steady) / rate, 3),
        "mean_per_s": round(statistics.mean(steady), 1),
        "throttled_429": run["summary"]["throttled_429"],
        "throttled_503": run["summary"]["throttled_503"],
        "paused_s": run["summary"]["paused_s"],
        "max_per_second_at_server": run["server"]["max_per_second"],
    }


def judge_capacity(run: dict[str, Any]) -> dict[str, Any]:
    capacity = 300.0
    by_status = run["server"]["by_status"]
    requests = sum(by_status.values())
    throttled = by_status.get("429", 0)
    answered = requests - throttled
    seconds = len(run["server"]["per_second"]["requests"])
    return {
        "answered_per_s": round(answered / seconds, 1),
        "answered_share_of_capacity": round(answered / seconds / capacity, 3),
        "share_429_of_requests": round(throttled / max(requests, 1), 3),
        "elapsed_s": run["summary"]["elapsed_s"],
    }


def judge_saturated(run: dict[str, Any]) -> dict[str, Any]:
    per = run["server"]["per_second"]["requests"]
    s = run["summary"]
    # The server's timeline starts at its first request, so seconds 0-5 are the saturation.
    return {
        "requests_during_the_6_s": sum(per[:6]),
        "done_s_after_it_ended": round(len(per) - 6, 1),
        "paused_s": s["paused_s"],
        "exit_code": s["exit_code"],
    }


def judge_long(run: dict[str, Any]) -> dict[str, Any]:
    per = run["server"]["per_second"]["requests"]
    return {
        "requests_in_the_180_s": sum(per[:180]),
        "probes_after_the_first_second": sum(per[1:180]),
        "paused_s": run["summary"]["paused_s"],
        "log_line": next((line for line in run["log"].splitlines() if "paused 180 s" in line), ""),
    }


ROWS = [
    Row(
        "clean",
        "instant",
        FAST,
        20_000,
        ("--rate", "2000", "--concurrency", "200"),
        judge_scattered,
        target="(reference: the scattered row's harvest with no 429/503)",
    ),
    Row(
        "scattered",
        "instant",
        (*FAST, "--first-poll-throttle-share", "0.06", "--retry-after", "1"),
        20_000,
        ("--rate", "2000", "--concurrency", "200"),
        judge_scattered,
        target=">= 0.9 R sustained while there is backlog; within 1.3x the time at R",
    ),
    Row(
        "chaos",
        "chaos",
        (),
        10_000,
        ("--rate", "500", "--concurrency", "100"),
        judge_chaos,
        stop_after=20.0,
        target=">= 0.8 R sustained",
    ),
    Row(
        "capacity",
        "instant",
        (*FAST, "--capacity", "300"),
        9_000,
        ("--rate", "2000"),
        judge_capacity,
        target="answers other than 429 >= 0.85 x capacity; 429s <= 10% of requests",
    ),
    Row(
        "saturated",
        "instant",
        (*FAST, "--saturated", "6", "--saturated-retry-after", "2"),
        3_000,
        ("--rate", "1000", "--concurrency", "100"),
        judge_saturated,
        target="<= 150 requests during the 6 s; done within 5 s after it ends",
    ),
]
LONG = Row(
    "retry-180", "instant", (*FAST, "--saturated", "100000", "--saturated-retry-after", "180"),
    1_000, ("--rate", "1000", "--concurrency", "100", "--max-wait", "900"), judge_long,
    stop_after=185.0, target="no more than a few probes in those 180 s",
)  # fmt: skip


def time_demo(runs: int) -> dict[str, Any]:
    """The realistic profile as the README's demo runs it, whole process timed."""
    times = []
    for _ in range(runs):
        out = SCRATCH / "throttling-demo"
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "harvester", "demo", "--out", str(out), "--no-progress"],
            capture_output=True, text=True, check=False, cwd=SCRATCH,
        )  # fmt: skip
        times.append(time.monotonic() - started)
        if done.returncode != 0:
            print(f"demo exit {done.returncode}: {done.stdout[-500:]}", file=sys.stderr)
    return {
        "demo_wall_s": [round(t, 1) for t in times],
        "median_s": round(statistics.median(times), 1),
    }


def plot(runs: dict[str, dict[str, Any]]) -> None:
    """One panel a row: requests/s, 429/s, 503/s at the server and the allowed rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items(), strict=True):
        per = run["server"]["per_second"]
        seconds = range(len(per["requests"]))
        ax.plot(seconds, per["requests"], label="requests/s (server)")
        ax.plot(seconds, per["429"], label="429/s", color="tab:red")
        ax.plot(seconds, per["503"], label="503/s", color="tab:orange")
        rate = run["timeline"]["rate"]
        ax.plot(range(len(rate)), rate, label="allowed rate", linestyle="--", color="tab:green")
        ax.set_title(name, loc="left", fontsize=10)
        ax.set_ylabel("per second")
        top = max(max(per["requests"]), 1)
        ax.set_ylim(0, top * 1.25)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the server's first request")
    fig.tight_layout()
    fig.savefig(RESULTS / "throttling.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs a row; medians reported")
    parser.add_argument("--long", action="store_true", help="also the 3-minute retry-180 row")
    parser.add_argument("--only", help="comma-separated row names")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    rows = [*ROWS, LONG] if args.long else list(ROWS)
    if args.only:
        rows = [row for row in rows if row.name in args.only.split(",")]
    results: dict[str, Any] = {}
    last_runs: dict[str, dict[str, Any]] = {}
    for row in rows:
        runs = 1 if row.name == "retry-180" else args.runs
        figures = []
        for _ in range(runs):
            with simulator(row.server, 1.0, 0.0, *row.server_args) as url:
                run = harvest(row, url, SCRATCH / f"throttling-{row.name}")
            figures.append(row.judge(run))
            last_runs[row.name] = run
            print(row.name, figures[-1], flush=True)
        medians = {
            key: statistics.median(f[key] for f in figures)
            if isinstance(figures[0][key], int | float)
            else figures[-1][key]
            for key in figures[0]
        }
        results[row.name] = {"target": row.target, "median": medians, "runs": figures}
    results["realistic"] = {"target": "no slower than before", **time_demo(args.runs)}
    print("realistic", results["realistic"], flush=True)
    plot(last_runs)
    save("throttling", {"rows": results})
    for name, row in results.items():
        print(f"| {name} | {row['target']} | {row.get('median', row.get('median_s'))} |")


if __name__ == "__main__":
    main()
