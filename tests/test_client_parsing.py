"""Tests of the API boundary: answer parsing, Retry-After, and the client over loopback HTTP."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from harvester import client as client_module
from harvester.client import (
    LONG_BODY_BYTES,
    CompletionsClient,
    parse_long_ok,
    parse_ok,
    parse_retry_after,
    parse_status,
)
from harvester.errors import (
    BadResponseError,
    FatalApiError,
    ServerError,
    ThrottledError,
    TransientError,
    TransportError,
)
from harvester.http1 import Http1Transport
from harvester.model import TEXT_FIELDS, Kind
from harvester.session import make_session

from .conftest import api_document, free_port

JSON = "application/json"
ID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
TOKEN = "tok_9f8e7d6c5b4a39281706f5e4d3c2b1a0ZQXW"
CAP = 4096
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def completion(**changes: Any) -> dict[str, Any]:
    """A valid Completion document, targeted, with ``changes`` applied (``None`` kept)."""
    targeted = {"device": "desktop", "country": "US", "subdivision": "CA", "city": "SF"}
    return api_document(**{**targeted, **changes})


def body(doc: Any) -> bytes:
    """JSON bytes of ``doc``."""
    return orjson.dumps(doc)


class ExpectBad:
    """Context manager asserting a ``BadResponseError`` of a given ``label`` was raised."""

    def __init__(self, label: str) -> None:
        """Expect ``label``."""
        self.label = label

    def __enter__(self) -> None:
        """Nothing to set up."""

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        """Swallow the expected error; fail on anything else."""
        assert isinstance(exc, BadResponseError), f"expected BadResponseError, got {exc!r}"
        assert exc.label == self.label
        assert isinstance(exc, TransientError)
        return True


def bad(kind: str) -> ExpectBad:
    """Like ``pytest.raises``: expect a transient ``BadResponseError`` of ``kind``."""
    return ExpectBad(kind)


# -- parse_ok ---------------------------------------------------------------------------------


def test_parse_ok_completion() -> None:
    """A JSON Completion is COMPLETED with the document as it came."""
    kind, doc = parse_ok(JSON, body(completion()))
    assert kind is Kind.COMPLETED
    assert doc == {**completion(), "extra": None}  # no fields beyond the spec


def test_parse_ok_content_type_with_charset() -> None:
    """Parameters and case in Content-Type do not matter."""
    kind, _ = parse_ok("Application/JSON; charset=utf-8", body(completion()))
    assert kind is Kind.COMPLETED


@pytest.mark.parametrize("absent", [True, False])
def test_parse_ok_targeting_null_or_absent(absent: bool) -> None:
    """Targeting fields may be null or missing altogether."""
    doc = completion(device=None, country=None, subdivision=None, city=None)
    if absent:
        for name in ("device", "country", "subdivision", "city"):
            del doc[name]
    kind, parsed = parse_ok(JSON, body(doc))
    assert kind is Kind.COMPLETED
    assert parsed is not None
    assert all(parsed.get(name) is None for name in ("device", "country", "subdivision", "city"))


@pytest.mark.parametrize("absent", [True, False])
def test_parse_ok_fanouts_null_or_absent_is_empty_list(absent: bool) -> None:
    """Null or missing fanouts mean none: an empty list."""
    doc = completion(fanouts=None)
    if absent:
        del doc["fanouts"]
    _, parsed = parse_ok(JSON, body(doc))
    assert parsed is not None
    assert parsed["fanouts"] == []


def test_parse_ok_keeps_unknown_fields() -> None:
    """Fields beyond the spec are kept, untouched, as one JSON object in ``extra``."""
    _, parsed = parse_ok(JSON, body(completion(latency=1.5, tags={"a": [1, None]})))
    assert parsed is not None
    assert orjson.loads(parsed["extra"] or "") == {"latency": 1.5, "tags": {"a": [1, None]}}


def test_parse_ok_model_outside_enum_accepted() -> None:
    """A model the spec does not list yet is still a Completion."""
    _, parsed = parse_ok(JSON, body(completion(model="grok-9")))
    assert parsed is not None
    assert parsed["model"] == "grok-9"


def test_parse_ok_html_is_not_json() -> None:
    """A text/html 200 is a ``not_json`` bad response."""
    with bad("not_json"):
        parse_ok("text/html; charset=utf-8", b"<html>hi</html>")


def test_parse_ok_no_content_type_is_not_json() -> None:
    """A 200 without Content-Type is a ``not_json`` bad response."""
    with bad("not_json"):
        parse_ok("", body(completion()))


@pytest.mark.parametrize(
    "raw", [body(completion())[:-7], b"", b"{", b"\xff\xfe{}", b"{'model': 1}", b"nope"]
)
def test_parse_ok_bad_json(raw: bytes) -> None:
    """Truncated, empty or non-UTF-8 JSON is ``bad_json``."""
    with bad("bad_json"):
        parse_ok(JSON, raw)


@pytest.mark.parametrize("raw", [b"[]", body([completion()]), b"null", b"3", b'"chatgpt"'])
def test_parse_ok_non_object_is_bad_shape(raw: bytes) -> None:
    """A JSON list, null, number or string body is ``bad_shape``."""
    with bad("bad_shape"):
        parse_ok(JSON, raw)


@pytest.mark.parametrize("name", TEXT_FIELDS)
def test_parse_ok_missing_required_field(name: str) -> None:
    """Each required string field, when missing, makes ``bad_shape``."""
    doc = completion()
    del doc[name]
    with bad("bad_shape"):
        parse_ok(JSON, body(doc))


@pytest.mark.parametrize(
    "changes",
    [
        {"model": 1},
        {"model": None},
        {"query": None},
        {"html": ["x"]},
        {"sources": []},
        {"ads": {}},
        {"completion": True},
        {"fanouts": "a"},
        {"fanouts": [1]},
        {"fanouts": ["a", None]},
        {"fanouts": {"a": 1}},
        {"device": 5},
        {"country": []},
        {"city": False},
    ],
)
def test_parse_ok_wrong_types(changes: dict[str, Any]) -> None:
    """A field of the wrong type makes ``bad_shape``."""
    with bad("bad_shape"):
        parse_ok(JSON, body(completion(**changes)))


@pytest.mark.parametrize(
    "changes",
    [
        {"model": ""},
        {"model": " "},
        {"model": "m" * 300},
        {"model": "../../x"},
        {"model": "__HIVE_DEFAULT_PARTITION__"},
        {"model": "new-model-not-in-the-spec"},
        {"query": "", "html": "", "prompt": "", "completion": "", "sources": "", "ads": ""},
        {"fanouts": []},
        {"fanouts": None},
        {"country": ""},
    ],
)
def test_parse_ok_stores_any_value_of_the_right_type(changes: dict[str, Any]) -> None:
    """A complete answer is terminal whatever its values: nothing of the right type is
    refused, so the server's last word on the id is stored, not polled again."""
    kind, doc = parse_ok(JSON, body(completion(**changes)))
    assert kind is Kind.COMPLETED
    assert doc is not None
    for name, value in changes.items():
        assert doc[name] == ([] if name == "fanouts" and value is None else value)  # type: ignore[literal-required]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"status": "retrieving"}, Kind.RETRIEVING),
        ({"status": "archiving"}, Kind.RETRIEVING),
        ({"status": "successful"}, Kind.RETRIEVING),  # no completion in it: ask again
        ({"status": "failed"}, Kind.FAILED),
    ],
)
def test_parse_ok_status_object(doc: dict[str, Any], expected: Kind) -> None:
    """A 200 status object (the newer API's form) means what the same 202 means; a bare
    ``successful`` has no completion to store, so the id is polled again for it."""
    assert parse_ok(JSON, body(doc)) == (expected, None)


