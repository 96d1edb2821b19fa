"""What ``harvester bench`` prints and saves: the JSON object, the table, and the --out files
(bench.json, series.csv of per-second figures, bench.png when matplotlib is installed; the
bench itself writes requests.parquet of raw timings as it goes)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import orjson

from .bench import StepResult

__all__ = ["bench_json", "format_table", "write_outputs"]


def bench_json(steps: list[StepResult], best: float | None) -> dict[str, Any]:
    """The output object: every step in the order run, and the headline rate (or None)."""
    return {"steps": [s.as_dict() for s in steps], "max_rate_within_slo": best}


def headline(best: float | None, has_slo: bool) -> str:
    """The one-line answer to "how much can it take"."""
    if not has_slo:
        return "max rate within SLO: n/a (no --slo given)"
    if best is None:
        return "max rate within SLO: none (no step held the SLO)"
    return f"max rate within SLO: {best:g} requests/s"


def format_table(steps: list[StepResult], best: float | None, has_slo: bool) -> str:
    """A plain-text table of the steps, headline first."""
    head = (
        "offered", "sent/s", "answered/s", "sent", "dropped", "success",
        "p50 ms", "p90 ms", "p99 ms", "p999 ms", "max ms", "p99 send ms", "reached",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for s in steps:
        lat, lat_send = s.latency_ms(), s.latency_ms(from_send=True)
        rows.append(
            (
                f"{s.offered:g}{'*' if s.bisect else ''}",
                f"{s.sent_per_s:.1f}",
                f"{s.answered_per_s:.1f}",
                str(s.sent),
                str(s.dropped),
                f"{s.success_ratio:.4f}",
                *(f"{lat[k]:.1f}" for k in ("p50", "p90", "p99", "p999", "max")),
                f"{lat_send['p99']:.1f}",
                "yes" if s.rate_reached else "NO",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [headline(best, has_slo), ""]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if any(s.bisect for s in steps):
        lines.append("* a bisection step (half --step-seconds)")
    lines.append("latency from the intended send time; 'p99 send' from the actual send")
    return "\n".join(lines)


def _write_png(path: Path, steps: list[StepResult]) -> bool:
    """Latency percentiles and achieved vs offered rate, against offered rate; False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ordered = sorted(steps, key=lambda s: s.offered)
    offered = [s.offered for s in ordered]
    fig, (lat_ax, rate_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in ("p50", "p90", "p99", "p999"):
        lat_ax.plot(offered, [s.latency_ms()[name] for s in ordered], marker="o", label=name)
    lat_ax.plot(
        offered,
        [s.latency_ms(from_send=True)["p99"] for s in ordered],
        marker="x",
        linestyle="--",
        label="p99 from send",
    )
    lat_ax.set(xlabel="offered rate (requests/s)", ylabel="latency (ms)", yscale="log")
    lat_ax.legend()
    rate_ax.plot(offered, offered, color="grey", linestyle=":", label="offered")
    rate_ax.plot(offered, [s.sent_per_s for s in ordered], marker="o", label="sent/s")
    rate_ax.plot(offered, [s.answered_per_s for s in ordered], marker="o", label="answered/s")
    ok = [s.sent_per_s * s.success_ratio for s in ordered]
    rate_ax.plot(offered, ok, marker="o", label="successful/s")
    rate_ax.set(xlabel="offered rate (requests/s)", ylabel="achieved rate (requests/s)")
    rate_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def series_csv(steps: list[StepResult]) -> str:
    """Every step's per-second series as CSV, one row a second: step, offered, second, sent,
    answered, dropped, p50_ms, p99_ms, then a count column for each status (``status_200``)
    and each error kind (``error_timeout``) any second saw."""
    rows = [(i, s, second) for i, s in enumerate(steps) for second in s.as_dict()["series"]]
    statuses = sorted({k for _, _, sec in rows for k in sec["status"]}, key=lambda k: int(k))
    kinds = sorted({k for _, _, sec in rows for k in sec["errors"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["step", "offered", "second", "sent", "answered", "dropped", "p50_ms", "p99_ms"]
        + [f"status_{k}" for k in statuses]
        + [f"error_{k}" for k in kinds]
    )
    for index, step, sec in rows:
        writer.writerow(
            [index, f"{step.offered:g}", sec["second"], sec["sent"], sec["answered"],
             sec["dropped"], sec["latency_ms"]["p50"], sec["latency_ms"]["p99"]]
            + [sec["status"].get(k, 0) for k in statuses]
            + [sec["errors"].get(k, 0) for k in kinds]
        )  # fmt: skip
    return buffer.getvalue()


def write_outputs(out: Path, result: dict[str, Any], steps: list[StepResult]) -> None:
    """DIR/bench.json, DIR/series.csv and DIR/bench.png (or a note that it was skipped);
    DIR/requests.parquet is already there, written during the bench."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    (out / "series.csv").write_text(series_csv(steps), encoding="utf-8")
    if not _write_png(out / "bench.png", steps):
        print(
            "bench: note: bench.png skipped (matplotlib is not installed; "
            "pip install 'harvester[bench]')",
            file=sys.stderr,
        )
