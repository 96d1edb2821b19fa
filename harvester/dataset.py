"""The output dataset's layout: schema, partition paths, and reading back what is done.

Layout: ``DIR/harvest_date=YYYY-MM-DD/model_key=<key>/part-<run>-<seq>.parquet``. Every field
the server sent, ``model`` included, is a column inside the files, stored exactly; the path
holds only ``model_key``, a short, safe name derived from the model, for partition pruning
and for people browsing the folder. A path can shorten or escape a value, but readers never
take a value from it, so no value can be lost or place a file outside DIR.
Names starting with ``_`` or ``.`` hold metadata or files being written; readers skip them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import OutputError, UsageError
from .ids import CANONICAL, invalid_key, uuid_key
from .idset import KEY_DTYPE, DoneSet, Keys, as_keys
from .model import API_FIELDS, EXTRA_FIELD, LIST_FIELDS, TARGETING_FIELDS, TEXT_FIELDS
from .shard import Shard
from .storage import META_DIR, Store, fsync_dir, open_store

if TYPE_CHECKING:
    import pyarrow.dataset as ds

__all__ = ["META_DIR", "fsync_dir"]  # re-exported: older callers import them from here
PARTITION_COLUMNS = ("harvest_date", "model_key")
NULL_MODEL_KEY = "~null"  # failed and invalid rows: no model

# The Completion's fields, each a column of its own in every file.
STRING_COLUMNS = (*TEXT_FIELDS, *TARGETING_FIELDS)
_COLUMN_TYPES = {
    **dict.fromkeys(TEXT_FIELDS + TARGETING_FIELDS, pa.string()),
    **dict.fromkeys(LIST_FIELDS, pa.list_(pa.string())),
}
FILE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        *(pa.field(name, _COLUMN_TYPES[name]) for name in API_FIELDS),
        pa.field("polls", pa.int32(), nullable=False),
        pa.field("harvested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # Fields the server sent beyond the spec, as a JSON object (null when none): lossless.
        pa.field(EXTRA_FIELD, pa.string()),
    ]
)
PARTITION_SCHEMA = pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS])
# Given explicitly so that an empty or metadata-only DIR still has every column.
DATASET_SCHEMA = pa.schema([*FILE_SCHEMA, *PARTITION_SCHEMA])

# A model is its own key when it is a short plain name that no reader could take for
# anything but text and no file system could confuse with another: it starts with a
# letter (so never a number or a date), is lower case (macOS and Windows disks would put
# "Gemini" and "gemini" in one folder), does not end with "." (Windows drops it), uses only
# characters that need no escaping anywhere (local disks, S3 keys, URLs), and is none of
# the words some reader parses (DuckDB reads "inf" and "epoch" as dates, Polars "nan" as
# a float and "true" as a boolean). Any other model gets a readable prefix and a digest.
_PLAIN_KEY = re.compile(r"[a-z](?:[a-z0-9._-]{0,78}[a-z0-9_-])?")
_READER_WORDS = frozenset(("nan", "inf", "infinity", "epoch", "true", "false", "null", "none"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@functools.lru_cache(maxsize=4096)  # a handful of models, one call a row
def partition_key(model: str | None) -> str:
    """The ``model_key`` of ``model``: one short, safe path segment, distinct per model.

    Plain names are kept as they are; anything else becomes ``<prefix>~<digest>``. A plain
    key never holds ``~``, so no model's key can equal another's (short of a 64-bit digest
    collision), and ``~null`` (no model) equals neither form.
    """
    if model is None:
        return NULL_MODEL_KEY
    if _PLAIN_KEY.fullmatch(model) and model not in _READER_WORDS:
        return model
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{_UNSAFE.sub('_', model[:40])}~{digest}"


def partition_rel(harvest_date: str, model: str | None) -> str:
    """Path of one partition relative to the root, ``/``-separated (a store's key prefix)."""
    return f"harvest_date={harvest_date}/model_key={partition_key(model)}"


def partition_dir(root: Path, harvest_date: str, model: str | None) -> Path:
    """Directory of one partition, always inside ``root``."""
    return root / partition_rel(harvest_date, model)


def check_layout(root: Path | str | Store) -> None:
    """Refuse a DIR written in the layout of harvester 0.x (``model=`` partitions, no
    ``model`` column in the files): rows of both layouts in one DIR are unreadable."""
    store = open_store(root)
    if store.has_old_layout():
        raise UsageError(
            f"{store.url} holds a dataset in the old layout (model=... folders); "
            "give a new --out (this version writes model_key=... folders)"
        )


def committed_files(root: Path | str | Store) -> list[str]:
    """The data files of ``root``: only committed ``part-*.parquet`` files in partitions.

    Listing them, rather than letting pyarrow take every file, keeps a stray README, CSV or
    a temporary left by a crash from ever being read as data.
    """
    return open_store(root).committed_files()


def open_dataset(root: Path | str | Store) -> ds.Dataset:
    """The committed dataset under ``root``, with every column even when it is empty."""
    # Imported here: pyarrow.dataset loads pandas (0.3 s), which a run never needs.
    import pyarrow.dataset as ds

    store = open_store(root)
    try:
        return ds.dataset(
            store.committed_files(),
            format="parquet",
            schema=DATASET_SCHEMA,
            partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
            partition_base_dir=store.base,
            filesystem=store.filesystem,
        )
    except (pa.ArrowException, OSError) as exc:
        raise OutputError(f"{store.url}: cannot open the dataset ({exc})") from exc


def load_done(
    root: Path | str | Store, shard: Shard | None = None, files: list[str] | None = None
) -> DoneSet:
    """Keys of every id (of ``shard``) that already has a row under ``root``: what to skip
    (``files``: its ``committed_files``, when the caller has listed them already).

    One file at a time into one preallocated array, then one sort: 10M rows load in about
    3 s with a peak of about 34 bytes an id (24 of which stay: the key and its uint64 head).
    A row present twice (in a file and in its compacted copy, for an instant) counts once.
    """
    store = open_store(root)
    for _ in range(3):  # bounded: a compaction deleting inputs meanwhile is rare
        try:
            return _load_keys(store, shard, store.committed_files() if files is None else files)
        except FileNotFoundError:
            files = None  # merged away since the listing: the merged file holds its rows
    raise OutputError(f"{store.url}: files keep vanishing while loading; rerun")


def _load_keys(store: Store, shard: Shard | None, files: list[str]) -> DoneSet:
    fs = store.filesystem
    try:
        total = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
        keys = np.empty(total, dtype=KEY_DTYPE)
        filled = 0
        for f in files:
            table = pq.read_table(f, columns=["id", "status"], filesystem=fs)
            for batch in table.to_batches():
                chunk = _batch_keys(batch)
                if shard is not None:
                    chunk = chunk[shard.mask(chunk)]
                keys[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise OutputError(f"{store.url}: cannot read the existing rows ({exc})") from exc
    return DoneSet.from_array(keys[:filled])


def _batch_keys(batch: pa.RecordBatch) -> Keys:
    ids = batch.column("id")
    is_invalid = pc.equal(batch.column("status"), "invalid")
    uuids = ids.filter(pc.invert(is_invalid))
    invalid = ids.filter(is_invalid).to_pylist()
    keys = uuid_keys(uuids)
    if invalid:
        # An invalid row's id is either an input value that is no uuid (keyed by its hash, as
        # the reader keys it) or a canonical uuid the API answered 422 for (keyed by its bytes).
        extra = [uuid_key(v) if CANONICAL.fullmatch(v) else invalid_key(v) for v in invalid]
        keys = np.concatenate((keys, as_keys(extra)))
    return keys


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
_HYPHENS = np.array([8, 13, 18, 23])
_HEX_COLUMNS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def uuid_keys(ids: pa.Array) -> Keys:
    """16-byte keys of canonical uuid strings, decoded in bulk rather than one by one."""
    if not len(ids):
        return np.empty(0, dtype=KEY_DTYPE)
    flat = ids.cast(pa.large_string())
    lengths = pc.min_max(pc.binary_length(flat)).as_py()
    if ids.null_count or lengths != {"min": 36, "max": 36}:
        raise OutputError("the dataset holds a non-uuid id outside an invalid row")
    offsets = np.frombuffer(flat.buffers()[1], dtype=np.int64)
    start = offsets[flat.offset]
    data = np.frombuffer(flat.buffers()[2], dtype=np.uint8)[start : start + 36 * len(flat)]
    rows = data.reshape(-1, 36)
    nibbles = _HEX[rows[:, _HEX_COLUMNS]]
    if (nibbles == 255).any() or (rows[:, _HYPHENS] != ord("-")).any():
        raise OutputError("the dataset holds a non-uuid id outside an invalid row")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(KEY_DTYPE).reshape(-1)