def test_parse_ok_unknown_status_object() -> None:
    """A 200 status object with an unknown status is ``unknown_status``."""
    with bad("unknown_status"):
        parse_ok(JSON, body({"status": "done"}))


# -- parse_status -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("retrieving", Kind.RETRIEVING),
        ("archiving", Kind.RETRIEVING),
        ("successful", Kind.RETRIEVING),
        ("failed", Kind.FAILED),
    ],
)
def test_parse_status_known(status: str, expected: Kind) -> None:
    """Pending statuses are RETRIEVING and ``failed`` is FAILED."""
    assert parse_status(body({"status": status})) is expected


@pytest.mark.parametrize(
    "doc",
    [
        {"status": "completed"},
        {"status": "RETRIEVING"},
        {"status": "success"},
        {"status": None},
        {"status": ["failed"]},
        {},
        {"s": 1},
    ],
)
def test_parse_status_unknown(doc: dict[str, Any]) -> None:
    """Anything else is ``unknown_status``."""
    with bad("unknown_status"):
        parse_status(body(doc))


def test_parse_status_bad_json_and_shape() -> None:
    """A 202 body that is not a JSON object is ``bad_json`` or ``bad_shape``."""
    with bad("bad_json"):
        parse_status(b"retrieving")
    with bad("bad_shape"):
        parse_status(b'["retrieving"]')


