"""Process limits a run needs, checked before it starts rather than failing mid-run."""

from __future__ import annotations

import resource

from .errors import UsageError

FILES_BESIDES_SOCKETS = 256  # the input, Parquet files being written, the loop's own


def ensure_open_files(concurrency: int) -> int:
    """Raise the soft open-file limit so ``concurrency`` sockets fit, or refuse to start.

    Without this, ``--concurrency 10000`` under the common soft limit of 1024 would fail
    with EMFILE mid-run, after hours perhaps. Returns the soft limit now in force.
    """
    need = concurrency + FILES_BESIDES_SOCKETS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UsageError(
            f"--concurrency {concurrency} needs about {need} open files, but the hard limit "
            f"is {hard}; lower --concurrency or raise the limit (ulimit -Hn, or the "
            "container's nofile setting)"
        )
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"--concurrency {concurrency} needs about {need} open files and the soft limit "
            f"({soft}) could not be raised ({exc}); lower --concurrency or run ulimit -n {need}"
        ) from exc
    return need


def raise_open_files_to_hard() -> int:
    """For a server: take every file the hard limit allows (one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft
