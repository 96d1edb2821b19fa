"""``harvester inspect DIR``: what a dataset holds, without writing SQL.

Rows by status, by model and by harvest date; files, bytes and small files; the last runs
from the reports in ``DIR/_harvester/runs``. It reads a DIR in any state a run can leave (empty,
aborted, killed mid-run): only committed ``part-*.parquet`` files count, as for every reader,
and only their ``status`` and ``model`` columns are read (the date comes from the path).
Every file access goes through ``DatasetFiles``, a pyarrow FileSystem and a base path, so an
object store can stand in for the local disk.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .dataset import META_DIR
from .errors import OutputError, UsageError
from .storage import open_store, parse_location

SMALL_FILE_BYTES = 8 * 2**20  # a file under 8 MiB is "small": many of them slow every reader
LAST_RUNS = 10  # runs listed, newest first
STATUSES = ("completed", "failed", "invalid")
# A committed data file, as dataset.committed_files finds them: partitions, then part-*.
_DATA_FILE = re.compile(r"harvest_date=([^/]*)/model_key=[^/]*/part-[^/]*\.parquet")
_OLD_LAYOUT = re.compile(r"harvest_date=[^/]*/model=")
_RUN_STAMP = "%Y%m%dT%H%M%SZ"
# What each run line keeps of a saved report.
_RUN_FIELDS = (
    "run_id", "exit_code", "unique_ids", "already_done", "completed", "failed", "invalid",
    "unresolved", "requests", "elapsed_s", "workers", "shard",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetFiles:
    """The one door to a DIR's files: a pyarrow FileSystem and the DIR's path in it."""

    fs: pafs.FileSystem
    base: str

    @classmethod
    def local(cls, root: Path) -> DatasetFiles:
        """A DIR on the local disk; exit 2 (one line) when it is missing or no dataset."""
        if not root.exists():
            raise UsageError(f"{root}: no such directory")
        if not root.is_dir():
            raise UsageError(f"{root}: not a directory (give a run's --out DIR)")
        return cls(pafs.LocalFileSystem(), str(root.resolve()))

    @classmethod
    def of(cls, location: str | Path) -> DatasetFiles:
        """A local DIR, or a dataset in object storage (``s3://bucket/prefix``), opened the
        way ``--out`` opens it."""
        where = parse_location(location, "inspect")
        if isinstance(where, Path):
            return cls.local(where)
        store = open_store(where)
        assert store.filesystem is not None  # only a local store reads paths as they are
        return cls(store.filesystem, store.base)

    def listing(self) -> list[pafs.FileInfo] | None:
        """Every file under the DIR's partitions and metadata folder, or None when the DIR
        has entries but none of those (no dataset: nothing else is walked, say in ``/``)."""
        try:
            top = self.fs.get_file_info(pafs.FileSelector(self.base))
            ours = [
                info
                for info in top
                if info.type == pafs.FileType.Directory
                and (info.base_name.startswith("harvest_date=") or info.base_name == META_DIR)
            ]
            if top and not ours:
                return None
            infos = [
                info
                for folder in ours
                for info in self.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
            ]
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{self.base}: cannot list it ({exc})") from exc
        return [info for info in infos if info.type == pafs.FileType.File]

    def relative(self, info: pafs.FileInfo) -> str:
        """The file's path inside the DIR, with ``/`` between parts."""
        path: str = info.path
        return path[len(self.base) :].lstrip("/")

    def read_columns(self, path: str, columns: list[str]) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return bytes(stream.read())


@dataclass
class _Tally:
    rows: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    no_model: int = 0
    by_date: Counter[str] = field(default_factory=Counter)

    def add(self, table: pa.Table, harvest_date: str) -> None:
        if not table.num_rows:
            return  # a schema-only file (a run that stopped before any answer)
        self.rows += table.num_rows
        self.by_date[harvest_date] += table.num_rows
        for column, counter in (("status", self.by_status), ("model", self.by_model)):
            counts = pc.value_counts(table.column(column).combine_chunks())
            for value, count in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            ):
                if value is None:
                    self.no_model += count  # only the model column may be null
                else:
                    counter[value] += count