def test_unknown_status_message_is_clipped() -> None:
    """An absurd status value is clipped in the message."""
    with pytest.raises(BadResponseError) as info:
        parse_status(body({"status": "x" * 10_000}))
    assert len(str(info.value)) < 100


# -- parse_long_ok: the same verdict as parse_ok, without decoding long strings ---------------

LONG = '<p>é€𝄞"\\\n\t</p>' * (LONG_BODY_BYTES // 20)  # escapes and 1-4 byte characters


def verdict(parse: Callable[[str, bytes], tuple[Kind, Any]], content_type: str, raw: bytes) -> Any:
    """What a parser makes of an answer: its kind and what the sink reads of a Completion
    (model and extra), or the label of the bad answer."""
    try:
        kind, doc = parse(content_type, raw)
    except BadResponseError as exc:
        return ("bad", exc.label)
    return (kind, None if doc is None else (doc["model"], doc["extra"]))


def long_body(**changes: Any) -> bytes:
    """A Completion whose html and completion are each longer than LONG_BODY_BYTES."""
    return body(completion(**{"html": LONG, "completion": LONG, **changes}))


def spliced(raw: bytes, marker: bytes, replacement: bytes) -> bytes:
    """``raw`` with its first ``marker`` replaced (a byte-level fault inside a long string)."""
    assert marker in raw
    return raw.replace(marker, replacement, 1)


LONG_CASES = {
    "completion": long_body(),
    "charset and case": long_body(),
    "extras": long_body(latency=1.5, tags={"a": [1, None]}),
    "an integer past 64 bits": long_body()[:-1] + b',"big":' + b"9" * 30 + b"}",
    "empty texts": long_body(query="", prompt="", sources="", ads=""),
    "long model": long_body(model="m" * 100_000),
    "long short fields": long_body(query="q" * 40_000, prompt="p" * 300, ads="a" * 255),
    "null targeting and fanouts": long_body(device=None, city=None, fanouts=None),
    "html a long list": long_body(html=["x"] * 20_000),
    "html a long number": spliced(long_body(), body(LONG), b"9" * 300),
    "fanouts wrong": long_body(fanouts=["a", 1]),
    "model missing": body({k: v for k, v in orjson.loads(long_body()).items() if k != "model"}),
    "status object": body({"status": "retrieving", "note": LONG}),
    "unknown status": body({"status": "nope", "note": LONG}),
    "a long list": body([LONG]),
    "a long string": body(LONG),
    "key twice": long_body()[:-1] + b', "model": "second"}',
    "long key twice": long_body()[:-1] + b', "html": 5}',
    "pretty": orjson.dumps(orjson.loads(long_body()), option=orjson.OPT_INDENT_2),
    "truncated": long_body()[: LONG_BODY_BYTES + 10],
    "trailing garbage": long_body() + b" x",
    "trailing comma": long_body()[:-1] + b",}",
    "bom": b"\xef\xbb\xbf" + long_body(),
    "bad utf-8 in html": spliced(long_body(), "€".encode(), b"\xff\xfe"),
    "overlong utf-8": spliced(long_body(), "é".encode(), b"\xc0\xaf"),
    "utf-8 surrogate": spliced(long_body(), "€".encode(), b"\xed\xa0\x80"),
    "cut character": spliced(long_body(), "€".encode(), b"\xe2\x82"),
    "lone surrogate escape": spliced(long_body(), b"\\n", b"\\ud800"),
    "bad escape": spliced(long_body(), b"\\n", b"\\q"),
    "raw control character": spliced(long_body(), b"\\t", b"\x01"),
    "raw newline in a string": spliced(long_body(), b"\\n", b"\n"),
    "nested 1000 deep": long_body()[:-1] + b',"deep":' + b"[" * 1000 + b"]" * 1000 + b"}",
    "nested 2000 deep": long_body()[:-1] + b',"deep":' + b"[" * 2000 + b"]" * 2000 + b"}",
    "float out of range": long_body()[:-1] + b',"x":1e400}',
    "NaN": long_body()[:-1] + b',"x":NaN}',
    # A key sent twice: the split keeps the last value only, so the first must not go unread.
    "bad value, then the key again": long_body()[:-1] + b',"device":1e400,"device":null}',
    "bad first value of a long field": b'{"html":1e400,' + long_body()[1:],
    "bad extra, then the key again": long_body()[:-1] + b',"x":' + b"9" * 400 + b',"x":1}',
    "deep extra, then the key again": (
        long_body()[:-1] + b',"x":' + b"[" * 1024 + b"]" * 1024 + b',"x":1}'
    ),
    # orjson's depth limit counts from the top of the body, not of the value.
    "a value 1023 deep": long_body()[:-1] + b',"n":' + b"[" * 1023 + b"]" * 1023 + b"}",
    "a value 1024 deep": long_body()[:-1] + b',"n":' + b"[" * 1024 + b"]" * 1024 + b"}",
    "a status with a value 1024 deep": (
        body({"status": "failed", "note": LONG})[:-1] + b',"n":' + b"[" * 1024 + b"]" * 1024 + b"}"
    ),
    "escaped key spellings": spliced(
        spliced(long_body(), b'"html"', b'"ht\\u006dl"'), b'"model"', b'"mod\\u0065l"'
    ),
    "spaces between members": spliced(long_body(), b'","', b'" , "'),
    "trailing newline": long_body() + b"\r\n",
}


@pytest.mark.parametrize("content_type", [JSON, "Application/JSON; charset=utf-8", "text/html"])
@pytest.mark.parametrize("raw", LONG_CASES.values(), ids=LONG_CASES.keys())
def test_parse_long_ok_agrees_with_parse_ok(raw: bytes, content_type: str) -> None:
    """For every long answer, sound or hostile, parse_long_ok decides what parse_ok decides:
    the same kind, model and extra, or the same bad answer."""
    assert len(raw) >= LONG_BODY_BYTES
    assert verdict(parse_long_ok, content_type, raw) == verdict(parse_ok, content_type, raw)


def test_parse_long_ok_reads_a_compact_answer_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compact long answer (as servers send them), with a trailing newline or not, is read
    without parse_ok: the fast path is taken, not only agreed with."""

    def refuse(content_type: str, raw: bytes) -> Any:
        raise AssertionError("parse_ok was asked")

    monkeypatch.setattr(client_module, "parse_ok", refuse)
    for raw in (LONG_CASES["completion"], LONG_CASES["extras"], LONG_CASES["trailing newline"]):
        assert parse_long_ok(JSON, raw)[0] is Kind.COMPLETED
    assert parse_long_ok(JSON, LONG_CASES["status object"]) == (Kind.RETRIEVING, None)


def test_parse_long_ok_cases_are_not_all_alike() -> None:
    """The cases above reach every verdict (the agreement is not vacuous)."""
    seen = {verdict(parse_ok, JSON, raw)[0] for raw in LONG_CASES.values()}
    assert {Kind.COMPLETED, Kind.RETRIEVING, "bad"} <= seen
    labels = {verdict(parse_ok, JSON, raw) for raw in LONG_CASES.values()}
    assert {("bad", "bad_json"), ("bad", "bad_shape"), ("bad", "unknown_status")} <= labels


@given(
    texts=st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=60), min_size=7),
    where=st.floats(0, 1),
    fault=st.binary(min_size=1, max_size=3),
    drop=st.integers(0, 3),
)
def test_parse_long_ok_agrees_after_any_byte_fault(
    texts: list[str], where: float, fault: bytes, drop: int
) -> None:
    """Any text, then any few bytes put in place of others anywhere in the body: both
    parsers reach the same verdict."""
    names = ("query", "html", "prompt", "completion", "sources", "ads", "x")
    fields = dict(zip(names, texts, strict=False))  # the texts past the names are unused
    fields["html"] = LONG + fields["html"]
    raw = long_body(**fields)
    at = int(where * (len(raw) - 1))
    raw = raw[:at] + fault + raw[at + drop :]
    assert verdict(parse_long_ok, JSON, raw) == verdict(parse_ok, JSON, raw)


# -- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("0.05", 0.05),
        (" 12 ", 12.0),
        ("-5", 0.0),
        ("-0.5", 0.0),
        ("100000", 300.0),
        ("1e9", 300.0),
    ],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    """Seconds (whole or decimal) are read, negatives become 0 and the cap applies."""
    assert parse_retry_after(value, 300.0) == pytest.approx(expected)


@pytest.mark.parametrize("value", [None, "", "soon", "5s", "nan", "Mon, 99 Foo 2024", "1,5"])
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    """Missing or unreadable values (and NaN) give None."""
    assert parse_retry_after(value, 300.0) is None


def test_parse_retry_after_http_date_future() -> None:
    """An HTTP date in the future gives the seconds until it."""
    when = datetime.now(UTC) + timedelta(seconds=60)
    wait = parse_retry_after(format_datetime(when, usegmt=True), 300.0)
    assert wait is not None
    assert 55.0 <= wait <= 61.0


def test_parse_retry_after_http_date_future_capped() -> None:
    """A far-future HTTP date is capped."""
    when = datetime.now(UTC) + timedelta(days=2)
    assert parse_retry_after(format_datetime(when, usegmt=True), 30.0) == 30.0


@pytest.mark.parametrize(
    "value", ["Wed, 21 Oct 2015 07:28:00 GMT", "Sun, 06 Nov 1994 08:49:37 GMT"]
)
def test_parse_retry_after_http_date_past(value: str) -> None:
    """An HTTP date in the past means no wait."""
    assert parse_retry_after(value, 300.0) == 0.0


@given(value=st.text(max_size=60), cap=st.floats(0.0, 1000.0))
def test_parse_retry_after_never_raises(value: str, cap: float) -> None:
    """Any header text gives None or a wait between 0 and the cap."""
    wait = parse_retry_after(value, cap)
    assert wait is None or 0.0 <= wait <= cap


# -- CompletionsClient over loopback ----------------------------------------------------------


@asynccontextmanager
async def client_for(
    endpoint: str,
    *,
    max_body: int = CAP,
    request_timeout: float = 5.0,
) -> AsyncIterator[CompletionsClient]:
    """A ``CompletionsClient`` on the transport the test is parametrized with: harvester's
    own (``http1``) or a real session from ``make_session`` (``aiohttp``)."""
    transport: Http1Transport | aiohttp.ClientSession
    if _TRANSPORT[0] == "aiohttp":
        transport = make_session(
            TOKEN, limit=4, connect_timeout=2.0, request_timeout=request_timeout
        )
    else:
        transport = Http1Transport(
            endpoint,
            token=TOKEN,
            max_body_bytes=max_body,
            connect_timeout=2.0,
            request_timeout=request_timeout,
        )
    try:
        yield CompletionsClient(
            transport,
            endpoint,
            token=TOKEN,
            max_body_bytes=max_body,
            retry_after_max=300.0,
        )
    finally:
        await transport.close()


# Every loopback test of the client (test_client_*) runs once on each transport: both must
# give the same outcomes and error labels.
_TRANSPORT = ["http1"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the loopback client tests over both transports."""
    if metafunc.function.__name__.startswith("test_client_"):
        metafunc.parametrize("transport_kind", ["http1", "aiohttp"], indirect=True)


@pytest.fixture(autouse=True)
def transport_kind(request: pytest.FixtureRequest) -> str:
    """The transport ``client_for`` uses in this test."""
    kind: str = getattr(request, "param", "http1")
    _TRANSPORT[0] = kind
    return kind


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler`` at /ai/completions on loopback; yield the endpoint URL."""
    app = web.Application()
    app.router.add_get("/ai/completions", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/ai/completions"))
    finally:
        await server.close()


@asynccontextmanager
async def api(handler: Handler, **kwargs: Any) -> AsyncIterator[CompletionsClient]:
    """A client talking to ``handler`` over loopback."""
    async with serving(handler) as endpoint, client_for(endpoint, **kwargs) as client:
        yield client


def answer(status: int, data: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    """A handler that always answers ``status`` with ``data`` and ``headers``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        """Answer the fixed response."""
        return web.Response(status=status, body=data, headers=headers)

    return handle


async def test_client_200_completion() -> None:
    """A 200 JSON Completion comes back as COMPLETED with the document."""
    async with api(answer(200, body(completion()), {"Content-Type": JSON})) as client:
        kind, doc = await client.poll(ID)
    assert kind is Kind.COMPLETED
    assert doc == {**completion(), "extra": None}


async def test_client_long_answer_gives_the_sink_its_headline_and_line() -> None:
    """A long Completion reaches the sink as its model, extra and one-line JSON (the long
    strings never decoded on the loop); ``poll`` still returns the whole Completion, and a
    long bad answer is refused alike by both."""
    raw = long_body(tag=1) + b"\n"
    async with api(answer(200, raw, {"Content-Type": JSON}), max_body=len(raw)) as client:
        kind, doc, line = await client.poll_answer(ID)
        assert (kind, doc) == (Kind.COMPLETED, {"model": "chatgpt", "extra": '{"tag":1}'})
        assert line is not None
        assert b"\n" not in line
        assert orjson.loads(line) == orjson.loads(raw)
        assert await client.poll(ID) == (
            Kind.COMPLETED,
            {**completion(html=LONG, completion=LONG), "extra": '{"tag":1}'},
        )
    broken = spliced(raw, "€".encode(), b"\xff")
    async with api(answer(200, broken, {"Content-Type": JSON}), max_body=len(raw)) as client:
        with bad("bad_json"):
            await client.poll_answer(ID)
        with bad("bad_json"):
            await client.poll(ID)


async def test_client_200_html_is_bad_response() -> None:
    """A 200 text/html answer is a ``not_json`` bad response."""
    handler = answer(200, b"<html></html>", {"Content-Type": "text/html"})
    async with api(handler) as client:
        with bad("not_json"):
            await client.poll(ID)


@pytest.mark.parametrize(
    ("status", "expected"), [("retrieving", Kind.RETRIEVING), ("failed", Kind.FAILED)]
)
async def test_client_202_status(status: str, expected: Kind) -> None:
    """A 202 status object gives the id's state and no document."""
    handler = answer(202, body({"status": status}), {"Content-Type": JSON})
    async with api(handler) as client:
        assert await client.poll(ID) == (expected, None)


async def test_client_422_is_invalid() -> None:
    """A 422 means the id is invalid."""
    async with api(answer(422, b'{"error": "bad id"}', {"Content-Type": JSON})) as client:
        assert await client.poll(ID) == (Kind.INVALID, None)


async def test_client_sends_auth_accept_and_id() -> None:
    """Each request carries the bearer token, Accept: application/json and the id."""
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        """Record the request."""
        seen.append(request)
        return web.json_response({"status": "retrieving"}, status=202)

    async with api(handle) as client:
        await client.poll(ID)
    [request] = seen
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/json"
    assert request.path == "/ai/completions"
    assert request.query["id"] == ID


_ECHOES = {
    "bare": TOKEN,
    "in_text": f"invalid token {TOKEN}",
    "in_json": orjson.dumps({"error": "no", "token": TOKEN, "auth": f"Bearer {TOKEN}"}).decode(),
    "repeated": f"{TOKEN} {TOKEN} {TOKEN}",
    "past_clip": "x" * 300 + TOKEN,
    "straddling_clip": "x" * 180 + TOKEN,  # the token crosses the 200-char clip of the body
}


def windows(text: str, width: int = 8) -> Iterator[str]:
    """Every substring of ``text`` of ``width`` characters."""
    for start in range(len(text) - width + 1):
        yield text[start : start + width]


@pytest.mark.parametrize("status", [401, 402, 403])
@pytest.mark.parametrize("echo", sorted(_ECHOES))
async def test_client_fatal_never_shows_the_token(status: int, echo: str) -> None:
    """401/402/403 raise ``FatalApiError``; the message holds no 8-char piece of the token."""
    text = _ECHOES[echo]
    async with api(answer(status, text.encode(), {"Content-Type": "text/plain"})) as client:
        with pytest.raises(FatalApiError) as info:
            await client.poll(ID)
    assert info.value.status == status
    message = str(info.value)
    assert f"HTTP {status}" in message
    leaked = [piece for piece in windows(TOKEN) if piece in message]
    assert not leaked, f"token fragments in the message: {leaked}"


@pytest.mark.parametrize("status", [429, 503])
async def test_client_throttled_with_retry_after(status: int) -> None:
    """429/503 raise ``ThrottledError`` with the Retry-After wait."""
    async with api(answer(status, b"slow down", {"Retry-After": "7"})) as client:
        with pytest.raises(ThrottledError) as info:
            await client.poll(ID)
    assert info.value.retry_after == 7.0
    assert info.value.status == status
    assert info.value.label == f"http_{status}"


async def test_client_throttled_without_retry_after() -> None:
    """A 429 without Retry-After has no wait of its own."""
    async with api(answer(429)) as client:
        with pytest.raises(ThrottledError) as info:
            await client.poll(ID)
    assert info.value.retry_after is None


async def test_client_throttled_retry_after_capped() -> None:
    """A huge Retry-After is capped at ``retry_after_max``."""
    async with api(answer(429, b"", {"Retry-After": "86400"})) as client:
        with pytest.raises(ThrottledError) as info:
            await client.poll(ID)
    assert info.value.retry_after == 300.0


@pytest.mark.parametrize("status", [500, 502, 504, 404, 418, 301, 400])
async def test_client_other_statuses_are_server_errors(status: int) -> None:
    """Other statuses (redirects not followed) raise ``ServerError`` of kind ``http_<code>``."""
    headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 301 else None
    async with api(answer(status, b"oops", headers)) as client:
        with pytest.raises(ServerError) as info:
            await client.poll(ID)
    assert info.value.label == f"http_{status}"
    assert info.value.status == status
    assert isinstance(info.value, TransientError)


async def test_client_body_at_cap_is_read() -> None:
    """A body of exactly ``max_body_bytes`` is still read."""
    async with api(answer(422, b"x" * CAP)) as client:
        assert await client.poll(ID) == (Kind.INVALID, None)


async def test_client_too_large_with_content_length() -> None:
    """A Content-Length over the cap is ``too_large``, before the body is read."""
    data = body(completion(html="x" * CAP))
    async with api(answer(200, data, {"Content-Type": JSON})) as client:
        with bad("too_large"):
            await client.poll(ID)


async def test_client_too_large_chunked() -> None:
    """A chunked body that grows past the cap is ``too_large``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        """Stream 8 chunks of 1 KiB without a Content-Length."""
        response = web.StreamResponse(status=200, headers={"Content-Type": JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(8):
            await response.write(b" " * 1024)
        await response.write_eof()
        return response

    async with api(handle) as client:
        with bad("too_large"):
            await client.poll(ID)


async def test_client_chunked_under_cap_is_read() -> None:
    """A chunked body under the cap is read whole."""
    data = body(completion())

    async def handle(request: web.Request) -> web.StreamResponse:
        """Stream the completion in two chunks."""
        response = web.StreamResponse(status=200, headers={"Content-Type": JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(data[:10])
        await response.write(data[10:])
        await response.write_eof()
        return response

    async with api(handle) as client:
        assert await client.poll(ID) == (Kind.COMPLETED, {**completion(), "extra": None})


async def test_client_too_large_when_compressed() -> None:
    """A gzip body under the cap that inflates past it is still ``too_large``."""
    data = gzip.compress(body(completion(html="x" * (20 * CAP))))
    assert len(data) < CAP
    headers = {"Content-Type": JSON, "Content-Encoding": "gzip"}
    async with api(answer(200, data, headers)) as client:
        with bad("too_large"):
            await client.poll(ID)


@asynccontextmanager
async def raw_server(reply: bytes) -> AsyncIterator[str]:
    """A TCP server that reads a request head, writes ``reply`` and closes; yields an endpoint."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the request head, answer, hang up."""
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/ai/completions"
    finally:
        server.close()
        await server.wait_closed()


async def test_client_server_closes_connection() -> None:
    """A server that hangs up without answering is a ``TransportError``."""
    async with raw_server(b"") as endpoint, client_for(endpoint) as client:
        with pytest.raises(TransportError) as info:
            await client.poll(ID)
    assert info.value.label == "disconnected"


async def test_client_server_closes_mid_body() -> None:
    """A body cut short of its Content-Length is a transient ``truncated_body`` error."""
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
        b'Connection: close\r\n\r\n{"model": "chat'
    )
    async with raw_server(reply) as endpoint, client_for(endpoint) as client:
        with bad("truncated_body"):
            await client.poll(ID)


