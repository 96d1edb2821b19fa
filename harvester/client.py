"""The API boundary: one ``GET /ai/completions?id=`` (or the newer ``/ai?id=``) and what
its answer means. Both endpoints are read alike: a status object means the same in a 202 as
in the newer form's 200 (``model.STATUS_KINDS``), so only the path differs.

Every aiohttp exception and every unusable answer is converted here into the package's
error families (``raise ... from exc``), so the scheduler deals in outcomes, not HTTP.
"""

from __future__ import annotations

import email.utils
import errno
import socket
import time
from datetime import UTC
from typing import Any, cast

import aiohttp
import orjson
from yarl import URL

from .errors import (
    BadResponseError,
    FatalApiError,
    FatalError,
    ServerError,
    ThrottledError,
    TlsError,
    TransientError,
    TransportError,
)
from .model import (
    EXTRA_FIELD,
    KNOWN_FIELDS,
    STATUS_KINDS,
    TARGETING_FIELDS,
    TEXT_FIELDS,
    Completion,
    Kind,
)
from .prepared import BIG_BODY_BYTES, BigDecoder

_FATAL_HINTS = {
    401: "the API got no token: set MASSIVE_API_TOKEN (or --token-file)",
    402: "the account is out of credit: top it up, then rerun the same command",
    403: "the API rejected the token: check MASSIVE_API_TOKEN",
}


def make_session(
    token: str, *, limit: int, connect_timeout: float, request_timeout: float
) -> aiohttp.ClientSession:
    """A session with auth and JSON headers set once, not per request; call inside the loop.

    Tuned for one API and many small requests (measured in ``benchmarks/throughput.py``): no
    cookie jar (the API sets none, and a real jar filters cookies on every request), and one
    timer a request (``total``) rather than a read timer re-armed on every chunk received.
    """
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        raise_for_status=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    # aiohttp resends a GET once, by itself, when a kept-alive connection drops before the
    # answer: a request the pacer never saw, which could push the server past --rate. The
    # scheduler retries such an id through the pacer instead. (No public switch; aiohttp's
    # own test client sets the same attribute.)
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


class CompletionsClient:
    """Polls one id at a time over an injected session (the caller times each poll)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        *,
        token: str,
        max_body_bytes: int,
        retry_after_max: float = 300.0,
        big_bodies: BigDecoder | None = None,
    ) -> None:
        self._session = session
        self._big = big_bodies  # decodes big 200 answers off the loop (bigbody.py)
        self.endpoint = endpoint  # the URL polled, for messages
        self._prefix = endpoint + "?id="
        self._token = token
        self._max_body = max_body_bytes
        self._retry_after_max = retry_after_max

    async def poll(self, conversation_id: str) -> tuple[Kind, Completion | None]:
        """Ask once for ``conversation_id``; raise a ``TransientError`` or ``FatalApiError``."""
        # The id is a canonical uuid (validated upstream), so the URL needs no quoting.
        url = URL(self._prefix + conversation_id, encoded=True)
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                body = await self._read_body(resp)
                status, headers = resp.status, resp.headers
        except TransientError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
            raise TransportError("timeout", "connect timeout") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TransportError("timeout", "request timed out") from exc
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise TlsError(
                f"TLS verification failed for {self._prefix.split('/')[2]} ({exc}); fix the "
                "server's certificate, or point SSL_CERT_FILE at the CA that signed it"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connect_error", connect_cause(exc)) from exc
        except aiohttp.ClientPayloadError as exc:
            raise BadResponseError("truncated_body", "body ended early") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise TransportError("disconnected", "connection dropped") from exc
        except aiohttp.ClientError as exc:
            raise TransportError("client_error", type(exc).__name__) from exc
        try:
            if status == 200 and self._big is not None and len(body) >= BIG_BODY_BYTES:
                kind, row = await self._big.parse_ok(headers.get("Content-Type", ""), body)
                # A Prepared row stands for the Completion: only the sink reads it.
                return kind, cast(Completion | None, row)
            return self._interpret(status, headers, body)
        except (TransientError, FatalError):
            raise
        except Exception as exc:
            raise BadResponseError("bad_answer", f"unusable answer ({type(exc).__name__})") from exc

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        length = resp.content_length
        if length is not None and length > self._max_body:
            raise BadResponseError("too_large", f"body of {length} bytes over the cap")
        if length is not None and "Content-Encoding" not in resp.headers:
            # The common case: the size is known and the body is sent as is, so it cannot
            # grow past the cap; one read, not a chunk loop.
            return await resp.read()
        # Counted as it is read, after decompression: a small gzip body can inflate past
        # the cap, and Content-Length only gives the compressed size.
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                raise BadResponseError("too_large", f"body over the {self._max_body}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)

    def _interpret(self, status: int, headers: Any, body: bytes) -> tuple[Kind, Completion | None]:
        if status == 200:
            return parse_ok(headers.get("Content-Type", ""), body)
        if status == 202:
            return parse_status(body), None
        if status == 422:
            return Kind.INVALID, None
        if status in (429, 503):
            wait = parse_retry_after(headers.get("Retry-After"), self._retry_after_max)
            raise ThrottledError(status, wait)
        if status in _FATAL_HINTS:
            # Redact before clipping: a clip could cut the token so that it no longer matches.
            text = self._redact(body.decode("utf-8", "replace").strip())[:200]
            raise FatalApiError(status, f"HTTP {status} ({text!r}): {_FATAL_HINTS[status]}")
        raise ServerError(status)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


_REFUSED_TEXT = f"[Errno {errno.ECONNREFUSED}]"


def connect_cause(exc: aiohttp.ClientConnectorError) -> str:
    """Why a connection could not be made, in words a user acts on: refused, DNS, timeout."""
    cause = exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        return f"DNS lookup of {exc.host} failed ({cause.strerror or cause})"
    # Every address of a name refused (localhost: ::1 and 127.0.0.1) is one OSError whose
    # text lists each address's errno: asyncio keeps no error object per address.
    if isinstance(cause, ConnectionRefusedError) or _REFUSED_TEXT in str(cause):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return "connect timeout"
    return f"cannot connect ({cause.strerror or cause})"


def parse_ok(content_type: str, body: bytes) -> tuple[Kind, Completion | None]:
    """A 200 answer: a Completion (or, in the API's newer form, a status object)."""
    if "json" not in content_type.lower():
        raise BadResponseError("not_json", f"200 answered with {content_type or 'no type'}")
    doc = _loads(body)
    if "model" not in doc and isinstance(doc.get("status"), str):
        return parse_status_doc(doc), None
    return Kind.COMPLETED, validate_completion(doc)


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
