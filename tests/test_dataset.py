"""Tests of the dataset layout: partition segments, bulk uuid keys, reading back what is done."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.dataset import (
    NULL_MODEL_KEY,
    check_layout,
    load_done,
    open_dataset,
    partition_dir,
    partition_key,
    uuid_keys,
)
from harvester.errors import OutputError, UsageError
from harvester.ids import invalid_key, uuid_key
from harvester.idset import Keys, as_keys
from harvester.model import Completion, Kind
from harvester.sink import ParquetSink

from .conftest import completion

DAY = "2024-05-01"
HOSTILE = [
    "../../x",
    "a/b",
    "/etc/passwd",
    "..",
    ".",
    "...",
    "a\\b",
    "..\\..\\x",
    "\x00",
    "a\x00b",
    "日本語モデル",
    "emoji 🤖",
    "m" * 300,
    "é" * 150,
    "",
    " ",
    "%2F",
    "model=x",
    "a=b/c=d",
    "~",
    "_hidden",
    ".hidden",
    "line\nbreak",
]
PLAIN = ["chatgpt", "gemini", "perplexity", "copilot", "gpt-4o", "claude_3.5", "llama-3.1-70b"]


def some_uuids(count: int, salt: int = 0) -> list[str]:
    """``count`` reproducible canonical uuids."""
    return [str(uuid.UUID(int=(salt << 64) + n * 7919 + 1)) for n in range(count)]


def assert_safe_segment(segment: str) -> None:
    """``segment`` (after ``model_key=``) makes one harmless, short directory name."""
    name = f"model_key={segment}"
    assert segment
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert len(name.encode("utf-8")) <= 200


def raw(keys: Keys) -> list[bytes]:
    """Each 16-byte key exactly (``tolist`` would strip trailing NUL bytes)."""
    data = keys.tobytes()
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def assert_inside(root: Path, model: str | None) -> None:
    """The partition directory of ``model`` is a grandchild of ``root``, once resolved."""
    directory = partition_dir(root, DAY, model)
    assert directory.parent.parent == root
    resolved = directory.resolve()
    assert resolved.is_relative_to(root.resolve())
    assert resolved.parent.parent == root.resolve()


# -- partition_key ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", PLAIN)
def test_plain_names_are_their_own_key(value: str) -> None:
    """Ordinary model names are their own ``model_key``."""
    assert partition_key(value) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_become_one_safe_segment(value: str, tmp_path: Path) -> None:
    """Traversal, separators, NUL, unicode, long and empty values give one safe segment."""
    assert_safe_segment(partition_key(value))
    assert "~" in partition_key(value)
    assert_inside(tmp_path, value)


@pytest.mark.parametrize(
    "word", ["nan", "NaN", "inf", "Infinity", "epoch", "true", "FALSE", "null", "None"]
)
def test_words_readers_parse_get_a_digest(word: str) -> None:
    """Words DuckDB or Polars would type as a number, date or boolean are never a bare key."""
    assert partition_key(word).startswith(f"{word}~")


@pytest.mark.parametrize(
    "variants", [["gemini", "Gemini", "GEMINI"], ["a", "a.", "A."], ["gpt-4o", "GPT-4o", "gpt-4o."]]
)
def test_keys_differ_on_case_insensitive_disks(variants: list[str]) -> None:
    """Models differing only in case or a trailing dot (one folder on macOS or Windows) get
    keys that differ however a file system folds them."""
    folded = {partition_key(v).lower().rstrip(".") for v in variants}
    assert len(folded) == len(variants)


def test_null_model_has_its_own_key(tmp_path: Path) -> None:
    """No model (failed, invalid) is ``~null``, inside root, and no text model's key."""
    assert partition_key(None) == NULL_MODEL_KEY == "~null"
    assert_inside(tmp_path, None)
    for value in ("~null", "null", "", "~", NULL_MODEL_KEY):
        assert partition_key(value) != NULL_MODEL_KEY


def test_long_values_keep_a_readable_prefix_and_differ() -> None:
    """Long values share a prefix but still get distinct, short keys."""
    a, b = "x" * 300, "x" * 299 + "y"
    assert partition_key(a).startswith("x" * 40 + "~")
    assert partition_key(a) != partition_key(b)


_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=400)


@given(value=_TEXT)
def test_any_text_is_one_safe_segment(value: str) -> None:
    """For any text the key is safe and its directory stays inside root."""
    assert_safe_segment(partition_key(value))
    root = Path("/srv/data")
    directory = partition_dir(root, DAY, value)
    assert directory.parent.parent == root
    assert os.path.normpath(directory) == str(directory)


@given(values=st.lists(_TEXT, min_size=2, max_size=20, unique=True))
def test_distinct_values_give_distinct_keys(values: list[str]) -> None:
    """Distinct values never share a key (random text)."""
    keys = [partition_key(v) for v in values]
    assert len(set(keys)) == len(values)


def _digest_key(value: str) -> str:
    """The key a non-plain ``value`` gets, spelled out: prefix, ``~``, 16 digest digits."""
    return f"{value[:40]}~{hashlib.sha256(value.encode()).hexdigest()[:16]}"


