"""Command line: ``harvester run | serve | demo | bench``.

Exit codes are part of the contract (``errors.ExitCode``): 0 every unique id has a row; 1 some
ids are unresolved (rerun to finish them); 2 usage or unreadable input; 3 the API refused the
token or account (401/402/403) or TLS failed; 4 the output could not be written; 130 stopped by
SIGINT/SIGTERM (committed rows are kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson

from . import __version__
from .errors import ExitCode, HarvesterError, UsageError
from .open_files import raise_open_files_to_hard
from .progress import setup_logging
from .report import RunResult, print_summary
from .runner import harvest
from .settings import RunSettings
from .shard import Shard
from .workers import run_workers

TOKEN_ENV = "MASSIVE_API_TOKEN"
T = TypeVar("T")
# The one place defaults live is RunSettings; the command line shows and uses its values.
DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(RunSettings)
    if f.default is not dataclasses.MISSING
}
# Commands whose options come from the simulator package: built only when asked for, so that
# ``harvester run`` loads no simulator code (nor aiohttp's server).
_SIMULATOR_COMMANDS = frozenset(("serve", "demo"))


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows only
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr (what is wrong, where to look) and exit 2,
    not argparse's usage block first: what a scheduler's log should show."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_run(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("run", help="harvest a CSV of conversation ids into a Parquet dataset")
    p.add_argument(
        "--ids", required=True, type=Path, help="CSV with an id column, or one id per line"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="dataset directory (created; reruns resume)"
    )
    p.add_argument("--base-url", default=DEFAULTS["base_url"], help="API base URL [%(default)s]")
    p.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULTS["rate"],
        help="max requests/s [%(default)s]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULTS["concurrency"],
        help="max requests in flight [%(default)s]",
    )
    p.add_argument(
        "--max-wait",
        type=_positive_float,
        default=DEFAULTS["max_wait"],
        help="seconds an id may stay unfinished before it is left unresolved [%(default)s]",
    )
    p.add_argument(
        "--id-column", default=DEFAULTS["id_column"], help="name of the id column [%(default)s]"
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on stdout"
    )
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    _add_token_options(p)
    p.add_argument(
        "--max-in-play",
        type=int,
        default=DEFAULTS["max_in_play"],
        help="ids between input and outcome at once [%(default)s]",
    )
    p.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=DEFAULTS["poll_interval"],
        help="seconds before re-polling a retrieving id; grows 1.5x a poll [%(default)s]",
    )
    p.add_argument(
        "--max-poll-interval",
        type=_positive_float,
        default=DEFAULTS["max_poll_interval"],
        help="the longest wait between two polls of one id, in seconds [%(default)s]",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=DEFAULTS["max_retries"],
        help="transient errors per id before it is left unresolved [%(default)s]",
    )
    p.add_argument(
        "--flush-interval",
        type=_positive_float,
        default=DEFAULTS["flush_interval"],
        help="commit buffered rows at least this often, in seconds [%(default)s]",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=DEFAULTS["request_timeout"],
        help="seconds one request may take before it is retried [%(default)s]",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULTS["max_body_bytes"],
        help="larger answers are refused and retried [%(default)s bytes]",
    )
    p.add_argument(
        "--shard",
        type=_shard_arg,
        default=DEFAULTS["shard"],
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
        default=DEFAULTS["log_interval"],
        help="seconds between progress log lines when not on a terminal [%(default)s]",
    )


def _add_serve(sub: argparse._SubParsersAction[_Parser], full: bool) -> None:
    p = sub.add_parser("serve", help="run the API simulator (no network, no real token)")
    if not full:
        return
    from .sim.profiles import PROFILES

    p.add_argument("--host", default="127.0.0.1", help="address to listen on [%(default)s]")
    p.add_argument("--port", type=int, default=8080, help="port; 0 for any free one [%(default)s]")
    p.add_argument("--token", default="sim-token", help="the bearer token it accepts [%(default)s]")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="realistic",
        help="how it behaves: instant (no waits), realistic (the API's timings and a few "
        "errors) or chaos (every fault) [%(default)s]",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="fixes every id's fate and content [%(default)s]"
    )
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
        "--jitter",
        type=float,
        default=None,
        metavar="SIGMA",
        help="lognormal sigma of the added latency (with --latency S the median is S; "
        "--jitter 0 is a fixed latency) [the profile's, or 0 with --latency]",
    )
    p.add_argument(
        "--capacity",
        type=float,
        default=0.0,
        help="answer 429 past this many requests a second (a token bucket: what it refuses "
        "uses no capacity); 0 for no limit [%(default)s]",
    )
    p.add_argument(
        "--retry-after",
        type=int,
        default=None,
        help="whole seconds of Retry-After on every 429/503 (before --time-scale), instead of "
        "the profile's range",
    )
    p.add_argument(
        "--first-poll-throttle-share",
        type=float,
        default=0.0,
        help="this share of ids gets one 429 or 503 on its first poll [%(default)s]",
    )
    p.add_argument(
        "--saturated",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="answer 429 to every request for this long after the first one [%(default)s]",
    )
    p.add_argument(
        "--saturated-retry-after",
        type=int,
        default=2,
        metavar="SECONDS",
        help="the Retry-After of those 429s [%(default)s]",
    )


def _add_demo(sub: argparse._SubParsersAction[_Parser], full: bool) -> None:
    p = sub.add_parser(
        "demo", help="harvest ~20k ids from the bundled simulator (no network, no token)"
    )
    if not full:
        return
    p.add_argument(
        "--ids", type=int, default=20_000, dest="count", help="how many ids [%(default)s]"
    )
    p.add_argument(
        "--out", type=Path, default=Path("harvest-demo"), help="dataset directory [%(default)s]"
    )
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def _add_token_options(p: argparse.ArgumentParser) -> None:
    """Where the token comes from and where it may go: the same for ``run`` and ``bench``."""
    p.add_argument(
        "--token-file", type=Path, help=f"read the token from this file instead of ${TOKEN_ENV}"
    )
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow sending the token over plain http to a non-loopback host",
    )


def _add_bench(sub: argparse._SubParsersAction[_Parser], full: bool) -> None:
    p = sub.add_parser(
        "bench",
        help="measure an API's capacity: constant request rates in steps, latency percentiles",
    )
    if not full:
        return
    from .bench import BenchSettings  # only for `bench`: `run` loads no benchmark code

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(BenchSettings)
        if f.default is not dataclasses.MISSING
    }
    p.add_argument("--base-url", required=True, help="the API, or any compatible server")
    p.add_argument(
        "--ids", type=Path, help="CSV of ids to cycle through (an id column, or one a line)"
    )
    p.add_argument("--synthetic", type=int, metavar="N", help="cycle through N random uuids")
    p.add_argument(
        "--id-column", default=defaults["id_column"], help="name of the id column [%(default)s]"
    )
    p.add_argument("--rates", metavar="R1,R2,...", help="the offered rates, requests/s, in order")
    p.add_argument("--ramp", metavar="FROM:TO:STEP", help="offered rates FROM, FROM+STEP, ... TO")
    p.add_argument(
        "--step-seconds",
        type=_positive_float,
        default=defaults["step_seconds"],
        help="seconds of each step's schedule [%(default)s]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=defaults["concurrency"],
        help="max requests in flight [%(default)s]",
    )
    p.add_argument(
        "--slo",
        metavar="SPEC",
        help="what a step must meet, like success=0.99,p99=500ms (p50/p90/p99/p999, ms or s)",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=defaults["request_timeout"],
        help="seconds one request may take before it counts as a timeout [%(default)s]",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--out", type=Path, help="also write bench.json, requests.parquet and bench.png here"
    )
    _add_token_options(p)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; the simulator's commands get their options only when ``command`` is
    one of them or None (the whole parser)."""
    parser = _Parser(prog="harvester", description=__doc__)
    parser.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # each a _Parser too
    full = command is None or command in _SIMULATOR_COMMANDS
    _add_run(sub)
    _add_serve(sub, full)
    _add_demo(sub, full)
    _add_bench(sub, command is None or command == "bench")
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


