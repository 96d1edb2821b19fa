"""Polling efficiency: polls per completed id and detection lag, default schedule vs fixed 4 s.

The simulator's realistic profile (per-model ready delays: gemini 7-8 s, chatgpt 14-15 s,
perplexity 18-51 s, copilot 20-152 s; 2% 500s, 1% 429, 1% 503) runs time-compressed in its own
process; ``harvester run`` polls a fresh set of ids each round, with every duration it takes
(``--poll-interval``, ``--max-poll-interval``, ``--max-wait``) and ``--rate`` scaled alike, so
the run is the real-scale run played faster. The simulator counts, for each id it first serves
a Completion to, the polls it took and how long after its ready time that was (``detection``
in ``/_sim/stats``, in real-scale seconds). The two schedules alternate, ``--rounds`` each:

- ``default``: the harvester's default (``--poll-interval 4 --max-poll-interval 30``);
- ``fixed-4s``: ``--poll-interval 4 --max-poll-interval 4``, what public clients do.

Cases (all on the realistic profile, at a ``--rate`` the ids never reach but in backfill):
``stream`` (ids enter as others finish, as in any input longer than ``--max-in-play``),
``cohort`` (every id in play at once: the run can learn nothing before their own polls) and
``backfill`` (many more ids in play than ``--rate`` can poll every 4 s: queueing decides) and
``backfill-queued``, the same with every ready delay counted from the round's start (every prompt
queued just before the harvest) rather than from the id's first poll, so the lag includes the
wait for a first poll. ``--cases`` runs some cases and updates only those in a saved result.

    python -m benchmarks.polling --rounds 3        # -> results/polling.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from harvester.polling import DOCUMENTED_READY

from ._common import (
    RESULTS,
    SCRATCH,
    TOKEN,
    harvest_command,
    ids_file,
    reset_server,
    save,
    server_stats,
)
from ._common import simulator as simulator_process

# name -> (ids, real-scale --rate, --max-in-play). "stream": ids enter as others finish, as
# in any input longer than --max-in-play (a backfill of millions: 5000 in play, the rest
# waiting); "cohort": every id in play at once, nothing learned before their own polls;
# "backfill": far more ids in play than --rate polls every 4 s.
CASES: dict[str, tuple[int, float, int]] = {
    "stream": (4000, 1000.0, 400),
    "cohort": (2000, 1000.0, 5000),
    "backfill": (4000, 60.0, 5000),
    "backfill-queued": (4000, 60.0, 5000),
}
# Cases whose simulator counts each ready delay from the round's start (``serve
# --queued-at-start``: every prompt queued just before the harvest), not from the id's first
# poll: a schedule that reaches an id late then finds it late, and the lag shows it.
QUEUED_AT_START = frozenset({"backfill-queued"})
# name -> (--poll-interval, --max-poll-interval), real-scale seconds
SCHEDULES: dict[str, tuple[float, float]] = {"default": (4.0, 30.0), "fixed-4s": (4.0, 4.0)}
# --before DIR adds "before": the default flags, run by the harvester found in DIR (say, an
# export of the commit before a change: git archive HEAD~1 | tar -x -C DIR).
BEFORE = "before"
MAX_WAIT = 600.0


def harvest(ids: Path, out: Path, url: str, args: list[str], src: Path | None) -> dict[str, Any]:
    """``harvester run --json`` in a child process (with the code in ``src``, if given)."""
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    if src is not None:
        env["PYTHONPATH"] = str(src)  # and run there: ``python -m`` puts the cwd first
    done = subprocess.run(
        harvest_command(ids, out, url, *args),
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"harvester run failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


def one_run(
    url: str,
    case: str,
    schedule: str,
    round_: int,
    scale: float,
    ids_seed: int,
    before: Path | None = None,
) -> dict[str, Any]:
    """One harvest of fresh ids against a reset simulator; the server's detection counts."""
    count, rate, in_play = CASES[case]
    interval, max_interval = SCHEDULES["default" if schedule == BEFORE else schedule]
    ids = ids_file(count, seed=ids_seed)
    out = SCRATCH / "polling-out"
    shutil.rmtree(out, ignore_errors=True)
    reset_server(url)
    args = [
        f"--rate={rate / scale:g}",
        f"--concurrency={64}",
        f"--max-in-play={in_play}",
        f"--poll-interval={interval * scale:g}",
        f"--max-poll-interval={max_interval * scale:g}",
        f"--max-wait={MAX_WAIT * scale:g}",
        "--quiet",
    ]
    if schedule != BEFORE:  # the default's ready ranges on the simulator's clock too
        args.append(f"--expected-ready={DOCUMENTED_READY.scaled(scale)}")
    started = time.perf_counter()
    summary = harvest(ids, out, url, args, before if schedule == BEFORE else None)
    elapsed = time.perf_counter() - started
    stats = server_stats(url)
    detection = stats["detection"]
    shutil.rmtree(out, ignore_errors=True)
    run = {
        "case": case,
        "schedule": schedule,
        "round": round_,
        "ids": count,
        "completed": detection["completed"],
        "polls_per_completed": detection["polls_per_completed"],
        "requests_per_id": round(stats["requests"] / count, 3),
        "lag_s_p50": detection["lag_s_p50"],
        "lag_s_p90": detection["lag_s_p90"],
        "lag_s_mean": detection["lag_s_mean"],
        "unresolved": summary["unresolved"],
        "loop_lag_ms": summary.get("loop_lag_ms"),
        "elapsed_real_scale_s": round(elapsed / scale, 1),
    }
    print(
        f"  {case:10} {schedule:9} round {round_}: {run['polls_per_completed']:.2f} polls/completed"
        f"  lag p50 {run['lag_s_p50']:.2f} s p90 {run['lag_s_p90']:.2f} s"
        f"  ({run['completed']} completed, {run['unresolved']} unresolved,"
        f" {run['elapsed_real_scale_s']:.0f} s real-scale)",
        flush=True,
    )
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of each case and schedule, and the default's ratios."""
    result: dict[str, Any] = {}
    for case in CASES:
        per: dict[str, Any] = {}
        for schedule in (*SCHEDULES, BEFORE):
            mine = [r for r in runs if r["case"] == case and r["schedule"] == schedule]
            if not mine:
                continue
            per[schedule] = {
                key: round(statistics.median(r[key] for r in mine), 3)
                for key in (
                    "polls_per_completed",
                    "requests_per_id",
                    "lag_s_p50",
                    "lag_s_p90",
                    "elapsed_real_scale_s",
                )
            }
        if all(name in per for name in SCHEDULES):
            d, f = per["default"], per["fixed-4s"]
            per["default_over_fixed"] = {
                "polls": round(d["polls_per_completed"] / f["polls_per_completed"], 3),
                "lag_p50": round(d["lag_s_p50"] / f["lag_s_p50"], 3) if f["lag_s_p50"] else None,
            }
        if per:
            result[case] = per
    return result


