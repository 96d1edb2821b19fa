"""How ``--workers 2`` scales over ``--workers 1``, against a server too cheap to matter.

The server is ``benchmarks.fastserver`` in its own process (a bare asyncio protocol answering
the same 200 Completion), so the harvester is what is measured. Runs alternate 1, 2, 1, 2, ...
(``--pairs`` pairs, each harvesting the same ``--ids`` ids into a fresh directory) at the same
``--concurrency`` in both arms; the figures are medians, and the ratio is the median of the
per-pair ratios. Three rates are kept for each run:

* ``summary``: ``requests_per_s`` of the run's JSON summary (what a user sees; for
  ``--workers 2`` its clock also covers starting the two child processes);
* ``harvest``: requests over the harvesting time only (``--workers 1``: the summary's
  ``elapsed_s``; ``--workers 2``: the longer of the two children's ``elapsed_s``);
* ``wall``: requests over the whole process, start-up included.

CPU seconds of the harvester's process tree, of the server, and of everything else on the
machine during the run are recorded too: the machine is shared, and on 2 cores the server's
and other people's CPU is what a second worker competes with. Pairs where other processes used
less than ``QUIET_CORES`` in both arms are "quiet"; their median ratio is reported apart.

    python -m benchmarks.workers --ids 100000 --pairs 5 --concurrency 64 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._common import SCRATCH, free_port, harvest_json, ids_file, median, save

RATE = "1000000"  # the most --rate allows: pacing never binds
QUIET_CORES = 0.25  # a pair is "quiet" when other processes used less than this in both arms
_TICK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def fastserver() -> Iterator[tuple[str, int]]:
    """``benchmarks.fastserver`` in its own process; yields its URL and pid."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.fastserver", "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _TICK


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(ids: Path, url: str, server_pid: int, workers: int, concurrency: int) -> dict[str, Any]:
    out = SCRATCH / "workers-out"
    shutil.rmtree(out, ignore_errors=True)
    cpu0, server0, busy0 = children_cpu_s(), process_cpu_s(server_pid), machine_busy_s()
    load = os.getloadavg()[0]
    started = time.monotonic()
    summary = harvest_json(
        ids,
        out,
        url,
        "--rate",
        RATE,
        "--concurrency",
        str(concurrency),
        "--workers",
        str(workers),
        timeout=300,
    )
    wall = time.monotonic() - started
    harvester_cpu = children_cpu_s() - cpu0
    server_cpu = process_cpu_s(server_pid) - server0
    busy = machine_busy_s() - busy0
    requests = summary["requests"]
    if workers == 1:
        harvest_s = summary["elapsed_s"]
    else:
        runs = out / "_harvester" / "runs"
        child = [
            json.loads((runs / f"{rid}.json").read_text()) for rid in summary["worker_run_ids"]
        ]
        harvest_s = max(c["elapsed_s"] for c in child)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "workers": workers,
        "requests": requests,
        "completed": summary["completed"],
        "summary_rps": summary["requests_per_s"],
        "harvest_rps": round(requests / harvest_s, 1),
        "wall_rps": round(requests / wall, 1),
        "elapsed_s": summary["elapsed_s"],
        "harvest_s": harvest_s,
        "wall_s": round(wall, 3),
        "latency_ms": summary["latency_ms"],
        "start_s": round(summary["elapsed_s"] - harvest_s, 3) if workers > 1 else 0.0,
        "peak_rss_mb": summary["peak_rss_mb"],
        "harvester_cpu_s": round(harvester_cpu, 2),
        "harvester_cpu_us_per_request": round(harvester_cpu / requests * 1e6, 1),
        "server_cpu_s": round(server_cpu, 2),
        "other_cpu_s": round(max(0.0, busy - harvester_cpu - server_cpu), 2),
        "other_cores": round(max(0.0, busy - harvester_cpu - server_cpu) / wall, 2),
        "machine_busy_cores": round(busy / wall, 2),
        "loadavg_1m_before": round(load, 2),
    }


def measure(ids: Path, count: int, pairs: int, concurrency: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    ratios: dict[str, list[float]] = {"summary": [], "harvest": [], "wall": []}
    quiet: dict[str, list[float]] = {"summary": [], "harvest": [], "wall": []}
    with fastserver() as (url, server_pid):
        for pair in range(pairs):
            one, two = (one_run(ids, url, server_pid, w, concurrency) for w in (1, 2))
            for run in (one, two):
                if run["completed"] != count:
                    raise RuntimeError(f"{run['completed']} of {count} ids completed")
                runs.append(run)
                print(
                    f"c={concurrency} pair {pair + 1} workers {run['workers']}: "
                    f"{run['summary_rps']} req/s (harvest {run['harvest_rps']}, wall "
                    f"{run['wall_rps']}), {run['harvester_cpu_us_per_request']} CPU-us/req, "
                    f"server {run['server_cpu_s']} s, others {run['other_cpu_s']} s CPU, "
                    f"p50 {run['latency_ms']['p50']} ms"
                )
            calm = max(one["other_cores"], two["other_cores"]) < QUIET_CORES
            for kind in ratios:
                ratios[kind].append(two[f"{kind}_rps"] / one[f"{kind}_rps"])
                if calm:
                    quiet[kind].append(ratios[kind][-1])
            print(
                f"c={concurrency} pair {pair + 1} ratio: summary {ratios['summary'][-1]:.2f}x, "
                f"harvest {ratios['harvest'][-1]:.2f}x, wall {ratios['wall'][-1]:.2f}x"
                + ("" if calm else " (not quiet: other processes busy)")
            )

    def arm(workers: int, key: str) -> float:
        return median([r[key] for r in runs if r["workers"] == workers])

    return {
        "concurrency": concurrency,
        **{
            f"median_{key}_workers{w}": arm(w, key)
            for key in (
                "summary_rps",
                "harvest_rps",
                "wall_rps",
                "harvester_cpu_us_per_request",
                "server_cpu_s",
                "other_cpu_s",
            )
            for w in (1, 2)
        },
        "median_ratio": {kind: median(values) for kind, values in ratios.items()},
        "ratios": {kind: [round(v, 3) for v in values] for kind, values in ratios.items()},
        "quiet_pairs": len(quiet["summary"]),
        "median_ratio_quiet_pairs": {
            kind: median(values) if values else None for kind, values in quiet.items()
        },
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()

    ids = ids_file(args.ids)
    results = [measure(ids, args.ids, args.pairs, c) for c in args.concurrency]
    path = save("workers", {"ids": args.ids, "pairs": args.pairs, "results": results})
    for r in results:
        c = r["concurrency"]
        print(
            f"c={c}: workers 1 {r['median_summary_rps_workers1']} req/s, workers 2 "
            f"{r['median_summary_rps_workers2']} req/s; median ratio {r['median_ratio']}, "
            f"over the {r['quiet_pairs']} quiet pairs {r['median_ratio_quiet_pairs']} "
            f"(harvest-only rates: {r['median_harvest_rps_workers1']} vs "
            f"{r['median_harvest_rps_workers2']}); CPU-us/req "
            f"{r['median_harvester_cpu_us_per_request_workers1']} vs "
            f"{r['median_harvester_cpu_us_per_request_workers2']}"
        )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
