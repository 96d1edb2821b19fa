"""The API boundary: one ``GET /ai/completions?id=`` (or the newer ``/ai?id=``) and what
its answer means. Both endpoints are read alike: a status object means the same in a 202 as
in the newer form's 200 (``model.STATUS_KINDS``), so only the path differs.

Every aiohttp exception and every unusable answer is converted here into the package's
error families (``raise ... from exc``), so the scheduler deals in outcomes, not HTTP.
"""

from __future__ import annotations

import contextlib
import email.utils
import struct
import time
from collections.abc import Iterator
from datetime import UTC
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import msgspec
import orjson
import pyarrow as pa

from .errors import (
    BadResponseError,
    FatalApiError,
    FatalError,
    ServerError,
    ThrottledError,
    TransientError,
)
from .http1 import Reply
from .model import (
    EXTRA_FIELD,
    KNOWN_FIELDS,
    STATUS_KINDS,
    TARGETING_FIELDS,
    TEXT_FIELDS,
    Completion,
    Headline,
    Kind,
)
from .prepared import BIG_BODY_BYTES, BigDecoder, Prepared

if TYPE_CHECKING:
    from aiohttp import ClientSession

# A 200 body from this size on is checked without decoding its long strings (parse_long_ok):
# orjson would build each as a Python str, ~0.4 ms of the loop's time for a 275 KB page, only
# for the sink to parse the line again in Arrow, off the GIL. Below it, orjson is as quick.
LONG_BODY_BYTES: Final = 32 * 1024
# A text field whose raw JSON is this long or longer is checked as a string token, not decoded.
_LONG_TEXT: Final = 256
_CHECKED_ONLY = frozenset(TEXT_FIELDS) - {"model"}  # the model names the partition: decoded
_QUOTE: Final = ord('"')
_SPACE: Final = frozenset(b" \t\n\r")  # JSON's whitespace
# msgspec cuts the object into its raw values, checking the JSON's syntax (escapes, surrogates,
# control characters) but neither decoding nor allocating a long string.
_SPLIT = msgspec.json.Decoder(dict[str, msgspec.Raw])

_FATAL_HINTS = {
    401: "the API got no token: set MASSIVE_API_TOKEN (or --token-file)",
    402: "the account is out of credit: top it up, then rerun the same command",
    403: "the API rejected the token: check MASSIVE_API_TOKEN",
}


class Transport(Protocol):
    """How a poll's request travels: ``http1.Http1Transport`` (the default) or an aiohttp
    session (``session.SessionTransport``). Either raises only the package's
    ``TransientError``s."""

    async def fetch(self, conversation_id: str) -> Reply:
        """One ``GET endpoint?id=conversation_id``."""
        ...


