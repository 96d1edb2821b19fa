"""Completed rows stored from the server's JSON bytes (``sink._Bodies``, parsed by Arrow's
reader in the writer thread) hold exactly what the validated Completion says, the way rows
stored from Python strings do: any text, any shape the client accepts, any size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester import sink as sink_module
from harvester.client import LONG_BODY_BYTES, json_line, parse_long_ok, parse_ok
from harvester.model import API_FIELDS, EXTRA_FIELD, Kind
from harvester.sink import ParquetSink

from .conftest import api_document, make_ids

# Any Unicode scalar value (no lone surrogates: they are not valid UTF-8, and JSON text is).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
OPTIONAL = st.one_of(st.none(), TEXT)


def stored_rows(root: Path) -> list[dict[str, Any]]:
    """Every row of every file under ``root``, ordered by id."""
    files = sorted(root.rglob("*.parquet"))
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda row: row["id"])


async def store(root: Path, bodies: list[bytes], *, as_lines: bool = True) -> list[Any]:
    """Validate each body as the client does and commit it, from its bytes (``as_lines``)
    or from its Python strings; return the validated Completions."""
    sink = ParquetSink(root, run_id="r")
    docs = []
    for conversation_id, body in zip(make_ids(len(bodies)), sorted(bodies), strict=True):
        kind, doc = parse_ok("application/json", body)
        assert kind is Kind.COMPLETED
        assert doc is not None
        line = json_line(body)
        sink.add(conversation_id, kind, doc, 1, line if as_lines else None)
        docs.append((conversation_id, doc))
    await sink.flush()
    return docs


def assert_stored(root: Path, docs: list[Any]) -> None:
    rows = {row["id"]: row for row in stored_rows(root)}
    assert len(rows) == len(docs)
    for conversation_id, doc in docs:
        row = rows[conversation_id]
        for name in (*API_FIELDS, EXTRA_FIELD):
            assert row[name] == doc[name], name
        assert row["status"] == "completed"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    model=TEXT,
    texts=st.lists(TEXT, min_size=6, max_size=6),
    fanouts=st.one_of(st.none(), st.lists(TEXT, max_size=4)),
    targeting=st.lists(OPTIONAL, min_size=4, max_size=4),
    extra=st.dictionaries(TEXT, st.one_of(st.integers(-(2**53), 2**53), TEXT), max_size=2),
    pretty=st.booleans(),
)
async def test_any_completion_is_stored_as_validated(
    tmp_path_factory: pytest.TempPathFactory,
    model: str,
    texts: list[str],
    fanouts: list[str] | None,
    targeting: list[str | None],
    extra: dict[str, Any],
    pretty: bool,
) -> None:
    """Text in any script, escapes, empty and null values, fields beyond the spec and a
    pretty-printed body all come back from the file exactly as the client read them."""
    doc = api_document(model)
    for name, value in zip(
        ("query", "html", "prompt", "completion", "sources", "ads"), texts, strict=True
    ):
        doc[name] = value
    doc["fanouts"] = fanouts
    for name, target in zip(("device", "country", "subdivision", "city"), targeting, strict=True):
        doc[name] = target
    doc.update({key: value for key, value in extra.items() if key not in doc})
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if pretty else 0)
    root = tmp_path_factory.mktemp("bodies")
    assert_stored(root, await store(root, [body]))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    model=TEXT,
    texts=st.lists(TEXT, min_size=6, max_size=6),
    extra=st.dictionaries(TEXT, TEXT, max_size=2),
    pretty=st.booleans(),
)
async def test_a_long_answer_stored_from_its_headline_is_the_completion(
    tmp_path_factory: pytest.TempPathFactory,
    model: str,
    texts: list[str],
    extra: dict[str, Any],
    pretty: bool,
) -> None:
    """A long answer, checked by parse_long_ok (which never decodes its long strings) and
    stored from its line, is in the file exactly as parse_ok reads it."""
    doc = api_document(model, fanouts=texts[:2])
    for n, name in enumerate(("query", "html", "prompt", "completion", "sources", "ads")):
        doc[name] = texts[n] * (1 + LONG_BODY_BYTES // (1 + len(texts[n].encode())) // 3)
    doc.update({key: value for key, value in extra.items() if key not in doc})
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if pretty else 0)
    if len(body) < LONG_BODY_BYTES:
        body = orjson.dumps({**doc, "html": doc["html"] + "x" * LONG_BODY_BYTES})
    kind, headline = parse_long_ok("application/json", body)
    _, expected = parse_ok("application/json", body)
    assert kind is Kind.COMPLETED
    assert headline is not None
    assert expected is not None
    root = tmp_path_factory.mktemp("long")
    sink = ParquetSink(root, run_id="r")
    (conversation_id,) = make_ids(1)
    sink.add(conversation_id, kind, headline, 1, json_line(body))
    await sink.flush()
    assert_stored(root, [(conversation_id, expected)])


async def test_bodies_and_strings_give_the_same_files(tmp_path: Path) -> None:
    """The same answers stored from bytes and from strings give identical rows."""
    bodies = [orjson.dumps(api_document(model, html="é" * n)) for n, model in enumerate("abcab")]
    docs = await store(tmp_path / "lines", bodies)
    await store(tmp_path / "strings", bodies, as_lines=False)
    strip = [
        {k: v for k, v in row.items() if k != "harvested_at"}
        for row in stored_rows(tmp_path / "lines")
    ]
    same = [
        {k: v for k, v in row.items() if k != "harvested_at"}
        for row in stored_rows(tmp_path / "strings")
    ]
    assert strip == same
    assert_stored(tmp_path / "lines", docs)


async def test_a_key_sent_twice_is_stored_as_orjson_read_it(tmp_path: Path) -> None:
    """Arrow's reader refuses a key sent twice; the row is then parsed by orjson (the last
    value wins, as the client validated it), and the other rows of the file are kept."""
    twice = orjson.dumps(api_document())[:-1] + b', "model": "second"}'
    bodies = [twice, orjson.dumps(api_document("other"))]
    docs = await store(tmp_path, bodies)
    assert {doc["model"] for _, doc in docs} == {"second", "other"}
    assert_stored(tmp_path, docs)


async def test_many_rows_and_huge_ones_across_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows parsed in several slices, one body larger than a whole slice, all in order."""
    monkeypatch.setattr(sink_module, "SLICE_BYTES", 64 * 1024)
    bodies = [orjson.dumps(api_document(html=f"{n}" * 500)) for n in range(300)]
    bodies.append(orjson.dumps(api_document(html="ü" * (3 * 1024 * 1024))))  # > 1 MiB block
    docs = await store(tmp_path, bodies)
    assert_stored(tmp_path, docs)


