"""What a run tells its user: run ids, the summary as text or JSON, and the saved reports.

Reports live beside the data under ``DIR/_harvester/<kind>/<run id>.json`` (a metadata path
every reader skips): ``runs`` for summaries, ``timelines`` for the per-second figures.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .dataset import META_DIR
from .errors import OutputError
from .metrics import MAX_WAIT_REACHED, RETRIES_USED_UP, STOPPED
from .settings import RunSettings
from .storage import Store, open_store


def new_run_id(clock: Callable[[], float] = time.time) -> str:
    """A sortable, collision-free name for this run's files and reports."""
    stamp = datetime.fromtimestamp(clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def save_report(
    root: Path | str | Store, run_id: str, summary: dict[str, Any], folder: str = "runs"
) -> None:
    """Keep the run's report beside the data, in a metadata path readers skip."""
    store = open_store(root)
    rel = f"{META_DIR}/{folder}/{run_id}.json"
    try:
        store.put_bytes(rel, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise OutputError(f"cannot save the run report in {store.url} ({exc.strerror})") from exc


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    lat = summary["latency_ms"]
    lag = summary.get("loop_lag_ms", {})
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    paused = summary.get("paused_s", 0)
    return "\n".join(
        [
            f"{summary['unique_ids']} unique ids in {summary['elapsed_s']:.1f} s "
            f"-> {summary['out']}",
            f"  completed {summary['completed']}  failed {summary['failed']}  "
            f"invalid {summary['invalid']}  unresolved {summary['unresolved']}  "
            f"(already done {summary['already_done']}, duplicates {summary['duplicates']})",
            f"  requests {summary['requests']} ({summary['requests_per_s']}/s), "
            f"retries {summary['retries']}, 429 {summary.get('throttled_429', 0)}, "
            f"503 {summary.get('throttled_503', 0)}, paused {paused} s; errors: {errors}",
            f"  latency ms p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}"
            f"   peak RSS {summary['peak_rss_mb']} MiB",
            f"  event-loop lag ms p50 {lag.get('p50', 0.0)}  p99 {lag.get('p99', 0.0)}  "
            f"max {lag.get('max', 0.0)}",
        ]
    )


# What a last error label means, where a user can act on it.
_MEANING = {
    "connect_error": "the server at {base_url} is unreachable; check --base-url and the network",
    "timeout": "no answer within --request-timeout ({request_timeout:g} s)",
    "http_429": "the server kept throttling (429); lower --rate",
    "http_503": "the server stayed unavailable (503)",
}


def explain_unresolved(reasons: Mapping[str, int], settings: RunSettings) -> str:
    """One line for exit 1: how many ids are unresolved and the commonest reason why."""
    total = sum(reasons.values())
    if not total:
        return "some ids are unresolved; rerun the same command to finish them"
    reason, count = max(reasons.items(), key=lambda item: item[1])
    cause, _, last = reason.partition(":")
    if count == total:
        share = "all"
    elif 2 * count > total:
        share = f"most ({count})"
    else:
        share = f"{count}, the commonest reason,"
    meaning = _MEANING.get(last, "").format(
        base_url=settings.base_url, request_timeout=settings.request_timeout
    )
    if cause == MAX_WAIT_REACHED and last == "retrieving":
        why = (
            f"{share} still retrieving when --max-wait ({settings.max_wait:g} s) ran out; "
            "raise --max-wait for slow models"
        )
    elif cause == MAX_WAIT_REACHED:
        why = f"{share} still failing with {last} when --max-wait ({settings.max_wait:g} s) ran out"
    elif cause == RETRIES_USED_UP:
        why = f"{share} used up --max-retries ({settings.max_retries}) on {last}"
    elif cause == STOPPED:
        why = f"{share} still in play when the run stopped"
    else:
        why = f"{share}: {reason}"
    if meaning:
        why += f" ({meaning})"
    ids = "id is" if total == 1 else "ids are"
    return f"{total} {ids} unresolved: {why}; rerun the same command to poll them again"


def print_summary(summary: dict[str, Any], message: str | None, *, as_json: bool) -> None:
    """The summary on stdout (one JSON object, or text) and any abort line on stderr."""
    if as_json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print(format_summary(summary))
    if message:
        print(f"harvester: {message}", file=sys.stderr)


@dataclass
class RunResult:
    """What the command line needs: an exit code, the summary, and the abort reason if any."""

    exit_code: int
    summary: dict[str, Any]
    message: str | None = None