async def test_client_connection_refused() -> None:
    """Nothing listening is a ``connect_error``."""
    endpoint = f"http://127.0.0.1:{free_port()}/ai/completions"
    async with client_for(endpoint) as client:
        with pytest.raises(TransportError) as info:
            await client.poll(ID)
    assert info.value.label == "connect_error"


async def test_client_read_timeout() -> None:
    """A server slower than ``request_timeout`` is a ``timeout`` transport error."""
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        """Answer only when the test lets go (or after 5 s)."""
        with suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 5.0)
        return web.json_response({"status": "retrieving"}, status=202)

    async with serving(handle) as endpoint:
        try:
            async with client_for(endpoint, request_timeout=0.2) as client:
                started = time.monotonic()
                with pytest.raises(TransportError) as info:
                    await client.poll(ID)
                assert time.monotonic() - started < 2.0
        finally:
            release.set()
    assert info.value.label == "timeout"


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",  # overflows datetime
        "Tue, 31 Feb 2026 00:00:00 GMT",
        "not a date at all",
    ],
)
def test_retry_after_hostile_dates_are_ignored(value: str) -> None:
    """A Retry-After no calendar can hold is ignored, never a crash."""
    assert parse_retry_after(value, 300.0) is None


def test_retry_after_minus_zero_zone_is_gmt() -> None:
    """An HTTP date with a '-0000' zone means GMT, not the machine's local time."""
    when = time.time() + 30
    value = time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(when))
    wait = parse_retry_after(value, 300.0)
    assert wait is not None
    assert 25 < wait <= 31


def test_extras_nested_too_deep_are_a_bad_answer() -> None:
    """A field nested past what can be stored is retried as bad_shape, not a crash at write."""
    nested = b"[" * 400 + b'"x"' + b"]" * 400  # orjson reads 1024 levels, writes 254
    raw = body(completion())[:-1] + b', "deep": ' + nested + b"}"
    with bad("bad_shape"):
        parse_ok(JSON, raw)


def test_extras_are_kept_as_json() -> None:
    """Fields beyond the spec travel to the sink as one JSON object."""
    _, doc = parse_ok(JSON, body({**completion(), "new_field": {"a": 1}}))
    assert doc is not None
    assert orjson.loads(doc["extra"] or "") == {"new_field": {"a": 1}}
