"""Who is writing into a dataset: advisory locks that die with their process.

A run holds ``_harvester/locks/run-<run_id>.lock`` while it lives, so the temporaries of a run
that was killed (kill -9, OOM, eviction) can be told from those of a run still writing, and
removed. It also holds ``shard-K-of-N.lock``, so that the same shard is never harvested twice
at once into one DIR (which could write an id twice). flock is released by the kernel when the
process dies, whatever the way it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from .dataset import META_DIR
from .errors import UsageError
from .shard import Shard

TMP_GLOB = "*/*/.part-*.parquet.tmp"


def _locks_dir(root: Path) -> Path:
    return root / META_DIR / "locks"


def _try_lock(path: Path) -> IO[bytes] | None:
    """An open, exclusively locked handle on ``path``, or None if another process holds it."""
    handle = path.open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class RunLease:
    """The locks of one live run; ``release`` (or process death) gives them up."""

    def __init__(self, root: Path, run_id: str, shard: Shard) -> None:
        self._root = root
        self._run_id = run_id
        self._shard = shard
        self._handles: list[IO[bytes]] = []
        self._run_lock = _locks_dir(root) / f"run-{run_id}.lock"

    def acquire(self) -> None:
        """Take the shard and run locks; a shard already being written is a usage error."""
        locks = _locks_dir(self._root)
        locks.mkdir(parents=True, exist_ok=True)
        shard_lock = locks / f"shard-{self._shard.index}-of-{self._shard.count}.lock"
        handle = _try_lock(shard_lock)
        if handle is None:
            raise UsageError(
                f"another harvester run is already writing shard {self._shard} into "
                f"{self._root}; wait for it to finish or stop it, then rerun"
            )
        self._handles.append(handle)
        run_handle = _try_lock(self._run_lock)
        if run_handle is not None:
            self._handles.append(run_handle)

    def release(self) -> None:
        """Give the locks up and remove this run's marker."""
        self._run_lock.unlink(missing_ok=True)
        for handle in self._handles:
            handle.close()  # closing the descriptor releases the flock
        self._handles.clear()


def clean_stale_temporaries(root: Path) -> int:
    """Remove temporaries left by runs that are no longer alive; return how many."""
    removed = 0
    locks = _locks_dir(root)
    for tmp in root.glob(TMP_GLOB):
        run_id = tmp.name.removeprefix(".part-").rsplit("-", 1)[0]
        marker = locks / f"run-{run_id}.lock"
        if marker.exists():
            handle = _try_lock(marker)
            if handle is None:
                continue  # that run is alive and writing this file right now
            handle.close()
            marker.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            removed += 1
    return removed
