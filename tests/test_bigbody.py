"""Big answers decoded in the child process (``bigbody.py``) are stored exactly as the small
path stores them, and fail the same way."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from harvester.bigbody import BigBodies, decode
from harvester.client import parse_ok
from harvester.errors import BadResponseError
from harvester.model import Kind
from harvester.prepared import BIG_BODY_BYTES, Prepared
from harvester.runner import harvest
from harvester.sink import ParquetSink

from .api_double import Answer, ApiDouble
from .conftest import TOKEN, api_document, fast_settings, make_ids, read_rows, write_csv

# Non-ASCII of every UTF-8 width, a lone surrogate's escape, NUL and an extra field.
_UNIT = "Überprüfung — 品質 — проверка 🚀 \\ud800? \x00 "


def big_document(model: str = "chatgpt") -> dict[str, object]:
    html = "<p>" + _UNIT * (BIG_BODY_BYTES // len(_UNIT.encode()) + 10) + "</p>"
    return api_document(model, html=html, fanouts=["a", "ü"], country="DE", custom={"x": [1]})


def test_decode_matches_the_small_path(tmp_path: Path) -> None:
    body = orjson.dumps(big_document())
    assert len(body) >= BIG_BODY_BYTES
    what, model, ipc = decode("application/json", body)
    assert (what, model) == ("row", "chatgpt")
    assert ipc is not None
    kind, doc = parse_ok("application/json", body)
    assert kind is Kind.COMPLETED
    assert doc is not None
    big = ParquetSink(tmp_path / "a", run_id="r1", clock=lambda: 1_700_000_000.0)
    small = ParquetSink(tmp_path / "b", run_id="r1", clock=lambda: 1_700_000_000.0)
    big.add("id-1", Kind.COMPLETED, Prepared("chatgpt", ipc), 3)
    big.add("id-2", Kind.FAILED, None, 1)
    small.add("id-1", Kind.COMPLETED, doc, 3)
    small.add("id-2", Kind.FAILED, None, 1)
    tables = []
    for sink in (big, small):
        sink._write_all(list(sink._parts), sink._parts, sink._bodies, 1)
        files = sorted(sink.store.root.glob("*/*/part-*.parquet"))  # type: ignore[attr-defined]
        tables.append(sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=str))
    assert tables[0] == tables[1]
    assert any(r["html"] == doc["html"] for r in tables[0])


@pytest.mark.parametrize(
    ("content_type", "body", "label"),
    [
        ("application/json", b"[" + b" " * BIG_BODY_BYTES + b"1]", "bad_shape"),
        ("application/json", b"{" + b" " * BIG_BODY_BYTES, "bad_json"),
        ("text/html", b"<html>" + b" " * BIG_BODY_BYTES, "not_json"),
    ],
)
async def test_bad_big_bodies_fail_as_small_ones(
    content_type: str, body: bytes, label: str
) -> None:
    with pytest.raises(BadResponseError) as small:
        parse_ok(content_type, body)
    pool = BigBodies()
    try:
        with pytest.raises(BadResponseError) as big:
            await pool.parse_ok(content_type, body)
    finally:
        pool.close()
    assert big.value.label == small.value.label == label


async def test_a_big_status_object_is_a_kind() -> None:
    body = orjson.dumps({"status": "failed", "pad": "x" * BIG_BODY_BYTES})
    pool = BigBodies()
    try:
        assert await pool.parse_ok("application/json", body) == (Kind.FAILED, None)
    finally:
        pool.close()


async def test_a_run_stores_big_answers_exactly(tmp_path: Path) -> None:
    ids = make_ids(6)
    docs = {
        i: (big_document() if n % 2 else api_document(custom={"x": [1]})) for n, i in enumerate(ids)
    }
    scripts: dict[str, list[Answer]] = {
        i: [(202, {"status": "retrieving"}), (200, d)] for i, d in docs.items()
    }
    with ApiDouble(scripts, token=TOKEN) as double:
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", ids), tmp_path / "out", double.base_url
        )
        result = await harvest(settings)
    assert result.summary["completed"] == 6
    rows = {r["id"]: r for r in read_rows(tmp_path / "out").to_pylist()}
    for i, sent in docs.items():
        assert rows[i]["html"] == sent["html"]
        assert rows[i]["fanouts"] == sent["fanouts"]
        assert rows[i]["country"] == sent["country"]
        assert orjson.loads(rows[i]["extra"]) == {"custom": {"x": [1]}}
        assert rows[i]["polls"] == 2