@pytest.mark.parametrize("value", ["a" * 200, "", "../x"], ids=["long", "empty", "path"])
def test_digest_key_cannot_be_spelled_by_another_model(value: str) -> None:
    """A model spelled like another's digest key gets a key of its own."""
    assert partition_key(_digest_key(value)) != partition_key(value)


# -- uuid_keys --------------------------------------------------------------------------------


def test_uuid_keys_match_uuid_bytes() -> None:
    """Bulk keys equal ``uuid.UUID(x).bytes`` for each id, in order."""
    ids = [
        *some_uuids(50),
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "12345678-0000-0000-0000-000000000000",
    ]
    keys = uuid_keys(pa.array(ids))
    assert keys.dtype == as_keys([]).dtype
    assert raw(keys) == [uuid.UUID(x).bytes for x in ids]


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string()])
@pytest.mark.parametrize(("start", "stop"), [(1, 5), (3, 50), (49, 50), (0, 1)])
def test_uuid_keys_on_sliced_arrays(string_type: Any, start: int, stop: int) -> None:
    """A slice (offset != 0) decodes exactly its own values."""
    ids = some_uuids(50, salt=3)
    array = pa.array(ids, type=string_type).slice(start, stop - start)
    assert raw(uuid_keys(array)) == [uuid.UUID(x).bytes for x in ids[start:stop]]


def test_uuid_keys_slice_skips_bad_neighbours() -> None:
    """Bad values outside the slice do not matter."""
    good = some_uuids(4)
    array = pa.array(["junk", *good, "X" * 36])
    assert raw(uuid_keys(array.slice(1, 4))) == [uuid.UUID(x).bytes for x in good]


@pytest.mark.parametrize(
    "array",
    [pa.array([], type=pa.string()), pa.array(some_uuids(5)).slice(2, 0)],
    ids=["empty", "empty_slice"],
)
def test_uuid_keys_empty(array: Any) -> None:
    """Empty arrays give an empty key array."""
    assert len(uuid_keys(array)) == 0


_GOOD = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


@pytest.mark.parametrize(
    "bad",
    [
        _GOOD.upper(),
        _GOOD.replace("-", ""),
        "{" + _GOOD[1:-1] + "}",
        _GOOD[:8] + "x" + _GOOD[9:],  # a hyphen replaced
        _GOOD[:-1] + "g",
        _GOOD[:9] + "-" + _GOOD[10:],  # a hex digit replaced by a hyphen
        "é" * 18,  # 36 bytes, not ascii
        "junk",
        "",
        None,
    ],
)
def test_uuid_keys_rejects_non_canonical(bad: str | None) -> None:
    """Any non-canonical id among canonical ones raises ``OutputError``."""
    with pytest.raises(OutputError):
        uuid_keys(pa.array([*some_uuids(3), bad, *some_uuids(2, salt=1)], type=pa.string()))


# -- load_done and the sink's files ----------------------------------------------------------


async def write_rows(root: Path, rows: list[tuple[str, str, Completion | None]]) -> None:
    """Commit ``rows`` (id, status, doc) through a ``ParquetSink``."""
    sink = ParquetSink(root, run_id="r")
    for conversation_id, status, doc in rows:
        sink.add(conversation_id, Kind(status), doc, 1)
    await sink.flush()


def test_load_done_missing_root(tmp_path: Path) -> None:
    """A dataset directory that does not exist yet has nothing done."""
    assert len(load_done(tmp_path / "absent")) == 0


async def test_load_done_returns_exactly_the_written_keys(tmp_path: Path) -> None:
    """Completed, failed and invalid rows are all done; invalid ones by their stored value."""
    completed = some_uuids(20, salt=1)
    failed = some_uuids(5, salt=2)
    invalid = ["junk", "", "x" * 1024, "日本", "3F2504E0"]
    rows: list[tuple[str, str, Completion | None]] = []
    rows += [
        (cid, "completed", completion("chatgpt" if n % 2 else "gemini"))
        for n, cid in enumerate(completed)
    ]
    rows += [(cid, "failed", None) for cid in failed]
    rows += [(value, "invalid", None) for value in invalid]
    await write_rows(tmp_path, rows)
    done = load_done(tmp_path)
    expected = [uuid_key(x) for x in completed + failed] + [invalid_key(v) for v in invalid]
    assert len(done) == len(expected)
    assert done.contains(as_keys(expected)).all()
    others = [uuid_key(x) for x in some_uuids(20, salt=9)] + [invalid_key("other")]
    assert not done.contains(as_keys(others)).any()


async def test_load_done_over_several_flushes_and_days(tmp_path: Path) -> None:
    """Rows from several files and harvest dates are all found."""
    clock_now = [1_700_000_000.0]
    sink = ParquetSink(tmp_path, run_id="r", clock=lambda: clock_now[0])
    first, second = some_uuids(10, salt=4), some_uuids(10, salt=5)
    for cid in first:
        sink.add(cid, Kind.COMPLETED, completion(), 1)
    await sink.flush()
    clock_now[0] += 86_400 * 2
    for cid in second:
        sink.add(cid, Kind.COMPLETED, completion("copilot"), 2)
    await sink.flush()
    dates = sorted(p.name for p in tmp_path.iterdir())
    assert len(dates) == 2
    done = load_done(tmp_path)
    assert len(done) == 20
    assert done.contains(as_keys([uuid_key(x) for x in first + second])).all()