def inspect_dir(root: Path | str, files: DatasetFiles | None = None) -> dict[str, Any]:
    """The figures of the dataset in ``root`` (a DIR or a URI), as ``inspect --json`` prints."""
    files = files or DatasetFiles.of(root)
    listing = files.listing()
    if listing is None:
        raise UsageError(
            f"{root}: not a harvester dataset (no harvest_date=... folders, no {META_DIR}/)"
        )
    names = [(files.relative(info), info) for info in listing]
    if any(_OLD_LAYOUT.match(name) for name, _ in names):
        raise UsageError(f"{root} holds a dataset in the old layout (model=... folders)")
    data = [(m.group(1), info) for name, info in names if (m := _DATA_FILE.fullmatch(name))]
    reports = sorted(
        info.path
        for name, info in names
        if re.fullmatch(rf"{META_DIR}/runs/[^/.][^/]*\.json", name)
    )
    tally = _Tally()
    for harvest_date, info in data:
        try:
            tally.add(files.read_columns(info.path, ["status", "model"]), harvest_date)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{info.path}: cannot read it ({exc})") from exc
    sizes = [info.size or 0 for _, info in data]
    runs = _runs(files, reports)
    return {
        "dir": str(root),
        "rows": tally.rows,
        "by_status": {status: tally.by_status.get(status, 0) for status in STATUSES}
        | {s: n for s, n in sorted(tally.by_status.items()) if s not in STATUSES},
        "by_model": dict(sorted(tally.by_model.items(), key=lambda item: (-item[1], item[0]))),
        "no_model": tally.no_model,  # failed and invalid rows: no model (not a key: any
        # string, "null" included, can be a model's name)
        "by_harvest_date": dict(sorted(tally.by_date.items())),
        "files": len(data),
        "bytes": sum(sizes),
        "small_files": sum(size < SMALL_FILE_BYTES for size in sizes),
        "small_file_bytes": SMALL_FILE_BYTES,
        "partitions": len({info.path.rsplit("/", 1)[0] for _, info in data}),
        "runs_total": len(runs),
        "runs": runs[:LAST_RUNS],
    }


def _runs(files: DatasetFiles, reports: list[str]) -> list[dict[str, Any]]:
    """Each run's report, newest first; a --workers run once (its workers' reports folded)."""
    loaded = []
    for path in reports:
        try:
            report = orjson.loads(files.read_bytes(path))
        except (OSError, orjson.JSONDecodeError):
            continue  # a report that cannot be read says nothing about the data
        if isinstance(report, dict):
            report.setdefault("run_id", path.rsplit("/", 1)[-1].removesuffix(".json"))
            loaded.append(report)
    children = {cid for r in loaded for cid in r.get("worker_run_ids") or []}
    runs = []
    for report in sorted(loaded, key=lambda r: str(r["run_id"]), reverse=True):
        if report["run_id"] in children:
            continue
        run = {name: report[name] for name in _RUN_FIELDS if name in report}
        run["started"] = _started(str(report["run_id"]))
        runs.append(run)
    return runs


def _started(run_id: str) -> str | None:
    """The UTC start time a run id begins with (``report.new_run_id``), ISO 8601."""
    try:
        return datetime.strptime(run_id.split("-", 1)[0], _RUN_STAMP).isoformat() + "Z"
    except ValueError:
        return None


def _name(model: str, width: int = 48) -> str:
    """A model as a text line can show it: quoted when it has spaces, controls or is empty."""
    shown = model if model.isprintable() and model.strip() == model and model else repr(model)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def format_inspection(figures: dict[str, Any]) -> str:
    """The figures for a person: a few aligned blocks."""
    mib = figures["bytes"] / 2**20
    names = {model: _name(model) for model in figures["by_model"]}
    width = max(map(len, [*names.values(), "(no model)", "completed"]))
    threshold = figures["small_file_bytes"] / 2**20
    lines = [
        f"{figures['dir']}: {figures['rows']} rows in {figures['files']} files "
        f"({mib:.1f} MiB, {figures['partitions']} partitions; "
        f"{figures['small_files']} files under {threshold:g} MiB)",
        "by status:",
        *(f"  {status:<{width}} {n:>10}" for status, n in figures["by_status"].items()),
        "by model:",
        *(f"  {names[model]:<{width}} {n:>10}" for model, n in figures["by_model"].items()),
        f"  {'(no model)':<{width}} {figures['no_model']:>10}",
        "by harvest date:",
        *(f"  {day:<{width}} {n:>10}" for day, n in figures["by_harvest_date"].items()),
    ]
    runs = figures["runs"]
    lines.append(f"last runs ({len(runs)} of {figures['runs_total']}):" if runs else "no runs")
    for run in runs:
        lines.append(
            f"  {run.get('started') or run['run_id']}  exit {run.get('exit_code', '?')}  "
            f"ids {run.get('unique_ids', '?')}  completed {run.get('completed', '?')}  "
            f"failed {run.get('failed', '?')}  invalid {run.get('invalid', '?')}  "
            f"unresolved {run.get('unresolved', '?')}  in {run.get('elapsed_s', '?')} s"
        )
    return "\n".join(lines)
