"""Who is writing into a dataset: advisory locks that die with their process.

A run holds ``_harvester/locks/run-<run_id>.lock`` while it lives, so the temporaries of a run
that was killed (kill -9, OOM, eviction) can be told from those of a run still writing, and
removed. Two runs that could take the same id must never write at once (an id would get two
rows), so a run also holds ``shard-K-of-N.lock`` exclusively, and ``n-N.lock`` shared: runs
with the same N and different K are disjoint and may share a DIR; a run finding any other N
live is refused (shards of different N overlap). flock is released by the kernel when the
process dies, whatever the way it dies. The locks need a file system with working flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

from .dataset import META_DIR
from .errors import OutputError, UsageError
from .shard import Shard

TMP_GLOB = "*/*/.part-*.parquet.tmp"


def _locks_dir(root: Path) -> Path:
    return root / META_DIR / "locks"


def _try_lock(path: Path, mode: int = fcntl.LOCK_EX) -> IO[bytes] | None:
    """An open handle on ``path`` locked in ``mode``, or None if another process prevents it."""
    handle = path.open("a+b")
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _refuse(root: Path, why: str) -> UsageError:
    return UsageError(
        f"{why} is already writing into {root}; wait for it to finish or stop it, then rerun "
        "(runs writing into one DIR at once must use the same N in --shard K/N)"
    )


class RunLease:
    """The locks of one live run; ``release`` (or process death) gives them up."""

    def __init__(self, root: Path, run_id: str, shard: Shard) -> None:
        self._root = root
        self._run_id = run_id
        self._shard = shard
        self._handles: list[IO[bytes]] = []
        self._run_lock = _locks_dir(root) / f"run-{run_id}.lock"

    def acquire(self) -> None:
        """Take the locks; a run that could write the same ids is a usage error."""
        locks = _locks_dir(self._root)
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"--out {self._root}: not a directory; give a directory") from None
        except OSError as exc:
            raise OutputError(f"{self._root}: cannot create it ({exc.strerror})") from exc
        try:
            self._take_locks(locks)
        except BaseException:
            self.release()
            raise

    def _take_locks(self, locks: Path) -> None:
        count = self._shard.count
        mine = self._hold(locks / f"n-{count}.lock", fcntl.LOCK_SH)
        if mine is None:
            raise _refuse(self._root, "a run being set up")
        for other in locks.glob("n-*.lock"):
            if other.name != f"n-{count}.lock" and not _is_free(other):
                raise _refuse(self._root, f"a run with another N ({other.stem[2:]})")
        shard_lock = locks / f"shard-{self._shard.index}-of-{count}.lock"
        if self._hold(shard_lock, fcntl.LOCK_EX) is None:
            raise _refuse(self._root, f"another run of shard {self._shard}")
        self._hold_marker()

    def _hold_marker(self) -> None:
        """Lock this run's marker, making sure a cleaner did not unlink it under us."""
        for _ in range(50):  # bounded: a cleaner holds a dead marker only for an instant
            handle = _try_lock(self._run_lock)
            if handle is not None:
                if os.fstat(handle.fileno()).st_ino == _inode(self._run_lock):
                    self._handles.append(handle)
                    return
                handle.close()  # unlinked by a cleaner between our open and our lock
            time.sleep(0.01)
        raise OutputError(f"{self._run_lock}: cannot lock this run's marker")

    def _hold(self, path: Path, mode: int) -> IO[bytes] | None:
        handle = _try_lock(path, mode)
        if handle is not None:
            self._handles.append(handle)
        return handle

    def release(self) -> None:
        """Give the locks up and remove this run's marker."""
        if self._handles:  # only a run that got its locks has a marker to remove
            with contextlib.suppress(OSError):
                self._run_lock.unlink(missing_ok=True)
        for handle in self._handles:
            handle.close()  # closing the descriptor releases the flock
        self._handles.clear()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _is_free(path: Path) -> bool:
    """True when no live process holds ``path`` in any mode."""
    handle = _try_lock(path)
    if handle is None:
        return False
    handle.close()
    return True


def clean_stale_temporaries(root: Path) -> int:
    """Remove temporaries left by runs that are no longer alive; return how many."""
    removed = 0
    locks = _locks_dir(root)
    for tmp in root.glob(TMP_GLOB):
        run_id = tmp.name.removeprefix(".part-").rsplit("-", 1)[0]
        marker = locks / f"run-{run_id}.lock"
        if marker.exists() and not _remove_if_dead(marker):
            continue  # that run is alive and writing this file right now
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            os.unlink(tmp)
            removed += 1
    for marker in locks.glob("run-*.lock"):
        _remove_if_dead(marker)  # a dead run that left no temporary
    return removed


def _remove_if_dead(marker: Path) -> bool:
    """Unlink a run's marker if no live process holds it (unlinked while we hold the lock)."""
    handle = _try_lock(marker)
    if handle is None:
        return False
    try:
        with contextlib.suppress(OSError):
            marker.unlink(missing_ok=True)
    finally:
        handle.close()
    return True
