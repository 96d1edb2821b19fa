"""Who is writing into a dataset: locks that die with their process, or leases that expire.

Local DIR: a run holds ``_harvester/locks/run-<run_id>.lock`` while it lives, so the temporaries
of a run that was killed (kill -9, OOM, eviction) can be told from those of a run still writing,
and removed. Two runs that could take the same id must never write at once (an id would get two
rows), so a run also holds ``shard-K-of-N.lock`` exclusively, and ``n-N.lock`` shared: runs with
the same N and different K are disjoint and may share a DIR; a run finding any other N live is
refused (shards of different N overlap). flock is released by the kernel when the process dies,
whatever the way it dies. The locks need a file system with working flock.

S3 (``ObjectLease``): no flock across machines, so a run creates the lease object
``_harvester/locks/shard-K-of-N.lease`` with a conditional PUT (``If-None-Match: *``: of two
runs, one wins) and renews it every ttl/3 with ``If-Match`` on its own ETag. A lease not
renewed for ttl seconds, by the server's clock, is expired: a run finding one takes it over
with ``If-Match`` on the ETag it saw (again one winner), so a run killed with -9 holds its
shard at most ttl seconds. A run that finds a live lease waits up to ttl to see whether it
is renewed (refused, exit 2) or expires (taken over): a pod restarted after a kill resumes
instead of failing. A run stops committing (exit 4) once its lease may have expired
unrenewed. Other object stores have no conditional PUT here: no lease is taken (see README).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import IO

import orjson

from .errors import OutputError, UsageError
from .shard import Shard
from .storage import META_DIR, LocalStore, S3Store, Store, open_store

log = logging.getLogger("harvester")
LOCKS = f"{META_DIR}/locks"

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


def _refuse(root: Path | str, why: str) -> UsageError:
    return UsageError(
        f"{why} is already writing into {root}; wait for it to finish or stop it, then rerun "
        "(runs writing into one DIR at once must use the same N in --shard K/N)"
    )


class RunLease:
    """What keeps other runs off this run's shard: flocks in a local DIR, a lease object on
    S3, nothing elsewhere (a warning); ``release`` (or process death) gives it up."""

    def __init__(
        self, root: Path | str | Store, run_id: str, shard: Shard, *, ttl: float = 30.0
    ) -> None:
        store = open_store(root)
        self._impl: _FlockLease | ObjectLease | None
        if isinstance(store, LocalStore):
            self._impl = _FlockLease(store.root, run_id, shard)
        elif isinstance(store, S3Store):
            name = f"shard-{shard.index}-of-{shard.count}"
            self._impl = ObjectLease(store, run_id, name, f"shard {shard}", ttl=ttl, shard=shard)
        else:
            self._impl = None
            self._url = store.url

    def acquire(self) -> None:
        """Take the shard; a run that could write the same ids is a usage error."""
        if self._impl is None:
            log.warning(
                "%s: this store has no conditional writes; nothing stops two runs of one "
                "shard from writing at once (run each shard once)",
                self._url,
            )
            return
        self._impl.acquire()

    def release(self) -> None:
        """Give the shard up (idempotent)."""
        if self._impl is not None:
            self._impl.release()


class _FlockLease:
    """The locks of one live run in a local DIR; ``release`` (or process death) frees them."""

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


def clean_stale_temporaries(root: Path | str | Store) -> int:
    """Remove temporaries left by runs that are no longer alive; return how many.

    Only a local DIR has any: an object store is written with one PUT per object, which
    leaves nothing behind when it fails.
    """
    store = open_store(root)
    if not isinstance(store, LocalStore):
        return 0
    root = store.root
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


class ObjectLease:
    """A lease object on S3, created and renewed with conditional PUTs (module docstring)."""

    def __init__(
        self,
        store: S3Store,
        run_id: str,
        name: str,
        what: str,
        *,
        ttl: float,
        shard: Shard | None = None,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._what = what  # "shard 2/3": for messages
        self._shard = shard  # None: a lease that no other N can overlap (compaction)
        self._ttl = ttl
        self._rel = f"{LOCKS}/{name}.lease"
        self._etag: str | None = None
        self._valid_until = 0.0  # monotonic: commits stop here unless renewed
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        body = {"run_id": run_id, "lease": what, "ttl_s": ttl, "host": socket.gethostname()}
        self._body = orjson.dumps(body)

    def acquire(self) -> None:
        """Create or take over the shard's lease, check no other N is live, start renewing."""
        etag, sent = self._take()
        self._etag, self._valid_until = etag, sent + self._margin()
        try:
            self._check_other_counts()
        except BaseException:
            self.release()
            raise
        self._store.fence = self.check
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()

    def _margin(self) -> float:
        # Commits stop a third of the ttl before another run may take the lease over, so a
        # commit that has begun has that long to land (the ttl is judged by the server).
        return self._ttl * 2 / 3

    def _take(self) -> tuple[str, float]:
        """The lease's ETag once ours, and when the winning PUT was sent (monotonic): the
        ttl runs from then, not from the start of a wait for a dead run's lease."""
        deadline = time.monotonic() + 3 * self._ttl + 5  # bounded whatever the server says
        seen: str | None = None
        while time.monotonic() < deadline:
            sent = time.monotonic()
            etag = self._store.create(self._rel, self._body)
            if etag is not None:
                return etag, sent
            stamp = self._store.stamp(self._rel)
            if stamp is None:
                continue  # released meanwhile: try to create it again
            holder = _lease_body(stamp.body)
            if seen is not None and stamp.etag != seen:
                raise _refuse(self._store.url, f"run {holder.get('run_id')} of {self._what}")
            seen = stamp.etag
            if stamp.age_s > _ttl_of(holder, self._ttl):
                sent = time.monotonic()
                taken = self._store.replace(self._rel, self._body, stamp.etag)
                if taken is not None:
                    log.info("took over the expired lease of run %s", holder.get("run_id"))
                    return taken, sent
                continue  # another run took it or it was renewed: look again
            time.sleep(min(1.0, self._ttl / 10))
        raise _refuse(self._store.url, f"another run of {self._what}")

    def _check_other_counts(self) -> None:
        """Shards of another N overlap ours: refuse if any such lease is live. Checked after
        ours is written, so of two runs starting at once at least one sees the other."""
        if self._shard is None:
            return
        count = self._shard.count
        for name in self._store.list_names(LOCKS):
            if not name.startswith("shard-") or name.endswith(f"-of-{count}.lease"):
                continue
            stamp = self._store.stamp(f"{LOCKS}/{name}")
            if stamp is None:
                continue
            if stamp.age_s <= _ttl_of(_lease_body(stamp.body), self._ttl):
                other = name.removesuffix(".lease").rsplit("-of-", 1)[-1]
                raise _refuse(self._store.url, f"a run with another N ({other})")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            etag = self._etag
            if etag is None:
                return
            sent = time.monotonic()
            try:
                renewed = self._store.replace(self._rel, self._body, etag)
            except OutputError as exc:  # the server is unreachable: try again next tick
                log.warning("could not renew the lease (%s)", exc)
                continue
            if renewed is None:
                self._lost = True
                log.error("lost the lease of %s to another run; stopping", self._what)
                return
            self._etag, self._valid_until = renewed, sent + self._margin()

    def check(self) -> None:
        """Raise ``OutputError`` if this run may no longer hold its lease (no more commits)."""
        if self._lost or time.monotonic() > self._valid_until:
            raise OutputError(
                f"{self._store.url}: the lease of {self._what} was not renewed in time "
                "and may belong to another run now; not committing (rerun to resume)"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._ttl)
            self._thread = None
        etag, self._etag = self._etag, None
        if etag is not None and not self._lost:
            with contextlib.suppress(OutputError):
                self._store.remove(self._rel, etag)
        if self._store.fence == self.check:
            self._store.fence = None


