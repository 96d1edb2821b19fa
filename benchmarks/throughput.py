"""Throughput of ``harvester run`` against a bare aiohttp loop, on nginx, in one run.

nginx (``apt-get install nginx-light``) answers every poll with one fixed Completion, so the
clients, not the server, are measured. For each case (concurrency C and page size) the minimal
loop (``benchmarks.minimal_loop``) and the harvester (CSV -> polls -> Parquet) run alternately,
``--repeats`` rounds, each a whole process timed from start to exit; the ratio is of the medians.

    python -m benchmarks.throughput --repeats 3       # -> results/throughput.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson

from ._common import RESULTS, SCRATCH, TOKEN, harvest_command, ids_file, save
from .nginx import find_nginx, nginx_serving

# (name, concurrency, html bytes, ids): small pages at C=64 and C=1000; realistic 200 KB pages.
CASES = (
    ("small-c64", 64, 2_000, 50_000),
    ("small-c1000", 1000, 2_000, 50_000),
    ("page200k-c64", 64, 200_000, 10_000),
)


def page(html_bytes: int) -> bytes:
    """One Completion whose ``html`` is about ``html_bytes`` of the simulator's realistic page."""
    from harvester.sim.content import build_completion

    doc = build_completion(
        random.Random(7).randbytes(32),
        model="chatgpt",
        fanouts=(2, 4),
        seed=7,
        html_bytes=html_bytes,
        targeted_share=0.0,
    )
    return orjson.dumps(doc)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds and CPU seconds (user + system, all threads) of one whole process, and
    its stdout. CPU time is what a shared, noisy machine distorts least."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed, cpu, done.stdout


def run_case(url: str, concurrency: int, count: int, repeats: int) -> dict[str, Any]:
    """Alternate the two clients ``repeats`` times; requests/s of each round and the ratio."""
    ids = ids_file(count, seed=3)
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    out = SCRATCH / "throughput-out"
    minimal: list[float] = []
    minimal_cpu: list[float] = []
    harvester: list[dict[str, Any]] = []
    for _ in range(repeats):
        elapsed, cpu, _out = timed(
            [
                sys.executable,
                "-m",
                "benchmarks.minimal_loop",
                "--ids",
                str(ids),
                "--url",
                f"{url}/ai/completions",
                "--concurrency",
                str(concurrency),
            ],
            env,
        )
        minimal.append(count / elapsed)
        minimal_cpu.append(cpu * 1e6 / count)
        shutil.rmtree(out, ignore_errors=True)
        elapsed, cpu, stdout = timed(
            harvest_command(ids, out, url, "--rate", "1000000", "--concurrency", str(concurrency)),
            env,
        )
        summary = json.loads(stdout)
        if summary["completed"] != count:
            raise RuntimeError(f"harvester completed {summary['completed']} of {count}")
        harvester.append(
            {"requests_per_s": count / elapsed, "cpu_us": cpu * 1e6 / count, "summary": summary}
        )
        print(
            f"  minimal {minimal[-1]:8.0f}/s {minimal_cpu[-1]:6.0f} us CPU/request   "
            f"harvester {harvester[-1]['requests_per_s']:8.0f}/s "
            f"{harvester[-1]['cpu_us']:6.0f} us CPU/request"
        )
    shutil.rmtree(out, ignore_errors=True)
    m = statistics.median(minimal)
    h = statistics.median([r["requests_per_s"] for r in harvester])
    m_cpu = statistics.median(minimal_cpu)
    h_cpu = statistics.median([r["cpu_us"] for r in harvester])
    return {
        "minimal_cpu_us_per_request": [round(v, 1) for v in minimal_cpu],
        "harvester_cpu_us_per_request": [round(r["cpu_us"], 1) for r in harvester],
        "cpu_ratio": round(m_cpu / h_cpu, 3),
        "minimal_requests_per_s": [round(v, 1) for v in minimal],
        "harvester_requests_per_s": [round(r["requests_per_s"], 1) for r in harvester],
        "median_minimal": round(m, 1),
        "median_harvester": round(h, 1),
        "ratio": round(h / m, 3),
        "harvester_loop_lag_ms": [r["summary"].get("loop_lag_ms") for r in harvester],
        "harvester_peak_rss_mb": [r["summary"].get("peak_rss_mb") for r in harvester],
    }


def plot(result: dict[str, Any]) -> None:
    """Bars of the two clients' median requests/s per case, ratios on top."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["cases"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    xs = range(len(names))
    minimal = [result["cases"][n]["median_minimal"] for n in names]
    harvester = [result["cases"][n]["median_harvester"] for n in names]
    ax.bar([x - 0.2 for x in xs], minimal, width=0.4, label="minimal aiohttp loop")
    ax.bar([x + 0.2 for x in xs], harvester, width=0.4, label="harvester run (CSV -> Parquet)")
    for x, n in zip(xs, names, strict=True):
        top = max(minimal[x], harvester[x])
        ax.text(x, top * 1.02, f"{result['cases'][n]['ratio']:.2f}x", ha="center")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("requests/s (whole process)")
    ax.set_title("harvester vs a bare aiohttp loop, nginx on loopback, 2 cores")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png")
    print(f"-> {RESULTS / 'throughput.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES))
    args = parser.parse_args()
    if find_nginx() is None:
        print("skipped: nginx is not installed (Debian: apt-get install nginx-light)")
        return
    wanted = set(args.cases.split(","))
    result: dict[str, Any] = {"repeats": args.repeats, "cases": {}}
    for name, concurrency, html_bytes, count in CASES:
        if name not in wanted:
            continue
        body = page(html_bytes)
        print(f"{name}: C={concurrency}, {len(body)} byte body, {count} ids")
        with nginx_serving(body) as url:
            case = run_case(url, concurrency, count, args.repeats)
        case.update(concurrency=concurrency, body_bytes=len(body), ids=count)
        result["cases"][name] = case
        print(f"  ratio {case['ratio']} (by CPU per request {case['cpu_ratio']})")
    path = save("throughput", result)
    print(f"-> {path}")
    plot(result)


if __name__ == "__main__":
    main()
