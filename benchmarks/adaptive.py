"""Achieved rate over time against a simulator whose capacity is below --rate.

The simulator answers 429 (Retry-After 1 s) past ``--capacity`` requests a second; the
harvester is asked for ``--rate``. Plots requests/s, 429s/s and the pacer's allowed rate from
the run's timeline, and writes results/adaptive.json and results/adaptive.png.

    python -m benchmarks.adaptive --capacity 100 --rate 500 --ids 3000
"""

from __future__ import annotations

import argparse
import json
import shutil

from ._common import RESULTS, SCRATCH, harvest_json, ids_file, save, simulator


def plot(timeline: dict[str, list[float]], capacity: float, rate: float) -> None:
    """requests/s, 429/s and the allowed rate against time, with capacity and --rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = list(range(len(timeline["requests"])))
    fig, ax = plt.subplots(figsize=(8, 4))
    ok = [r - t for r, t in zip(timeline["requests"], timeline["throttled"], strict=True)]
    ax.plot(seconds, ok, label="answered requests/s")
    ax.plot(seconds, timeline["throttled"], label="429/s", color="tab:red")
    ax.plot(seconds, timeline["rate"], label="allowed rate (AIMD)", linestyle="--")
    ax.axhline(capacity, color="gray", linestyle=":", label=f"server capacity {capacity:.0f}/s")
    ax.set_ylim(0, max(capacity * 1.6, max(timeline["requests"]) * 1.1))
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    ax.set_title(
        f"harvester --rate {rate:.0f} against a server taking {capacity:.0f}/s "
        "(429 + Retry-After 0.1 s past it)"
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(RESULTS / "adaptive.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", type=float, default=100)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--ids", type=int, default=3000)
    parser.add_argument(
        "--retry-after", type=float, default=0.1,
        help="seconds of Retry-After on the server's 429s (1 s pauses hide the AIMD)",
    )  # fmt: skip
    args = parser.parse_args()

    out = SCRATCH / "adaptive-out"
    shutil.rmtree(out, ignore_errors=True)
    # The instant profile has no delays, so the time scale only sets Retry-After.
    with simulator("instant", time_scale=args.retry_after, capacity=args.capacity) as url:
        summary = harvest_json(ids_file(args.ids), out, url, "--rate", str(args.rate))
    [path] = (out / "_harvester" / "timelines").glob("*.json")
    timeline = json.loads(path.read_text())
    steady = timeline["requests"][5:-1] or timeline["requests"]
    throttled = timeline["throttled"][5:-1] or timeline["throttled"]
    answered = [r - t for r, t in zip(steady, throttled, strict=True)]
    result = {
        "capacity": args.capacity,
        "rate": args.rate,
        "ids": args.ids,
        "retry_after_s": args.retry_after,
        "elapsed_s": summary["elapsed_s"],
        "ids_per_s": summary["ids_per_s"],
        "throttled_share": round(summary["throttled"] / max(summary["requests"], 1), 3),
        "steady_answered_per_s_mean": round(sum(answered) / len(answered), 1),
        "timeline": timeline,
    }
    save("adaptive", result)
    plot(timeline, args.capacity, args.rate)
    print(
        f"capacity {args.capacity:.0f}/s, --rate {args.rate:.0f}: {summary['ids_per_s']} ids/s, "
        f"{result['throttled_share']:.1%} of requests 429, steady answered "
        f"{result['steady_answered_per_s_mean']}/s -> {RESULTS / 'adaptive.png'}"
    )


if __name__ == "__main__":
    main()