class CompletionsClient:
    """Polls one id at a time over an injected transport (the caller times each poll); an
    aiohttp session passed instead is wrapped in a ``session.SessionTransport``."""

    def __init__(
        self,
        transport: Transport | ClientSession,
        endpoint: str,
        *,
        token: str,
        max_body_bytes: int,
        retry_after_max: float = 300.0,
        big_bodies: BigDecoder | None = None,
    ) -> None:
        if not hasattr(transport, "fetch"):  # an aiohttp session (imported only then)
            from .session import SessionTransport

            transport = SessionTransport(transport, endpoint, max_body_bytes)
        self._transport = transport
        self._big = big_bodies  # decodes big 200 answers off the loop (bigbody.py)
        self.endpoint = endpoint  # the URL polled, for messages
        self._token = token
        self._retry_after_max = retry_after_max

    async def poll(self, conversation_id: str) -> tuple[Kind, Completion | Prepared | None]:
        """Ask once for ``conversation_id``; raise a ``TransientError`` or ``FatalApiError``.
        A completed id comes back as its whole Completion (or, decoded in the pool from a big
        answer, as a ``Prepared`` row)."""
        reply = await self._transport.fetch(conversation_id)
        with _unusable_is_bad():
            big = await self._big_answer(reply)
            return big if big is not None else self._interpret(reply)

    async def poll_answer(
        self, conversation_id: str
    ) -> tuple[Kind, Headline | Prepared | None, bytes | None]:
        """``poll`` for the sink: for a Completion, what the sink reads of it and the JSON it
        was read from, on one line. The sink stores the text from those bytes
        (``sink._Bodies``), not from Python strings; a long answer's strings are checked,
        never decoded here (``parse_long_ok``). A ``Prepared`` row comes without a line."""
        reply = await self._transport.fetch(conversation_id)
        with _unusable_is_bad():
            big = await self._big_answer(reply)
            if big is not None:
                return (*big, None)
            doc: Headline | None
            if reply.status == 200 and len(reply.body) >= LONG_BODY_BYTES:
                kind, doc = parse_long_ok(reply.content_type, reply.body)
            else:
                kind, doc = self._interpret(reply)
        if doc is None:
            return kind, None, None
        return kind, doc, json_line(reply.body)

    async def _big_answer(self, reply: Reply) -> tuple[Kind, Prepared | None] | None:
        """A big 200 answer decoded in the pool (``bigbody.py``), or None for any other."""
        if reply.status != 200 or self._big is None or len(reply.body) < BIG_BODY_BYTES:
            return None
        return await self._big.parse_ok(reply.content_type, reply.body)

    def _interpret(self, reply: Reply) -> tuple[Kind, Completion | None]:
        status, body = reply.status, reply.body
        if status == 200:
            return parse_ok(reply.content_type, body)
        if status == 202:
            return parse_status(body), None
        if status == 422:
            return Kind.INVALID, None
        if status in (429, 503):
            raise ThrottledError(
                status, parse_retry_after(reply.retry_after, self._retry_after_max)
            )
        if status in _FATAL_HINTS:
            # Redact before clipping: a clip could cut the token so that it no longer matches.
            text = self._redact(body.decode("utf-8", "replace").strip())[:200]
            raise FatalApiError(status, f"HTTP {status} ({text!r}): {_FATAL_HINTS[status]}")
        raise ServerError(status)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def json_line(body: bytes) -> bytes:
    """A validated JSON body on one line, for Arrow's reader (which breaks blocks at CR
    too). In valid JSON a raw CR or LF can only be whitespace between tokens (inside strings
    they are escaped), so blanking them changes no value."""
    if b"\n" in body or b"\r" in body:
        return body.replace(b"\n", b" ").replace(b"\r", b" ")
    return body


def parse_ok(content_type: str, body: bytes) -> tuple[Kind, Completion | None]:
    """A 200 answer: a Completion (or, in the API's newer form, a status object)."""
    if "json" not in content_type.lower():
        raise BadResponseError("not_json", f"200 answered with {content_type or 'no type'}")
    doc = _loads(body)
    if "model" not in doc and isinstance(doc.get("status"), str):
        return parse_status_doc(doc), None
    return Kind.COMPLETED, validate_completion(doc)


def parse_long_ok(content_type: str, body: bytes) -> tuple[Kind, Headline | None]:
    """``parse_ok`` for a long 200 body, to the same verdict for a fraction of the loop's
    time: msgspec cuts the object into raw values; a long text value is checked to be a JSON
    string (msgspec has checked its escapes, ``_utf8`` the body's encoding), every other
    value is decoded by orjson as ``parse_ok`` decodes it, at the same depth. Whatever is not
    so plain is left to ``parse_ok``: not JSON, not UTF-8, not an object, nested past
    msgspec's depth, or not compact (a key sent twice, whose first value msgspec drops
    unseen, shows as bytes the members do not account for; so do spaces and escaped keys)."""
    if "json" not in content_type.lower() or not _utf8(body):
        return parse_ok(content_type, body)
    try:
        raw = _SPLIT.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError (not an object) is one
        return parse_ok(content_type, body)
    doc: dict[str, Any] = {}
    # '{' and '}', then each member's key, ':' and value, and a ',' between two members.
    accounted = 1 + len(raw)
    try:
        for name, value in raw.items():
            view = memoryview(value)
            accounted += len(orjson.dumps(name)) + 1 + len(view)
            if name in _CHECKED_ONLY and len(view) >= _LONG_TEXT and view[0] == _QUOTE:
                doc[name] = ""  # a string: the sink reads its value from the line
            else:
                # In brackets, so that orjson's depth limit counts as in the whole body.
                doc[name] = orjson.loads(b"[" + view + b"]")[0]
    except orjson.JSONDecodeError:
        return parse_ok(content_type, body)
    if accounted != _stripped_length(body):
        return parse_ok(content_type, body)
    if "model" not in doc and isinstance(doc.get("status"), str):
        return parse_status_doc(doc), None
    completion = validate_completion(doc)
    return Kind.COMPLETED, Headline(model=completion["model"], extra=completion["extra"])


