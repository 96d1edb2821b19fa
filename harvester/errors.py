"""One exception hierarchy for the whole package, grouped by failure mode, and the exit codes.

Callers catch a family (``TransientError``, ``FatalApiError``, ``InputError``...) rather than
aiohttp or pyarrow types: those are converted at the boundary with ``raise ... from exc``.
Each family that can end a run carries its ``exit_code``; ``end_code`` maps how a run ended to
the code the command exits with, and ``worst_code`` picks the one that matters among several.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The command's exit codes: part of the contract with schedulers and scripts."""

    OK = 0  # every unique id has a row
    UNRESOLVED = 1  # some ids have no row yet: rerun the same command to finish them
    USAGE = 2  # a bad setting or unreadable input: nothing was polled
    REFUSED = 3  # the API refused the token or account (401/402/403), or TLS failed
    OUTPUT = 4  # the dataset could not be read or written
    UNREACHABLE = 5  # no request ever got an HTTP answer for --unreachable-after seconds
    INTERRUPTED = 130  # SIGINT/SIGTERM: committed rows are kept; rerun to resume

    @property
    def meaning(self) -> str:
        """What this code tells a scheduler, for ``run --help`` (empty if not written yet)."""
        return EXIT_MEANINGS.get(self, "")


# One line per code for ``run --help``; tests/test_cli.py checks that every code has one.
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "every unique id has a row",
    ExitCode.UNRESOLVED: "some ids are unresolved: rerun the same command to finish them",
    ExitCode.USAGE: "a bad setting or unreadable input: nothing was polled",
    ExitCode.REFUSED: "the API refused the token or account (401/402/403), or TLS failed",
    ExitCode.OUTPUT: "the dataset could not be read or written",
    ExitCode.UNREACHABLE: "nothing ever answered at --base-url (refused, DNS, timeout): check it",
    ExitCode.INTERRUPTED: "stopped by SIGINT/SIGTERM: committed rows are kept; rerun to resume",
}


# Among several workers' codes, the first of these present wins ...
_SEVERE = (ExitCode.REFUSED, ExitCode.OUTPUT, ExitCode.USAGE, ExitCode.UNREACHABLE)
# ... then any code not listed at all (128 + N for a worker killed by signal N), then these.
_MILD = (ExitCode.INTERRUPTED, ExitCode.UNRESOLVED, ExitCode.OK)


class HarvesterError(Exception):
    """Base of every error harvester raises on purpose."""

    exit_code: ExitCode = ExitCode.UNRESOLVED


# -- usage and input: the run cannot start ----------------------------------------------------


class UsageError(HarvesterError):
    """A setting or command-line value is wrong; the message says what to do."""

    exit_code = ExitCode.USAGE


class InputError(UsageError):
    """The ids file is missing, unreadable, empty or has no id column."""


# -- no later request can succeed: the run stops ----------------------------------------------


class FatalError(HarvesterError):
    """Retrying cannot help: stop the run now and say what to fix."""

    exit_code = ExitCode.REFUSED


class FatalApiError(FatalError):
    """401/402/403: the API refuses this token or account."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TlsError(FatalError):
    """The server's certificate did not verify: talking to it further would be unsafe."""


class UnreachableError(FatalError):
    """No request has ever got an HTTP answer, and connections kept failing: the URL or the
    network is wrong, not the server's load (once it has answered, outages are ridden out)."""

    exit_code = ExitCode.UNREACHABLE


# -- one request failed but a later one may succeed -------------------------------------------


class TransientError(HarvesterError):
    """A request failed in a way worth retrying; ``label`` names it in the summary."""

    label = "transient"


class ServerError(TransientError):
    """5xx (other than throttling) or an unexpected status code."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"HTTP {status} {message}".strip())
        self.status = status
        self.label = f"http_{status}"


class ThrottledError(TransientError):
    """429/503: this id waits ``retry_after`` seconds; the pacer weighs the share of these."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}, retry after {retry_after}s")
        self.status = status
        self.retry_after = retry_after
        self.label = f"http_{status}"


class TransportError(TransientError):
    """Connection refused or dropped, or a timeout: nothing usable came back."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


class BadResponseError(TransientError):
    """A body that does not parse, has the wrong shape or is too large; never stored."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


# -- output -----------------------------------------------------------------------------------


class OutputError(HarvesterError):
    """The dataset, its leases or its reports could not be read or written."""

    exit_code = ExitCode.OUTPUT


def end_code(*, fatal: HarvesterError | None, interrupted: bool, unresolved: int) -> ExitCode:
    """The exit code of a run that ended this way (the first that applies wins)."""
    if fatal is not None:
        return fatal.exit_code
    if interrupted:
        return ExitCode.INTERRUPTED
    return ExitCode.UNRESOLVED if unresolved else ExitCode.OK


def worst_code(codes: list[int]) -> int:
    """The exit code that matters most among several processes' codes.

    A process killed by a signal (a negative return code, say -9 from the OOM killer) is
    reported the shell's way, 128 + signal, and outranks the mild codes: it is never success.
    """
    codes = [128 - code if code < 0 else code for code in codes]
    for code in _SEVERE:
        if code in codes:
            return code
    unknown = [code for code in codes if code not in _MILD]
    if unknown:
        return max(unknown)
    return next(code for code in _MILD if code in codes)