def _lease_body(data: bytes) -> dict[str, object]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _ttl_of(body: dict[str, object], default: float) -> float:
    """How old a lease may look before it is expired: its holder's ttl, plus one second, as
    HTTP dates (LastModified, Date) have whole seconds and an age may read up to 1 s long."""
    ttl = body.get("ttl_s")
    return (float(ttl) if isinstance(ttl, int | float) else default) + 1.0


class CompactionLease:
    """One compaction per dataset at a time (two merging one file would both keep its
    rows): an exclusive flock locally, a lease object on S3."""

    def __init__(self, root: Path | str | Store, run_id: str, *, ttl: float = 30.0) -> None:
        self._store = open_store(root)
        self._handle: IO[bytes] | None = None
        self._object: ObjectLease | None = None
        if isinstance(self._store, S3Store):
            self._object = ObjectLease(self._store, run_id, "compact", "a compaction", ttl=ttl)

    def acquire(self) -> None:
        """Take it, or raise ``UsageError`` naming the compaction that holds it."""
        store = self._store
        if self._object is not None:
            self._object.acquire()
        elif isinstance(store, LocalStore):
            locks = _locks_dir(store.root)
            locks.mkdir(parents=True, exist_ok=True)
            self._handle = _try_lock(locks / "compact.lock")
            if self._handle is None:
                raise _refuse(store.root, "a compaction")

    def release(self) -> None:
        """Give it up (idempotent)."""
        if self._object is not None:
            self._object.release()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
