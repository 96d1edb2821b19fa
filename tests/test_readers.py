"""Every DIR the harvester leaves opens in every common reader, with the same rows and the
same column types, and every model value read back exactly as the server sent it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from harvester.dataset import partition_dir, partition_key

from .dir_states import BUILDERS, HOSTILE_MODELS, State

# What a reader gives back: each row's (id, status, model, html), and each column's type.
Read = tuple[list[tuple[Any, ...]], dict[str, str]]
CHECKED = ("id", "status", "model", "html")


def _from_arrow(table: pa.Table) -> Read:
    rows = list(zip(*(table.column(n).to_pylist() for n in CHECKED), strict=True))
    return rows, {f.name: str(f.type) for f in table.schema}


def read_pyarrow_dataset(root: str) -> Read:
    return _from_arrow(ds.dataset(root, format="parquet", partitioning="hive").to_table())


def read_pq_read_table(root: str) -> Read:
    return _from_arrow(pq.read_table(root))


def read_pandas(root: str) -> Read:
    frame = pd.read_parquet(root)
    columns = [[None if pd.isna(v) else v for v in frame[n]] for n in CHECKED]
    return list(zip(*columns, strict=True)), {n: str(t) for n, t in frame.dtypes.items()}


def read_duckdb(root: str) -> Read:
    relation = duckdb.sql(
        f"SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)"
    )
    assert relation is not None
    types = dict(zip(relation.columns, map(str, relation.types), strict=True))
    picked = relation.select(*CHECKED).fetchall()
    return [tuple(row) for row in picked], types


def read_polars(root: str) -> Read:
    frame = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True).collect()
    return list(frame.select(CHECKED).iter_rows()), {n: str(t) for n, t in frame.schema.items()}


READERS: dict[str, Callable[[str], Read]] = {
    "pyarrow.dataset": read_pyarrow_dataset,
    "pq.read_table": read_pq_read_table,
    "pandas": read_pandas,
    "duckdb": read_duckdb,
    "polars": read_polars,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("state", BUILDERS)
def test_every_reader_sees_exactly_the_committed_rows(
    dir_states: dict[str, State], state: str, reader: str
) -> None:
    """Each reader gets one row per committed id, with the status and model sent, in every
    state a run can leave DIR in (empty, only invalid, only failed, killed, appended...)."""
    found = dir_states[state]
    rows, types = READERS[reader](str(found.root))
    got = {row[0]: row[1:] for row in rows}
    assert len(got) == len(rows), "an id was read twice"
    expected = {
        cid: (status, model, None if model is None else f"<p>{model}</p>")
        for cid, (status, model) in found.rows.items()
    }
    assert got == expected
    assert {"id", "status", "model", "harvest_date", "model_key"} <= set(types)


@pytest.mark.parametrize("reader", READERS)
def test_column_types_are_the_same_in_every_state(
    dir_states: dict[str, State], reader: str
) -> None:
    """A reader types each column the same whatever the DIR holds: a partition typed null
    in one DIR and text in another is what broke pandas."""
    typed = {name: READERS[reader](str(s.root))[1] for name, s in dir_states.items()}
    reference = typed["mixed"]
    for name, types in typed.items():
        assert types == reference, name


def test_hostile_models_are_all_in_the_mixed_state(dir_states: dict[str, State]) -> None:
    """The reader matrix above did cover every hostile model, each with its own key."""
    models = {m for _, m in dir_states["mixed"].rows.values()}
    assert set(HOSTILE_MODELS) <= models
    folders = {p.parent.name for p in dir_states["mixed"].root.rglob("*.parquet")}
    assert {f"model_key={partition_key(m)}" for m in HOSTILE_MODELS} <= folders


@pytest.mark.parametrize(
    "model", ["gemini", "claude-3.5-sonnet", "NaN", "true", "inf", "epoch", "x" * 80]
)
def test_readers_type_any_single_key_as_text(tmp_path: Any, model: str) -> None:
    """Even when a DIR holds one model only, whose name DuckDB or Polars would parse as a
    number, date or boolean, its ``model_key`` is read as text."""
    directory = partition_dir(tmp_path, "2026-12-01", model)
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "model": [model]}), directory / "part-x.parquet")
    relation = duckdb.sql(
        f"SELECT model_key FROM read_parquet('{tmp_path}/**/*.parquet', hive_partitioning=true)"
    )
    assert relation is not None
    assert relation.types == ["VARCHAR"]
    assert relation.fetchall() == [(partition_key(model),)]
    frame = pl.scan_parquet(f"{tmp_path}/**/*.parquet", hive_partitioning=True).collect()
    assert frame.schema["model_key"] == pl.String
    assert pq.read_table(tmp_path).column("model_key").type.value_type == pa.string()


def test_a_common_model_is_found_by_row_group_statistics(dir_states: dict[str, State]) -> None:
    """Each file holds one model, so its min/max statistics let readers skip the others."""
    for path in dir_states["mixed"].root.rglob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        if not metadata.num_rows:
            continue
        column = metadata.schema.names.index("model")
        stats = metadata.row_group(0).column(column).statistics
        if stats.null_count == metadata.num_rows:
            continue
        assert stats.has_min_max
        assert stats.min == stats.max
        assert partition_key(stats.min) == path.parent.name.removeprefix("model_key=")
