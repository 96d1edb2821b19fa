"""One exception hierarchy for the whole package, grouped by failure mode.

Callers catch a family (``TransientError``, ``FatalApiError``, ``InputError``...) rather than
aiohttp or pyarrow types: those are converted at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class HarvesterError(Exception):
    """Base of every error harvester raises on purpose."""


# -- usage and input: the run cannot start (exit 2) -------------------------------------------


class UsageError(HarvesterError):
    """A setting or command-line value is wrong; the message says what to do."""


class InputError(UsageError):
    """The ids file is missing, unreadable, empty or has no id column."""


# -- no later request can succeed: the run stops (exit 3) ------------------------------------


class FatalError(HarvesterError):
    """Retrying cannot help: stop the run now and say what to fix."""


class FatalApiError(FatalError):
    """401/402/403: the API refuses this token or account."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TlsError(FatalError):
    """The server's certificate did not verify: talking to it further would be unsafe."""


# -- one request failed but a later one may succeed -------------------------------------------


class TransientError(HarvesterError):
    """A request failed in a way worth retrying; ``kind`` names it in the summary."""

    kind = "transient"


class ServerError(TransientError):
    """5xx (other than throttling) or an unexpected status code."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"HTTP {status} {message}".strip())
        self.status = status
        self.kind = f"http_{status}"


class ThrottledError(TransientError):
    """429/503: the whole client must slow down and wait ``retry_after`` seconds."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}, retry after {retry_after}s")
        self.status = status
        self.retry_after = retry_after
        self.kind = f"http_{status}"


class TransportError(TransientError):
    """Connection refused or dropped, or a timeout: nothing usable came back."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BadResponseError(TransientError):
    """A body that does not parse, has the wrong shape or is too large; never stored."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- output -----------------------------------------------------------------------------------


class SinkError(HarvesterError):
    """The Parquet dataset could not be read or written."""
