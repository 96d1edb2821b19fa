"""``harvester compact``: merge each partition's small files into a few large ones, crash-safe.

The protocol, the same for a local DIR and object storage (each step uses only what both
have: a file or object that is complete when it appears, and deletes):

1. Take the compaction lease (one compaction per dataset at a time), and recover: for each
   intent record ``_harvester/compactions/<output>.json`` a killed compaction left, if its
   output exists the inputs still present are deleted (roll forward), else the record is
   (roll back: the output was never visible).
2. For each group of a partition's files (in name order, up to ``target_bytes`` stored):
   a. write the intent record, naming the inputs and the output;
   b. stream the inputs into one new file and commit it (locally: hidden temporary, fsync,
      rename; S3: one PUT) under a fresh ``part-<compaction id>-<seq>.parquet`` name;
   c. delete the inputs; d. delete the record.

What readers see: never a missing row (the inputs go only after the output is visible).
Between b and c a reader listing the partition sees the group's rows twice: locally for the
time of a rename and a few unlinks, on S3 for one DeleteObjects request. No plain hive
dataset can do better (there is no atomic swap of several files); a crash inside that window
leaves the duplicates until the next ``compact`` or ``run`` rolls the record forward
(``roll_forward``). Resume is never affected: ``load_done`` counts an id once however many
files hold it. Only committed files are merged, so runs may write meanwhile; files a run
commits after the listing are left for the next compaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .dataset import FILE_SCHEMA
from .errors import OutputError, UsageError
from .lease import CompactionLease
from .report import new_run_id
from .storage import META_DIR, PARQUET_OPTIONS, LocalStore, Store, open_store

log = logging.getLogger("harvester")
INTENTS = f"{META_DIR}/compactions"
DEFAULT_TARGET_BYTES = 256 * 1024 * 1024
MAX_TARGET_BYTES = 5 * 1024**3  # one S3 PUT


@dataclass(frozen=True, slots=True)
class CompactSettings:
    """What ``harvester compact`` does; checked when created."""

    target_bytes: int = DEFAULT_TARGET_BYTES  # a merged file stops growing past this (stored)
    only_run: str | None = None  # merge only this run's files (``run --compact``)
    lease_ttl: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.target_bytes <= MAX_TARGET_BYTES:
            raise UsageError(
                f"--target-size must be between 1 byte and 5 GB (got {self.target_bytes})"
            )


@dataclass(slots=True)
class CompactResult:
    """Files before and after, and the rows moved (for the summary and the tests)."""

    files_before: int = 0
    files_after: int = 0
    rows_merged: int = 0
    recovered: int = 0  # intent records of killed compactions finished or undone


def compact(root: Path | str | Store, settings: CompactSettings | None = None) -> CompactResult:
    """Merge small files under ``root`` (the module docstring gives the protocol)."""
    settings = settings or CompactSettings()
    store = open_store(root)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise UsageError(f"{store.url}: no such directory; give a dataset (a run's --out)")
    cid = new_run_id()
    lease = CompactionLease(store, cid, ttl=settings.lease_ttl)
    lease.acquire()
    try:
        result = CompactResult(recovered=_recover(store))
        files = store.list_files()
        committed = set(store.committed_files())
        sized = sorted((p, size) for p, size in files if p in committed)
        result.files_before = len(sized)
        for seq, group in enumerate(_groups(store, sized, settings), start=1):
            result.rows_merged += _merge(store, group, cid, seq)
        result.files_after = len(store.committed_files())
        return result
    finally:
        lease.release()


def _groups(
    store: Store, files: list[tuple[str, int]], settings: CompactSettings
) -> list[list[str]]:
    """Runs of two or more files of one partition, each run up to the target size."""
    by_partition: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path, size in files:
        rel = store.relative(path)
        folder, name = rel.rsplit("/", 1)
        if settings.only_run is None or name.startswith(f"part-{settings.only_run}-"):
            by_partition[folder].append((rel, size))
    groups: list[list[str]] = []
    for members in by_partition.values():
        current: list[str] = []
        total = 0
        for rel, size in members:
            if current and total + size > settings.target_bytes:
                groups.append(current)
                current, total = [], 0
            current.append(rel)
            total += size
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def _merge(store: Store, inputs: list[str], cid: str, seq: int) -> int:
    """Steps a to d for one group; returns the rows merged."""
    folder = inputs[0].rsplit("/", 1)[0]
    output = f"{folder}/part-{cid}-{seq:06d}.parquet"
    record = f"{INTENTS}/{cid}-{seq:06d}.json"
    store.put_bytes(record, orjson.dumps({"output": output, "inputs": inputs}))
    rows = _write_merged(store, inputs, output)
    store.delete(inputs)
    store.delete([record])
    return rows


def _write_merged(store: Store, inputs: list[str], output: str) -> int:
    """Stream the inputs, one row group each, into a temporary file, then commit it."""
    if isinstance(store, LocalStore):
        # Beside its final place (a rename, not a copy), under a name no run cleans up.
        directory = (store.root / output).parent
        handle, name = tempfile.mkstemp(prefix=".compact-", suffix=".tmp", dir=directory)
    else:
        handle, name = tempfile.mkstemp(prefix="harvester-compact-", suffix=".parquet")
    os.close(handle)
    tmp = Path(name)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, FILE_SCHEMA, **PARQUET_OPTIONS) as writer:
            for rel in inputs:
                table = pq.read_table(store.path(rel), filesystem=store.filesystem)
                table = table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA)
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)
                    rows += table.num_rows
        store.commit_file(output, tmp)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{store.url}: cannot compact {inputs[0]}...: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def _recover(store: Store) -> int:
    """Finish or undo what killed compactions left (step 1); under the compaction lease."""
    done = roll_forward(store, undo=True)
    if isinstance(store, LocalStore):  # temporaries of killed compactions
        for tmp in store.root.glob("*/*/.compact-*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    return done


def roll_forward(store: Store, *, undo: bool = False) -> int:
    """Delete the inputs of every intent record whose output is visible (safe at any time,
    by anyone: those rows are in the output). ``undo`` (only under the compaction lease):
    also drop the records whose output never appeared. Returns the records settled."""
    settled = 0
    names = store.list_names(INTENTS)
    if not names:
        return 0
    committed = {store.relative(p) for p in store.committed_files()}
    for name in names:
        data = store.get_bytes(f"{INTENTS}/{name}")
        if data is None:
            continue
        try:
            intent = orjson.loads(data)
            output, inputs = str(intent["output"]), [str(i) for i in intent["inputs"]]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring an unreadable compaction record %s", name)
            continue
        if output in committed:
            store.delete([i for i in inputs if i in committed])
        elif not undo:
            continue
        store.delete([f"{INTENTS}/{name}"])
        settled += 1
    if settled:
        log.info("settled %d compactions left unfinished", settled)
    return settled
