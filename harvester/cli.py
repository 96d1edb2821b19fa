"""Command line: ``harvester run | serve | demo | bench | config show | inspect``.

Exit codes are part of the contract; they and their meanings live in ``errors.ExitCode`` and
``run --help`` lists them. Settings of ``run`` and ``bench`` also come from a TOML file
(``--config``) and ``HARVESTER_<NAME>`` variables: ``config.py`` merges those layers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson

from . import __version__
from .config import CONFIG_ENV, ENV_PREFIX, Resolved, resolve, setting_actions, shown
from .errors import ExitCode, HarvesterError, UsageError
from .inspect import SMALL_FILE_BYTES
from .open_files import raise_open_files_to_hard
from .polling import ExpectedReady
from .progress import LOG_FORMATS, LOG_LEVELS, LogSettings, hide_in_logs, setup_logging
from .report import RunResult, print_summary
from .runner import harvest
from .settings import ENDPOINT_PATHS, TRANSPORTS, RunSettings
from .shard import Shard
from .workers import run_workers

TOKEN_ENV = "MASSIVE_API_TOKEN"
T = TypeVar("T")


def _defaults(cls: type) -> dict[str, Any]:
    """A settings dataclass's defaults: the one place they live; the options show and use them."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


DEFAULTS: dict[str, Any] = _defaults(RunSettings)
LOG_DEFAULTS: dict[str, Any] = _defaults(LogSettings)
# Commands whose options come from the simulator package: built only when asked for, so that
# ``harvester run`` loads no simulator code (nor aiohttp's server).
_SIMULATOR_COMMANDS = frozenset(("serve", "demo"))
# Commands whose settings may also come from --config and HARVESTER_* variables.
_CONFIGURED_COMMANDS = frozenset(("run", "bench", "config"))
DESCRIPTION = """\
Harvest async AI completions from the Massive API into a hive-partitioned Parquet dataset
(harvester run), measure an API's capacity (harvester bench), or try it all offline against
the bundled simulator (harvester serve, harvester demo).

Every run and bench option can also be set in a TOML file (--config PATH) or as an
environment variable HARVESTER_<NAME> (HARVESTER_RATE=50); the command line wins over the
environment, which wins over the file. See: harvester config show."""


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows only
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks (the exit code table); wider columns."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr (what is wrong, where to look) and exit 2,
    not argparse's usage block first: what a scheduler's log should show."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mib(n: int) -> str:
    """``26214400 bytes (25 MiB)``: a byte count as help shows it."""
    return f"{n} bytes ({n / 2**20:g} MiB)" if n % 2**10 == 0 else f"{n} bytes"