async def test_rows_from_bytes_and_strings_share_a_file(tmp_path: Path) -> None:
    """Completed rows from bytes, and failed rows, in one partition make one file."""
    sink = ParquetSink(tmp_path, run_id="r")
    ids = make_ids(3)
    body = orjson.dumps(api_document())
    _, doc = parse_ok("application/json", body)
    assert doc is not None
    sink.add(ids[0], Kind.COMPLETED, doc, 2, body)
    sink.add(ids[1], Kind.COMPLETED, doc, 3)
    sink.add(ids[2], Kind.FAILED, None, 1)
    await sink.flush()
    rows = {row["id"]: row for row in stored_rows(tmp_path)}
    assert {rows[i]["polls"] for i in ids} == {2, 3, 1}
    assert rows[ids[0]]["html"] == rows[ids[1]]["html"] == doc["html"]
    assert rows[ids[2]]["html"] is None
    assert len(list(tmp_path.rglob("*.parquet"))) == 2  # completed (chatgpt) and failed (null)


async def test_long_rows_take_the_threaded_path_to_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows past ``LONG_ROW_BYTES`` are parsed by Arrow's pool and made a row group ahead
    (``_ahead``), across several row groups, and store exactly what the strings say; short
    rows take neither (they would only take CPU from the loop)."""
    monkeypatch.setattr(sink_module, "ROW_GROUP_BYTES", 256 * 1024)
    made_ahead: list[int] = []
    ahead = sink_module._ahead

    def spy(tables: Any) -> Any:
        made_ahead.append(1)
        return ahead(tables)

    monkeypatch.setattr(sink_module, "_ahead", spy)
    text = '<p class="x">ça \\ \u2028 ✓ 𝄞</p>\n' * 2000  # ~64 KB, escapes and astral
    bodies = [
        orjson.dumps(api_document(model, html=f"{n}{text}")) for n, model in enumerate("ab" * 20)
    ]
    docs = await store(tmp_path / "lines", bodies)
    assert made_ahead  # both partitions' rows are long
    assert_stored(tmp_path / "lines", docs)
    await store(tmp_path / "strings", bodies, as_lines=False)
    assert [row["html"] for row in stored_rows(tmp_path / "strings")] == [
        row["html"] for row in stored_rows(tmp_path / "lines")
    ]
    made_ahead.clear()
    await store(tmp_path / "short", [orjson.dumps(api_document(html="short"))])
    assert made_ahead == []
