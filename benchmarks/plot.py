"""Plot results/throughput.json: request latency percentiles of each run, as a small PNG.

python -m benchmarks.plot            # -> benchmarks/results/throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import RESULTS

PERCENTILES = ("p50", "p90", "p99", "max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--output", type=Path, default=RESULTS / "throughput.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.input.read_text())
    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        latency = run["summary"]["latency_ms"]
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(PERCENTILES))]
        label = f"run {i + 1}: {run['summary']['requests_per_s']:.0f} req/s"
        ax.bar(xs, [latency[p] for p in PERCENTILES], width, label=label)
    ax.set_xticks(range(len(PERCENTILES)), PERCENTILES)
    ax.set_yscale("log")
    ax.set_ylabel("request latency (ms, log)")
    ax.set_title(
        f"harvester run, {data['ids']} ids, concurrency {data['concurrency']}: "
        f"median {data['median_requests_per_s']:.0f} req/s",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
