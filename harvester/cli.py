"""Command line: ``harvester run | serve | demo``. Exit codes are part of the contract.

0 every unique id has a row; 1 some ids are unresolved (rerun to finish them); 2 usage or
unreadable input; 3 aborted on 401/402/403; 4 the output could not be written; 130 stopped
by SIGINT/SIGTERM (committed rows are kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .errors import SinkError, UsageError
from .progress import setup_logging
from .runner import EXIT_OUTPUT, EXIT_USAGE, RunResult, harvest
from .settings import DEFAULT_BASE_URL, RunSettings
from .shard import WHOLE, Shard

TOKEN_ENV = "MASSIVE_API_TOKEN"
T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows only
        return asyncio.run(coro)
    return uvloop.run(coro)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="harvest a CSV of conversation ids into a Parquet dataset")
    p.add_argument(
        "--ids", required=True, type=Path, help="CSV with an id column, or one id per line"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="dataset directory (created; reruns resume)"
    )
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API base URL [%(default)s]")
    p.add_argument(
        "--rate", type=_positive_float, default=100.0, help="max requests/s [%(default)s]"
    )
    p.add_argument(
        "--concurrency", type=int, default=64, help="max requests in flight [%(default)s]"
    )
    p.add_argument(
        "--max-wait",
        type=_positive_float,
        default=600.0,
        help="seconds an id may stay unfinished before it is left unresolved [%(default)s]",
    )
    p.add_argument("--id-column", default="id", help="name of the id column [%(default)s]")
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on stdout"
    )
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument(
        "--token-file", type=Path, help=f"read the token from this file instead of ${TOKEN_ENV}"
    )
    p.add_argument("--max-in-play", type=int, default=5000, help="ids polled at once [%(default)s]")
    p.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=4.0,
        help="seconds before re-polling a retrieving id; grows 1.5x a poll [%(default)s]",
    )
    p.add_argument("--max-poll-interval", type=_positive_float, default=30.0, help="[%(default)s]")
    p.add_argument(
        "--max-retries",
        type=int,
        default=10,
        help="transient errors per id before it is left unresolved [%(default)s]",
    )
    p.add_argument(
        "--flush-interval",
        type=_positive_float,
        default=5.0,
        help="commit buffered rows at least this often, in seconds [%(default)s]",
    )
    p.add_argument("--request-timeout", type=_positive_float, default=60.0, help="[%(default)s]")
    p.add_argument("--max-body-bytes", type=int, default=25 * 1024 * 1024, help="[%(default)s]")
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow sending the token over plain http to a non-loopback host",
    )
    p.add_argument(
        "--shard",
        type=_shard_arg,
        default=WHOLE,
        help="harvest only shard K of N (K/N, 0-based) by a stable hash of the id; "
        "N processes with K=0..N-1 split one input with no coordination",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes on this machine, each with 1/N of --rate, --concurrency and the ids "
        "[%(default)s]",
    )
    p.add_argument("--worker-stats", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with exit 2 at the first input line that is not a uuid, naming file and "
        "line (default: such values become invalid rows)",
    )
    p.add_argument(
        "--log-interval",
        type=_positive_float,
        default=10.0,
        help="seconds between progress log lines when not on a terminal [%(default)s]",
    )


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .simulator import PROFILES

    p = sub.add_parser("serve", help="run the API simulator (no network, no real token)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default="sim-token", help="the bearer token it accepts [%(default)s]")
    p.add_argument("--profile", choices=sorted(PROFILES), default="realistic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="multiply every delay (0.01 runs 100x faster) [%(default)s]",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=None,
        help="answer every request after exactly this many seconds (before --time-scale), "
        "instead of the profile's latency",
    )
    p.add_argument(
        "--capacity",
        type=float,
        default=0.0,
        help="answer 429 past this many requests a second; 0 for no limit [%(default)s]",
    )


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="harvest ~20k ids from an in-process simulator")
    p.add_argument(
        "--ids", type=int, default=20_000, dest="count", help="how many ids [%(default)s]"
    )
    p.add_argument("--out", type=Path, default=Path("harvest-demo"), help="[%(default)s]")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(prog="harvester", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_serve(sub)
    _add_demo(sub)
    return parser


def read_token(token_file: Path | None) -> str:
    """The API token from --token-file or the environment; never echoed."""
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UsageError(f"--token-file {token_file}: not UTF-8 text") from None
        except OSError as exc:
            raise UsageError(f"--token-file {token_file}: cannot read it ({exc.strerror})") from exc
    return os.environ.get(TOKEN_ENV, "").strip()


def settings_from(args: argparse.Namespace) -> RunSettings:
    """Validated run settings from parsed arguments."""
    return RunSettings(
        ids_path=args.ids,
        out_dir=args.out,
        token=read_token(args.token_file),
        base_url=args.base_url,
        rate=args.rate,
        concurrency=args.concurrency,
        max_in_play=args.max_in_play,
        max_wait=args.max_wait,
        poll_interval=args.poll_interval,
        max_poll_interval=args.max_poll_interval,
        max_retries=args.max_retries,
        id_column=args.id_column,
        flush_interval=args.flush_interval,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        progress=not args.no_progress,
        json_summary=args.json,
        allow_insecure=args.allow_insecure,
        log_interval=args.log_interval,
        shard=args.shard,
        worker_stats=args.worker_stats,
        strict=args.strict,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    lat = summary["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    return "\n".join(
        [
            f"{summary['unique_ids']} unique ids in {summary['elapsed_s']:.1f} s "
            f"-> {summary['out']}",
            f"  completed {summary['completed']}  failed {summary['failed']}  "
            f"invalid {summary['invalid']}  unresolved {summary['unresolved']}  "
            f"(already done {summary['already_done']}, duplicates {summary['duplicates']})",
            f"  requests {summary['requests']} ({summary['requests_per_s']}/s), "
            f"retries {summary['retries']}, throttled {summary['throttled']}; errors: {errors}",
            f"  latency ms p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}"
            f"   peak RSS {summary['peak_rss_mb']} MiB",
        ]
    )


def report(result: RunResult, *, as_json: bool) -> int:
    """Print the summary (JSON on stdout, or human text) and any abort line on stderr."""
    if as_json:
        sys.stdout.write(orjson.dumps(result.summary).decode() + "\n")
    else:
        print(format_summary(result.summary))
    if result.message:
        print(f"harvester: {result.message}", file=sys.stderr)
    return result.exit_code


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    settings = settings_from(args)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {args.workers})")
    if args.workers == 1:
        return report(run_loop(harvest(settings)), as_json=settings.json_summary)
    from .workers import run_workers

    result = run_loop(run_workers(argv, settings, args.workers))
    return report(result, as_json=settings.json_summary)


def _cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .limits import raise_open_files_to_hard
    from .simulator import serve

    raise_open_files_to_hard()  # one file per client connection
    run_loop(
        serve(
            host=args.host,
            port=args.port,
            token=args.token,
            profile=args.profile,
            seed=args.seed,
            time_scale=args.time_scale,
            capacity=args.capacity,
            latency=args.latency,
        )
    )
    return 0


def _cmd_demo(args: argparse.Namespace, argv: list[str]) -> int:
    from .demo import run_demo

    return run_loop(run_demo(count=args.count, out=args.out, progress=not args.no_progress))


_COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harvester`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return _COMMANDS[args.command](args, argv)
    except UsageError as exc:
        print(f"harvester: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SinkError as exc:
        print(f"harvester: output error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        return 130
