"""Throughput, latency and peak RSS of ``harvester run`` against the instant simulator.

The simulator runs in its own process so client and server each get a core. Each repeat harvests
the same ids into a fresh directory; the figures quoted are medians of the repeats.

    python -m benchmarks.throughput --ids 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil

from ._common import (
    SCRATCH,
    harvest_json,
    ids_file,
    median,
    reset_server,
    save,
    server_stats,
    simulator,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    ids = ids_file(args.ids)
    runs = []
    with simulator("instant") as url:
        for i in range(args.repeats):
            out = SCRATCH / "throughput-out"
            shutil.rmtree(out, ignore_errors=True)
            reset_server(url)
            summary = harvest_json(
                ids, out, url, "--rate", str(args.rate), "--concurrency", str(args.concurrency)
            )
            server = server_stats(url)
            runs.append({"summary": summary, "server": server})
            print(
                f"run {i + 1}: {summary['requests_per_s']} req/s, latency {summary['latency_ms']}, "
                f"peak RSS {summary['peak_rss_mb']} MiB, server peak in flight "
                f"{server['peak_in_flight']}"
            )
    result = {
        "ids": args.ids,
        "concurrency": args.concurrency,
        "median_requests_per_s": median([r["summary"]["requests_per_s"] for r in runs]),
        "median_latency_ms": {
            k: median([r["summary"]["latency_ms"][k] for r in runs])
            for k in ("p50", "p90", "p99", "max")
        },
        "median_peak_rss_mb": median([r["summary"]["peak_rss_mb"] for r in runs]),
        "all_accounted": all(
            r["summary"]["completed"] + r["summary"]["failed"] == args.ids for r in runs
        ),
        "runs": runs,
    }
    path = save("throughput", result)
    print(
        f"median {result['median_requests_per_s']} req/s, latency {result['median_latency_ms']}, "
        f"peak RSS {result['median_peak_rss_mb']} MiB -> {path}"
    )


if __name__ == "__main__":
    main()