def merged(result: dict[str, Any]) -> dict[str, Any]:
    """``result``, with the cases it did not run kept from the saved one (same rounds and
    scale), so one case can be re-measured alone."""
    path = RESULTS / "polling.json"
    if not path.exists():
        return result
    saved = json.loads(path.read_text())
    if (saved.get("rounds"), saved.get("scale")) != (result["rounds"], result["scale"]):
        return result
    ran = set(result["cases"])
    kept = {name: spec for name, spec in saved["cases"].items() if name not in ran}
    if not kept:
        return result
    order = [name for name in CASES if name in ran or name in kept]
    cases = {**kept, **result["cases"]}
    medians = {**saved["medians"], **result["medians"]}
    runs = [r for r in saved["runs"] if r["case"] not in ran] + result["runs"]
    return {
        **result,
        "cases": {name: cases[name] for name in order},
        "medians": {name: medians[name] for name in order if name in medians},
        "runs": runs,
        "updated_cases": sorted(ran),
    }


def plot(result: dict[str, Any]) -> None:
    """Per case: polls per completed id and median/p90 lag, default beside fixed 4 s."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["medians"])
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.6), dpi=100)
    shown = [s for s in (*SCHEDULES, BEFORE) if all(s in result["medians"][c] for c in cases)]
    width = 0.8 / len(shown)
    for k, schedule in enumerate(shown):
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(cases))]
        med = [result["medians"][c][schedule] for c in cases]
        polls = [m["polls_per_completed"] for m in med]
        axes[0].bar(xs, polls, width, label=schedule)
        for x, v in zip(xs, polls, strict=True):
            axes[0].text(x, v * 1.01, f"{v:.2f}", ha="center", fontsize=8)
        p50 = [m["lag_s_p50"] for m in med]
        p90 = [m["lag_s_p90"] for m in med]
        axes[1].bar(xs, p90, width, alpha=0.35, color=f"C{k}")
        axes[1].bar(xs, p50, width, label=f"{schedule} (p50; pale: p90)", color=f"C{k}")
        for x, v in zip(xs, p50, strict=True):
            axes[1].text(x, v * 1.01, f"{v:.1f}", ha="center", fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(cases)), [c.replace("-", "\n") for c in cases])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("polls per completed id")
    axes[1].set_ylabel("detection lag, s (ready -> served)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"realistic profile, median of {result['rounds']} rounds (time scale {result['scale']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "polling.png")
    print(f"-> {RESULTS / 'polling.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.25, help="simulator --time-scale")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--no-save", action="store_true", help="print only (for trials)")
    parser.add_argument(
        "--before", type=Path, help="also run the default flags with the harvester in this DIR"
    )
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    schedules = [s for s in args.schedules.split(",") if s]
    if args.before is not None:
        schedules.append(BEFORE)
    runs: list[dict[str, Any]] = []
    seed = 100
    for case in cases:
        extra = ("--queued-at-start",) if case in QUEUED_AT_START else ()
        with simulator_process("realistic", args.scale, 0.0, *extra) as url:
            print(f"{case}: {CASES[case][0]} ids, --rate {CASES[case][1]:g} (real scale)")
            for round_ in range(1, args.rounds + 1):
                # Alternate which schedule goes first, so drift in the machine's load is shared.
                order = schedules if round_ % 2 else schedules[::-1]
                for schedule in order:
                    seed += 1  # fresh ids: the simulator remembers when it first saw each
                    runs.append(one_run(url, case, schedule, round_, args.scale, seed, args.before))
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "scale": args.scale,
        "cases": {
            name: dict(zip(("ids", "rate", "max_in_play"), CASES[name], strict=True))
            for name in cases
        },
        "before": None if args.before is None else str(args.before),
        "schedules": {
            name: dict(
                zip(
                    ("poll_interval", "max_poll_interval"),
                    SCHEDULES["default" if name == BEFORE else name],
                    strict=True,
                )
            )
            for name in schedules
        },
        "medians": summarise(runs),
        "runs": runs,
    }
    for case, per in result["medians"].items():
        print(f"{case}: {per}")
    if args.no_save:
        return
    result = merged(result)
    path = save("polling", result)
    print(f"-> {path}")
    plot(result)


if __name__ == "__main__":
    main()