async def test_hidden_temporary_and_meta_files_are_ignored(tmp_path: Path) -> None:
    """Hidden ``.tmp`` files (even garbage) and the ``_harvester`` directory are skipped."""
    ids = some_uuids(3)
    await write_rows(tmp_path, [(cid, "completed", completion()) for cid in ids])
    partition = partition_dir(tmp_path, DAY, "chatgpt")
    real = partition_dir(tmp_path, next(tmp_path.iterdir()).name.split("=")[1], "chatgpt")
    for directory in (partition, real, tmp_path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".x.parquet.tmp").write_bytes(b"PAR1\x00garbage")
        (directory / ".part-x.parquet.tmp").write_bytes(b"PAR1" + os.urandom(100))
    meta = tmp_path / "_harvester"
    meta.mkdir()
    (meta / "summary.json").write_bytes(b"{}")
    (meta / "part-evil.parquet").write_bytes(b"not parquet")
    assert open_dataset(tmp_path).to_table().num_rows == 3
    done = load_done(tmp_path)
    assert len(done) == 3
    assert done.contains(as_keys([uuid_key(x) for x in ids])).all()


async def test_load_done_rejects_non_uuid_in_completed_row(tmp_path: Path) -> None:
    """A completed row whose id is not canonical makes ``load_done`` raise ``OutputError``."""
    await write_rows(tmp_path, [("NOT-A-UUID", "completed", completion())])
    with pytest.raises(OutputError):
        load_done(tmp_path)


def external_read(root: Path) -> list[dict[str, Any]]:
    """Rows as an outside reader sees them: pyarrow.dataset with hive partitioning."""
    dataset = ds.dataset(str(root), format="parquet", partitioning="hive")
    rows: list[dict[str, Any]] = dataset.to_table().to_pylist()
    return rows


async def test_hostile_models_land_inside_root_and_read_back(tmp_path: Path) -> None:
    """Every hostile model is written under root and its column holds it exactly."""
    models = HOSTILE + PLAIN + ["__HIVE_DEFAULT_PARTITION__", "~null", "null", "NaN", "m" * 5000]
    ids = some_uuids(len(models), salt=6)
    root = tmp_path / "out"
    await write_rows(
        root, [(cid, "completed", completion(m)) for cid, m in zip(ids, models, strict=True)]
    )
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve())
        if path.is_file():
            assert path.relative_to(root).parts[0].startswith("harvest_date=")
            assert path.relative_to(root).parts[1].startswith("model_key=")
            assert len(path.relative_to(root).parts) == 3
    rows = {row["id"]: row for row in external_read(root)}
    assert set(rows) == set(ids)
    for cid, model in zip(ids, models, strict=True):
        row = rows[cid]
        assert row["model"] == model
        assert row["model_key"] == partition_key(model)
        assert row["extra"] is None


async def test_long_model_stored_whole_and_extra_untouched(tmp_path: Path) -> None:
    """A 300-char model is whole in ``model``; ``extra`` holds only the fields beyond the spec."""
    model = "m" * 300
    [cid] = some_uuids(1)
    await write_rows(tmp_path, [(cid, "completed", completion(model, latency=1.5))])
    [row] = external_read(tmp_path)
    assert row["model"] == model
    assert orjson.loads(row["extra"]) == {"latency": 1.5}


def test_old_layout_is_refused(tmp_path: Path) -> None:
    """A DIR with ``model=`` folders (harvester 0.x) is a usage error naming the fix."""
    (tmp_path / "harvest_date=2026-01-01" / "model=chatgpt").mkdir(parents=True)
    with pytest.raises(UsageError, match="old layout"):
        check_layout(tmp_path)
    check_layout(tmp_path / "absent")


async def test_unknown_fields_kept_in_extra(tmp_path: Path) -> None:
    """Fields beyond the spec are stored in ``extra``; known ones are columns."""
    [cid] = some_uuids(1)
    doc = completion("chatgpt", country="US", city=None, score=0.5, tags=["a"])
    await write_rows(tmp_path, [(cid, "completed", doc)])
    [row] = external_read(tmp_path)
    assert orjson.loads(row["extra"]) == {"score": 0.5, "tags": ["a"]}
    assert row["country"] == "US"
    assert row["city"] is None
    assert row["fanouts"] == ["f"]
    assert row["status"] == "completed"
    assert row["polls"] == 1


async def test_null_model_rows_read_back_as_null(tmp_path: Path) -> None:
    """Failed and invalid rows have a null model and no content."""
    [cid] = some_uuids(1)
    await write_rows(tmp_path, [(cid, "failed", None), ("junk", "invalid", None)])
    rows = sorted(external_read(tmp_path), key=lambda row: row["status"])
    assert [row["status"] for row in rows] == ["failed", "invalid"]
    assert all(row["model"] is None and row["html"] is None for row in rows)