def report(result: RunResult, *, as_json: bool) -> int:
    """Print the summary and any abort line; return the exit code."""
    print_summary(result.summary, result.message, as_json=as_json)
    return result.exit_code


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    settings = settings_from(args)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {args.workers})")
    if args.workers == 1:
        return report(run_loop(harvest(settings)), as_json=settings.json_summary)
    result = run_loop(run_workers(argv, settings, args.workers))
    return report(result, as_json=settings.json_summary)


def _cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .sim.server import serve

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
            jitter=args.jitter,
            retry_after=args.retry_after,
            first_poll_throttle_share=args.first_poll_throttle_share,
            saturated_s=args.saturated,
            saturated_retry_after_s=args.saturated_retry_after,
        )
    )
    return 0


def _cmd_demo(args: argparse.Namespace, argv: list[str]) -> int:
    from .sim.demo import run_demo

    return run_loop(run_demo(count=args.count, out=args.out, progress=not args.no_progress))


def _cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    # Imported here: `harvester run` loads no benchmark code.
    from .bench import BenchSettings, parse_ramp, parse_rates, parse_slo, run_bench
    from .bench_report import bench_json, format_table, headline, write_outputs

    if (args.rates is None) == (args.ramp is None):
        raise UsageError("give exactly one of --rates R1,R2,... or --ramp FROM:TO:STEP")
    rates = parse_rates(args.rates) if args.rates is not None else parse_ramp(args.ramp)
    slo = parse_slo(args.slo) if args.slo is not None else None
    settings = BenchSettings(
        base_url=args.base_url,
        token=read_token(args.token_file),
        rates=rates,
        ids_path=args.ids,
        synthetic=args.synthetic,
        id_column=args.id_column,
        step_seconds=args.step_seconds,
        concurrency=args.concurrency,
        slo=slo,
        json_output=args.json,
        out_dir=args.out,
        request_timeout=args.request_timeout,
        allow_insecure=args.allow_insecure,
    )
    steps, best, timings = run_loop(run_bench(settings))
    result = bench_json(steps, best)
    if settings.out_dir is not None:
        write_outputs(settings.out_dir, result, steps, timings)
    if settings.json_output:
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.flush()
        print(headline(best, slo is not None), file=sys.stderr)
    else:
        print(format_table(steps, best, slo is not None))
    return ExitCode.OK


_COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "demo": _cmd_demo, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harvester`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args, unknown = build_parser(command if command in _COMMANDS else None).parse_known_args(argv)
    if unknown:  # named with the command's own help, not the top level's
        where = f"harvester {args.command}"
        print(
            f"{where}: error: unrecognized arguments: {' '.join(unknown)} (see {where} --help)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    setup_logging()
    try:
        return _COMMANDS[args.command](args, argv)
    except HarvesterError as exc:
        what = "output error" if exc.exit_code is ExitCode.OUTPUT else "error"
        print(f"harvester: {what}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
