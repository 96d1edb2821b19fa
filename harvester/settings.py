"""Run settings, validated when created so that a bad value fails before any request."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError
from .polling import DOCUMENTED_READY, ExpectedReady
from .shard import WHOLE, Shard
from .storage import parse_location

DEFAULT_BASE_URL = "https://render.joinmassive.com"
MAX_RATE = 1_000_000.0  # the pacer keeps the last R send times; past this, memory says stop
# The poll endpoints by --endpoint name: the spec's (the default) and the newer form, which
# answers 200 for a status object too (client.py reads both alike).
ENDPOINT_PATHS = {"completions": "/ai/completions", "ai": "/ai"}
ENDPOINT_PATH = ENDPOINT_PATHS["completions"]
# How polls travel (--transport): http1 is harvester's own keep-alive client on httptools
# (http1.py, several times less CPU a request); aiohttp is the general client, kept as a
# fallback for servers the lean one does not suit.
TRANSPORTS = ("http1", "aiohttp")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def is_loopback_host(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1, where plain http cannot leak a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything ``harvester run`` needs; every value checked in ``__post_init__``."""

    # A local path (a Path) or a URI such as s3://bucket/key (its text): see storage.py.
    ids_path: Path | str
    out_dir: Path | str
    token: str = field(repr=False)  # never shown: not in repr, logs or reports
    base_url: str = DEFAULT_BASE_URL
    rate: float = 100.0
    concurrency: int = 64
    max_in_play: int = 5000
    max_wait: float = 600.0
    poll_interval: float = 4.0
    max_poll_interval: float = 30.0
    # Ready-time ranges the first re-poll plan is made from, learned over (polling.py).
    expected_ready: ExpectedReady = DOCUMENTED_READY
    max_retries: int = 10
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 300.0
    id_column: str = "id"
    flush_interval: float = 5.0
    flush_rows: int = 50_000
    flush_bytes: int = 32 * 1024 * 1024
    request_timeout: float = 60.0
    connect_timeout: float = 10.0
    max_body_bytes: int = 25 * 1024 * 1024
    progress: bool = True
    json_summary: bool = False
    allow_insecure: bool = False
    log_interval: float = 10.0
    shard: Shard = WHOLE
    strict: bool = False  # stop (exit 2) at the first input line that is not a uuid
    lease_ttl: float = 30.0  # object storage: seconds a dead run's shard lease outlives it
    compact: bool = False  # merge this run's small files at the end (``harvester compact``)
    workers: int = 1  # processes on this machine (``--workers``); each gets 1/N of the ids
    worker_stats: bool = False  # set for --workers children: counters as JSON lines on stdout
    metrics_port: int | None = None  # serve Prometheus text at /metrics (0: any free port)
    metrics_host: str = "127.0.0.1"
    endpoint: str = "completions"  # a name of ENDPOINT_PATHS
    transport: str = "http1"  # one of TRANSPORTS
    # Stop (exit 5) when no request ever got an HTTP answer this long after the first failed one.
    unreachable_after: float = 30.0

    def __post_init__(self) -> None:
        check_token(self.token)
        # A URI stays text (a Path would squash s3:// into a local folder named s3:).
        object.__setattr__(self, "ids_path", parse_location(self.ids_path, "--ids"))
        object.__setattr__(self, "out_dir", parse_location(self.out_dir, "--out"))
        _require(self.lease_ttl >= 1, f"--lease-ttl must be >= 1 second (got {self.lease_ttl})")
        _require(
            0 < self.rate <= MAX_RATE, f"--rate must be > 0 and <= {MAX_RATE:.0f} (got {self.rate})"
        )
        _require(self.concurrency >= 1, f"--concurrency must be >= 1 (got {self.concurrency})")
        _require(self.workers >= 1, f"--workers must be >= 1 (got {self.workers})")
        _require(self.max_in_play >= 1, f"--max-in-play must be >= 1 (got {self.max_in_play})")
        _require(self.max_wait > 0, f"--max-wait must be > 0 seconds (got {self.max_wait})")
        _require(self.poll_interval > 0, "--poll-interval must be > 0 seconds")
        _require(
            self.max_poll_interval >= self.poll_interval,
            "--max-poll-interval must be >= --poll-interval",
        )
        _require(self.max_retries >= 0, "--max-retries must be >= 0")
        _require(self.backoff_base > 0 and self.backoff_max >= self.backoff_base, "bad backoff")
        _require(self.flush_interval > 0, "--flush-interval must be > 0 seconds")
        _require(self.flush_rows >= 1 and self.flush_bytes >= 1, "flush thresholds must be >= 1")
        _require(self.request_timeout > 0, "--request-timeout must be > 0 seconds")
        _require(self.connect_timeout > 0, "connect_timeout must be > 0 seconds")
        _require(self.retry_after_max >= 0, "retry_after_max must be >= 0 seconds")
        _require(self.log_interval > 0, "--log-interval must be > 0 seconds")
        _require(self.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024")
        _require(bool(self.id_column.strip()), "--id-column must not be empty")
        _require(
            self.endpoint in ENDPOINT_PATHS,
            f"--endpoint must be one of {', '.join(ENDPOINT_PATHS)} (got {self.endpoint!r})",
        )
        _require(
            self.transport in TRANSPORTS,
            f"--transport must be one of {', '.join(TRANSPORTS)} (got {self.transport!r})",
        )
        _require(
            self.unreachable_after > 0,
            f"--unreachable-after must be > 0 seconds (got {self.unreachable_after})",
        )
        check_metrics_address(self.metrics_host, self.metrics_port)
        check_base_url(self.base_url, allow_insecure=self.allow_insecure)

    @property
    def endpoint_url(self) -> str:
        """Full URL of the endpoint polled (``--endpoint``)."""
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]


def check_token(token: str) -> None:
    """The token is present and could be sent in a header (shared by ``run`` and ``bench``)."""
    _require(bool(token), "no API token: set MASSIVE_API_TOKEN or pass --token-file")
    _require(
        token.isprintable() and not any(c.isspace() for c in token),
        "the API token has spaces or control characters; check MASSIVE_API_TOKEN",
    )
    _require(
        token.isascii(),
        "the API token has non-ASCII characters (a header carries ASCII); check MASSIVE_API_TOKEN",
    )


def check_metrics_address(host: str, port: int | None) -> None:
    """``--metrics-host``/``--metrics-port`` (shared by ``run`` and ``bench``)."""
    _require(
        port is None or 0 <= port <= 65535,
        f"--metrics-port must be 0-65535, 0 for any free port (got {port})",
    )
    _require(bool(host.strip()), "--metrics-host must not be empty (the default is 127.0.0.1)")


def check_base_url(base_url: str, *, allow_insecure: bool) -> None:
    """An http(s) URL with a host; plain http only to loopback unless ``allow_insecure``."""
    hint = f"--base-url must be an http(s) URL such as {DEFAULT_BASE_URL} (got {base_url!r})"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        raise UsageError(hint) from None
    _require(parts.scheme in ("http", "https") and bool(parts.hostname), hint)
    insecure = parts.scheme == "http" and not is_loopback_host(parts.hostname or "")
    _require(
        not insecure or allow_insecure,
        f"refusing to send the token over plain http to {parts.hostname}; use https, "
        "or pass --allow-insecure if you accept that risk",
    )