def _stripped_length(body: bytes) -> int:
    """``len(body.strip(JSON whitespace))``, without copying the body."""
    start, end = 0, len(body)
    while start < end and body[start] in _SPACE:
        start += 1
    while end > start and body[end - 1] in _SPACE:
        end -= 1
    return end - start


def _utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8, checked by Arrow (strictly, as orjson checks it: no overlong
    forms, no surrogates) without building a ``str``: ~40 us for 275 KB."""
    if data.isascii():
        return True
    offsets = pa.py_buffer(struct.pack("<qq", 0, len(data)))
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


@contextlib.contextmanager
def _unusable_is_bad() -> Iterator[None]:
    """Any other exception while reading an answer makes it a bad answer, retried: a hostile
    body must never crash the run."""
    try:
        yield
    except (TransientError, FatalError):
        raise
    except Exception as exc:
        raise BadResponseError("bad_answer", f"unusable answer ({type(exc).__name__})") from exc


def parse_status(body: bytes) -> Kind:
    """A 202 answer: ``{"status": "retrieving" | "failed"}`` (any status of STATUS_KINDS)."""
    return parse_status_doc(_loads(body))


def parse_status_doc(doc: dict[str, Any]) -> Kind:
    """Map a status object to what it means for the id (``model.STATUS_KINDS``)."""
    status = doc.get("status")
    kind = STATUS_KINDS.get(status) if isinstance(status, str) else None
    if kind is None:
        # The value itself is not shown: a hostile server could echo anything there.
        raise BadResponseError("unknown_status", f"status is none of {', '.join(STATUS_KINDS)}")
    return kind


def validate_completion(doc: dict[str, Any]) -> Completion:
    """Check the answer's types and return it as a Completion; a wrong shape is retried,
    never stored. Values are not judged: a complete answer is the server's last word on
    the id (an empty or unknown model included) and is stored as sent."""
    for name in TEXT_FIELDS:
        if not isinstance(doc.get(name), str):
            raise BadResponseError("bad_shape", f"field {name!r} missing or not a string")
    fanouts = doc.get("fanouts")
    if fanouts is None:
        fanouts = []  # some models expose no fanouts; null and absent mean none
    elif not isinstance(fanouts, list) or not all(isinstance(f, str) for f in fanouts):
        raise BadResponseError("bad_shape", "field 'fanouts' is not a list of strings")
    for name in TARGETING_FIELDS:
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise BadResponseError("bad_shape", f"field {name!r} is not a string or null")
    row: dict[str, Any] = {name: doc[name] for name in TEXT_FIELDS}
    row["fanouts"] = fanouts
    for name in TARGETING_FIELDS:
        row[name] = doc.get(name)
    row[EXTRA_FIELD] = extras_json(doc)
    return cast(Completion, row)


def extras_json(doc: dict[str, Any]) -> str | None:
    """Fields beyond the spec as one JSON object (None when there are none), made here so
    that one the sink cannot store is a bad answer to retry, not a crash at write time."""
    extras = {k: v for k, v in doc.items() if k not in KNOWN_FIELDS}
    if not extras:
        return None
    try:
        return orjson.dumps(extras).decode()
    except TypeError as exc:  # nested past orjson's depth limit, say
        raise BadResponseError("bad_shape", "fields beyond the spec cannot be stored") from exc


def _loads(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadResponseError("bad_json", "body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise BadResponseError("bad_shape", "body is not a JSON object")
    return doc


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a Retry-After header: seconds (decimals accepted) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000" parses naive: HTTP dates are always GMT
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)