def _run_epilog() -> str:
    codes = "\n".join(f"  {int(code):<4} {code.meaning}" for code in ExitCode)
    return (
        "environment:\n"
        f"  {TOKEN_ENV}  the API token: required (or --token-file PATH); never printed\n"
        f"  {ENV_PREFIX}<NAME>   any option above, e.g. {ENV_PREFIX}RATE=50,\n"
        f"                     {ENV_PREFIX}MAX_IN_PLAY=2000 (flags: 1/0, true/false)\n"
        f"  {CONFIG_ENV}   the --config file, when --config is not given\n"
        "  precedence: command line > environment > --config file > defaults\n"
        "\n"
        f"exit codes:\n{codes}\n"
        "  128+N with --workers: a worker was killed by signal N (137: the OOM killer)"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _parsed_by(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type=``: its UsageError becomes argparse's one-line error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


def _add_run(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` (also those of ``config show``): each one a setting."""
    p.add_argument(
        "--ids",
        type=str,  # a path or a URI (s3://...): a Path would squash the URI's //
        metavar="PATH",
        help="CSV with an id column, or one id per line; a path or s3://... URI, gzip or "
        "zstd by suffix (.gz, .zst) (required: here, in --config or as "
        f"{ENV_PREFIX}IDS)",
    )
    p.add_argument(
        "--out",
        type=str,  # a directory or a URI (s3://bucket/prefix); storage.parse_location
        metavar="DIR|URI",
        help="dataset directory or s3://bucket/prefix; created; a rerun on it resumes "
        "(required, like --ids)",
    )
    p.add_argument(
        "--base-url",
        default=DEFAULTS["base_url"],
        metavar="URL",
        help="the API, or any compatible server [%(default)s]",
    )
    p.add_argument(
        "--endpoint",
        choices=tuple(ENDPOINT_PATHS),
        default=DEFAULTS["endpoint"],
        help="what to poll: completions is GET /ai/completions?id= (the spec's), ai the newer "
        "GET /ai?id= (status objects answered with 200) [%(default)s]",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=DEFAULTS["transport"],
        help="HTTP client for polls: http1 is harvester's lean keep-alive client, aiohttp the "
        "general one (a fallback for servers http1 does not suit) [%(default)s]",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULTS["rate"],
        metavar="PER_S",
        help="most requests a second; throttling may go lower, never higher [%(default)s]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULTS["concurrency"],
        metavar="N",
        help="most requests in flight at once [%(default)s]",
    )
    p.add_argument(
        "--max-wait",
        type=_positive_float,
        default=DEFAULTS["max_wait"],
        metavar="SECONDS",
        help="seconds an id may stay unfinished before it is left unresolved [%(default)s]",
    )
    p.add_argument(
        "--id-column",
        default=DEFAULTS["id_column"],
        metavar="NAME",
        help="name of the id column, case-insensitive [%(default)s]",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="periodic log lines instead of the live bar [off]",
    )
    _add_token_options(p)
    p.add_argument(
        "--max-in-play",
        type=int,
        default=DEFAULTS["max_in_play"],
        metavar="N",
        help="ids between input and outcome at once (polled or waiting to be) [%(default)s]",
    )
    p.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=DEFAULTS["poll_interval"],
        metavar="SECONDS",
        help="the shortest wait between two polls of one id, in seconds; where the run has "
        "not yet learned when ids become ready, the first re-poll, growing 1.5x a poll "
        "[%(default)s]",
    )
    p.add_argument(
        "--max-poll-interval",
        type=_positive_float,
        default=DEFAULTS["max_poll_interval"],
        metavar="SECONDS",
        help="the longest wait between two polls of one id, in seconds; equal to "
        "--poll-interval: a fixed interval, nothing learned [%(default)s]",
    )
    p.add_argument(
        "--expected-ready",
        type=_parsed_by(ExpectedReady.parse),
        default=DEFAULTS["expected_ready"],
        metavar="RANGES",
        help="seconds after its first poll in which an id is expected to be ready, as "
        "ranges such as 7-8,14-15: the re-polls are first placed just after them, then where "
        "the run finds ids ready; none: 4 s growing 1.5x until it has learned; the default "
        "is the provider's public timings by model [%(default)s]",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=DEFAULTS["max_retries"],
        metavar="N",
        help="transient errors per id before it is left unresolved [%(default)s]",
    )
    p.add_argument(
        "--unreachable-after",
        type=_positive_float,
        default=DEFAULTS["unreachable_after"],
        metavar="SECONDS",
        help=f"stop with exit {int(ExitCode.UNREACHABLE)} when no request has got any HTTP "
        "answer this many seconds after the first failed connection (refused, DNS, timeout); "
        "once the server has answered, outages are ridden out [%(default)s]",
    )
    p.add_argument(
        "--flush-interval",
        type=_positive_float,
        default=DEFAULTS["flush_interval"],
        metavar="SECONDS",
        help="commit buffered rows at least this often: the most a crash can lose [%(default)s]",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=DEFAULTS["request_timeout"],
        metavar="SECONDS",
        help="seconds one request may take before it is retried [%(default)s]",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULTS["max_body_bytes"],
        metavar="BYTES",
        help=f"larger answers are refused and retried [{_mib(DEFAULTS['max_body_bytes'])}]",
    )
    p.add_argument(
        "--shard",
        type=_parsed_by(Shard.parse),
        default=DEFAULTS["shard"],
        metavar="K/N",
        help="harvest only shard K of N (0-based) by a stable hash of the id; N processes "
        "with K=0..N-1 split one input with no coordination [%(default)s: the whole input]",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULTS["workers"],
        metavar="N",
        help="processes on this machine, each with 1/N of --rate, --concurrency and the ids "
        "[%(default)s]",
    )
    p.add_argument("--worker-stats", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with exit 2 at the first input line that is not a uuid, naming file and "
        "line [off: such values become invalid rows]",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="at the end, merge this run's small files (see harvester compact) [off]",
    )
    p.add_argument(
        "--lease-ttl",
        type=_positive_float,
        default=DEFAULTS["lease_ttl"],
        metavar="SECONDS",
        help="object storage: how long a killed run's shard lease outlives it [%(default)s]",
    )
    p.add_argument(
        "--log-interval",
        type=_positive_float,
        default=DEFAULTS["log_interval"],
        metavar="SECONDS",
        help="seconds between progress log lines when not on a terminal [%(default)s]",
    )
    _add_metrics_options(p, DEFAULTS)
    _add_log_options(p)


def _add_metrics_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Where ``run`` and ``bench`` serve Prometheus metrics (harvester/exporter.py)."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=defaults["metrics_port"],
        metavar="PORT",
        help="serve Prometheus text at http://HOST:PORT/metrics while it runs; 0 for any free "
        "port (logged) [none: no endpoint]",
    )
    p.add_argument(
        "--metrics-host",
        default=defaults["metrics_host"],
        metavar="ADDRESS",
        help="address the metrics endpoint listens on; 0.0.0.0 for every interface [%(default)s]",
    )


def _add_log_options(p: argparse.ArgumentParser) -> None:
    """How ``run`` and ``bench`` log (on stderr; stdout is only the summary)."""
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=LOG_DEFAULTS["log_format"],
        help="text lines, or one JSON object a line (timestamp, level, event, fields) for log "
        "search [%(default)s]",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=LOG_DEFAULTS["log_level"],
        help="the least severe level logged [%(default)s]",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="log only warnings and errors, and show no progress [off]",
    )


def _add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML file of settings: keys are the option names with _ for - (rate = 50) "
        f"[${CONFIG_ENV}, or none]",
    )


def _add_json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout")


def _add_serve(p: argparse.ArgumentParser) -> None:
    from .sim.profiles import PROFILES

    p.add_argument(
        "--host", default="127.0.0.1", metavar="ADDRESS", help="address to listen on [%(default)s]"
    )
    p.add_argument(
        "--port", type=int, default=8080, metavar="N", help="port; 0 for any free one [%(default)s]"
    )
    p.add_argument(
        "--token",
        default="sim-token",
        metavar="TOKEN",
        help="the bearer token it accepts (a test value, not a secret) [%(default)s]",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="realistic",
        help="how it behaves: instant (no waits), realistic (the API's timings and a few "
        "errors) or chaos (every fault) [%(default)s]",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="fixes every id's fate and content [%(default)s]",
    )
    p.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        metavar="FACTOR",
        help="multiply every delay (0.01 runs 100x faster) [%(default)s]",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=None,
        metavar="SECONDS",
        help="answer every request after exactly this many seconds (before --time-scale), "
        "instead of the profile's latency [the profile's]",
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
        metavar="PER_S",
        help="answer 429 past this many requests a second (a token bucket: what it refuses "
        "uses no capacity); 0 for no limit [%(default)s]",
    )
    p.add_argument(
        "--retry-after",
        type=int,
        default=None,
        metavar="SECONDS",
        help="whole seconds of Retry-After on every 429/503 (before --time-scale), instead of "
        "the profile's range [the profile's]",
    )
    p.add_argument(
        "--first-poll-throttle-share",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="this share (0 to 1) of ids gets one 429 or 503 on its first poll [%(default)s]",
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
    p.add_argument(
        "--queued-at-start",
        action="store_true",
        help="count every id's ready delay from the server's start (or POST /_sim/reset), as "
        "if every prompt was queued then [off: from the id's first request]",
    )


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ids",
        type=int,
        default=20_000,
        dest="count",
        metavar="N",
        help="how many ids [%(default)s]",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("harvest-demo"),
        metavar="DIR",
        help="dataset directory [%(default)s]",
    )
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar [off]")


def _add_token_options(p: argparse.ArgumentParser) -> None:
    """Where the token comes from and where it may go: the same for ``run`` and ``bench``."""
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"read the token from this file (a mounted secret) [${TOKEN_ENV}]",
    )
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow sending the token over plain http to a non-loopback host [off]",
    )


def _add_bench(p: argparse.ArgumentParser) -> None:
    from .bench import BenchSettings  # only for `bench`: `run` loads no benchmark code

    defaults = _defaults(BenchSettings)
    p.add_argument(
        "--base-url",
        metavar="URL",
        help="the API, or any compatible server (required: here, in --config or as "
        f"{ENV_PREFIX}BASE_URL)",
    )
    ids = p.add_mutually_exclusive_group()  # one setting for --config and the environment
    ids.add_argument(
        "--ids",
        type=Path,
        metavar="PATH",
        help="CSV of ids to cycle through (an id column, or one a line)",
    )
    ids.add_argument("--synthetic", type=int, metavar="N", help="or cycle through N random uuids")
    p.add_argument(
        "--id-column",
        default=defaults["id_column"],
        metavar="NAME",
        help="name of the id column [%(default)s]",
    )
    rates = p.add_mutually_exclusive_group()
    rates.add_argument(
        "--rates", metavar="R1,R2,...", help="the offered rates, requests/s, in order"
    )
    rates.add_argument(
        "--ramp", metavar="FROM:TO:STEP", help="or offered rates FROM, FROM+STEP, ... TO"
    )
    p.add_argument(
        "--step-seconds",
        type=_positive_float,
        default=defaults["step_seconds"],
        metavar="SECONDS",
        help="seconds of each step's schedule [%(default)s]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=defaults["concurrency"],
        metavar="N",
        help="most requests in flight at once [%(default)s]",
    )
    p.add_argument(
        "--slo",
        metavar="SPEC",
        help="what a step must meet, like success=0.99,p99=500ms (p50/p90/p99/p999, ms or s) "
        "[none: report every step]",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=defaults["request_timeout"],
        metavar="SECONDS",
        help="seconds one request may take before it counts as a timeout [%(default)s]",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write bench.json, requests.parquet and bench.png here [none]",
    )
    _add_token_options(p)
    _add_metrics_options(p, defaults)
    _add_log_options(p)


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir", metavar="DIR|URI", help="the dataset: a run's --out, a directory or s3://..."
    )
    _add_json_option(p, "the figures")


def _add_compact(p: argparse.ArgumentParser) -> None:
    from .compact import CompactSettings

    p.add_argument("dir", type=str, metavar="DIR|URI", help="the dataset (a run's --out)")
    p.add_argument(
        "--target-size",
        type=int,
        default=CompactSettings().target_bytes,
        metavar="BYTES",
        help="a merged file stops growing past this many bytes stored [%(default)s]",
    )
    _add_json_option(p, "the file counts")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; each command gets its options only when ``command`` is it or None
    (the whole parser), so that ``harvester run`` imports no simulator or benchmark code."""
    parser = _Parser(prog="harvester", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def wanted(name: str) -> bool:
        return command is None or command == name

    run = sub.add_parser(
        "run",
        help="harvest a CSV of conversation ids into a Parquet dataset",
        description="Harvest a CSV of conversation ids into a Parquet dataset in DIR.",
        epilog=_run_epilog(),
    )
    _add_run(run)
    _add_json_option(run, "the summary")
    _add_config_option(run)
    serve = sub.add_parser("serve", help="run the API simulator (no network, no real token)")
    if wanted("serve"):
        _add_serve(serve)
    demo = sub.add_parser(
        "demo", help="harvest ~20k ids from the bundled simulator (no network, no token)"
    )
    if wanted("demo"):
        _add_demo(demo)
    bench = sub.add_parser(
        "bench",
        help="measure an API's capacity: constant request rates in steps, latency percentiles",
    )
    if wanted("bench"):
        _add_bench(bench)
        _add_json_option(bench, "the result")
        _add_config_option(bench)
    config = sub.add_parser("config", help="show the effective run settings and their sources")
    shows = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = shows.add_parser(
        "show",
        help="print the run settings these options, the environment and --config give",
        description="Print the settings `harvester run` would use with these options, and "
        "where each came from (default, file, env or cli). The token is never shown.",
    )
    _add_run(show)
    _add_json_option(show, 'the settings, {"rate": {"value": 100.0, "source": "default"}, ...},')
    _add_config_option(show)
    inspect = sub.add_parser(
        "inspect",
        help="rows by status, model and date, files and the last runs of a DIR",
        description="What a dataset holds, in any state a run left it: rows by status, by model\n"
        "and by harvest date; data files, bytes and small files (under "
        f"{SMALL_FILE_BYTES / 2**20:g} MiB); the last\n"
        "runs from DIR/_harvester/runs. Exit 2 when DIR is missing or holds no dataset.",
    )
    _add_inspect(inspect)
    _add_compact(sub.add_parser("compact", help="merge a dataset's small files, exactly-once"))
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


def _required(args: argparse.Namespace, *keys: str) -> None:
    for key in keys:
        if getattr(args, key) is None:
            option = "--" + key.replace("_", "-")
            raise UsageError(
                f"{option} is required: give it, or set {key} in --config or "
                f"{ENV_PREFIX}{key.upper()}"
            )


def settings_from(args: argparse.Namespace) -> RunSettings:
    """Validated run settings from parsed arguments (with the --config and env layers)."""
    _required(args, "ids", "out")
    token = read_token(args.token_file)
    hide_in_logs(token)
    return RunSettings(
        ids_path=args.ids,
        out_dir=args.out,
        token=token,
        base_url=args.base_url,
        rate=args.rate,
        concurrency=args.concurrency,
        max_in_play=args.max_in_play,
        max_wait=args.max_wait,
        poll_interval=args.poll_interval,
        max_poll_interval=args.max_poll_interval,
        expected_ready=args.expected_ready,
        max_retries=args.max_retries,
        id_column=args.id_column,
        flush_interval=args.flush_interval,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        progress=not (args.no_progress or args.quiet),
        json_summary=args.json,
        allow_insecure=args.allow_insecure,
        log_interval=args.log_interval,
        shard=args.shard,
        # A --workers child runs alone, whatever its --config file or environment says.
        workers=1 if args.worker_stats else args.workers,
        worker_stats=args.worker_stats,
        strict=args.strict,
        compact=args.compact,
        lease_ttl=args.lease_ttl,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        endpoint=args.endpoint,
        transport=args.transport,
        unreachable_after=args.unreachable_after,
    )


def log_settings(args: argparse.Namespace) -> LogSettings:
    """How this command logs; the defaults for commands without the log options."""
    return LogSettings(
        **{name: getattr(args, name) for name in LOG_DEFAULTS if hasattr(args, name)}
    )


def report(result: RunResult, *, as_json: bool) -> int:
    """Print the summary and any abort line; return the exit code."""
    print_summary(result.summary, result.message, as_json=as_json)
    return result.exit_code


def _cmd_run(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    settings = settings_from(args)
    if settings.workers == 1:
        return report(run_loop(harvest(settings)), as_json=settings.json_summary)
    result = run_loop(run_workers(argv, settings, settings.workers))
    return report(result, as_json=settings.json_summary)


def _cmd_serve(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
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
            queued_at_start=args.queued_at_start,
        )
    )
    return 0


def _cmd_demo(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    from .sim.demo import run_demo

    return run_loop(run_demo(count=args.count, out=args.out, progress=not args.no_progress))


def _cmd_bench(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    # Imported here: `harvester run` loads no benchmark code.
    from .bench import BenchSettings, parse_ramp, parse_rates, parse_slo, run_bench
    from .bench_report import bench_json, format_table, headline, write_outputs

    _required(args, "base_url")
    if (args.rates is None) == (args.ramp is None):
        raise UsageError("give exactly one of --rates R1,R2,... or --ramp FROM:TO:STEP")
    rates = parse_rates(args.rates) if args.rates is not None else parse_ramp(args.ramp)
    slo = parse_slo(args.slo) if args.slo is not None else None
    token = read_token(args.token_file)
    hide_in_logs(token)
    settings = BenchSettings(
        base_url=args.base_url,
        token=token,
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
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    steps, best = run_loop(run_bench(settings))
    result = bench_json(steps, best)
    if settings.out_dir is not None:
        write_outputs(settings.out_dir, result, steps)
    if settings.json_output:
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.flush()
        print(headline(best, slo is not None), file=sys.stderr)
    else:
        print(format_table(steps, best, slo is not None))
    return ExitCode.OK


def _cmd_config(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    """``config show``: every run setting, its effective value and its source; no token."""
    assert resolved is not None
    rows: dict[str, dict[str, object]] = {
        key: {"value": shown(getattr(args, key)), "source": source}
        for key, source in resolved.sources.items()
    }
    where = dict(resolved.where)
    # Whether a token was found, and where; never the token itself. An unreadable
    # --token-file is shown, not fatal: finding such mistakes is what show is for.
    try:
        token = read_token(args.token_file)
        problem = ""
    except UsageError as exc:
        token, problem = "", str(exc)
    rows["token"] = {
        "value": "(hidden)" if token else None,
        "source": "default" if not token else "cli" if args.token_file else "env",
    }
    if token:
        where["token"] = f"--token-file {args.token_file}" if args.token_file else TOKEN_ENV
    elif problem:
        where["token"] = problem
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rows) + b"\n")
        sys.stdout.flush()
        return ExitCode.OK
    width = max(map(len, rows))
    for key, row in rows.items():
        value = "(not set)" if row["value"] is None else row["value"]
        source = str(row["source"]) + (f" ({where[key]})" if key in where else "")
        print(f"{key:<{width}}  {value!s:<32}  {source}")
    return ExitCode.OK


def _cmd_inspect(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    from .inspect import format_inspection, inspect_dir

    figures = inspect_dir(args.dir)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(figures) + b"\n")
        sys.stdout.flush()
    else:
        print(format_inspection(figures))
    return ExitCode.OK


def _cmd_compact(args: argparse.Namespace, argv: list[str], resolved: Resolved | None) -> int:
    from .compact import CompactSettings, compact

    result = compact(args.dir, CompactSettings(target_bytes=args.target_size))
    figures = dataclasses.asdict(result)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(figures) + b"\n")
        sys.stdout.flush()
    else:
        print(
            f"{result.files_before} data files -> {result.files_after} "
            f"({result.rows_merged} rows merged, "
            f"{result.recovered} interrupted compactions settled)"
        )
    return ExitCode.OK


_COMMANDS = {
    "run": _cmd_run,
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
    "config": _cmd_config,
    "inspect": _cmd_inspect,
    "compact": _cmd_compact,
}


def _keys_of_every_command() -> set[str]:
    """The setting keys of every configurable command, so that one's variables do not trip
    another (built only when a HARVESTER_* variable is not the running command's)."""
    parser = build_parser()
    keys: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in _CONFIGURED_COMMANDS:
                    keys |= set(setting_actions(sub))
    return keys


def _origin(message: str, resolved: Resolved | None) -> str:
    """`` (set by HARVESTER_RATE)`` when a refused setting the message names with its option
    came from a variable or the --config file, which the message alone would not say."""
    if resolved is None:
        return ""
    for option in re.findall(r"--([a-z][a-z-]*)", message):
        where = resolved.where.get(option.replace("-", "_"))
        if where is not None:
            return f" (set by {where})"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harvester`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in _COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command's own help, not the top level's
        where = f"harvester {args.command}"
        print(
            f"{where}: error: unrecognized arguments: {' '.join(unknown)} (see {where} --help)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    resolved = None
    try:
        if args.command in _CONFIGURED_COMMANDS:
            resolved = resolve(parser, argv, args, keys_elsewhere=_keys_of_every_command)
        setup_logging(log_settings(args))
        return _COMMANDS[args.command](args, argv, resolved)
    except HarvesterError as exc:
        what = "output error" if exc.exit_code is ExitCode.OUTPUT else "error"
        print(f"harvester: {what}: {exc}{_origin(str(exc), resolved)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
