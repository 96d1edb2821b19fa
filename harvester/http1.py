"""The poll transport: HTTP/1.1 keep-alive GETs, one request a connection at a time, parsed
by llhttp (``httptools``, the parser uvicorn runs on).

Why not aiohttp's ``ClientSession`` for polls: its general request path (URL and header
objects, cookie and redirect handling, trace hooks, a response object a request) costs about
100 us of CPU a request here, against about 15 us for a connection that writes one request
built from two fixed byte strings and the id, and parses the answer in C
(``benchmarks/throughput.py``). A poll is always the same GET, so none of that generality is
needed. aiohttp stays the transport for an injected session (tests) and ``--transport aiohttp``.

Every failure is raised as the package's error family, with the labels the aiohttp path uses.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import zlib
from typing import NamedTuple

import httptools
from yarl import URL

from . import __version__
from .errors import BadResponseError, TlsError, TransportError


class Reply(NamedTuple):
    """What a poll got back: the status, the two headers read, and the (decoded) body."""

    status: int
    content_type: str
    retry_after: str | None
    body: bytes


class _Done(Exception):
    """Raised inside a parser callback to stop parsing: the request has failed already."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill in the answer being read."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.open = False  # connected and fit for another request
        self._waiter: asyncio.Future[Reply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._content_type = b""
        self._retry_after: bytes | None = None
        self._encoding = b""
        self._length: int | None = None
        self._chunked = False
        self._headers_done = False
        self._keep_alive = True
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and self._length is None and not self._chunked:
            self._finish()  # the body runs to the end of the connection (HTTP/1.0 style)
        elif self._headers_done:
            self._fail(BadResponseError("truncated_body", "body ended early"))
        else:
            self._fail(TransportError("disconnected", "connection dropped"))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # nothing was asked: a server talking out of turn is not reused
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Done):
                self._fail(BadResponseError("bad_answer", "unusable answer"))
        except httptools.HttpParserError:
            self._fail(BadResponseError("bad_answer", "not an HTTP answer"))

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self._content_type = value
        elif name == b"content-length":
            self._length = int(value) if value.strip().isdigit() else None
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()
        elif name == b"content-encoding":
            self._encoding = value.strip().lower()
        elif name == b"retry-after":
            self._retry_after = value

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        if self._length is not None and self._length > self._max_body:
            self._fail(BadResponseError("too_large", f"body of {self._length} bytes over the cap"))
            raise _Done

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_body:
            self._fail(BadResponseError("too_large", f"body over the {self._max_body}-byte cap"))
            raise _Done
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            return  # an interim answer (100 Continue, 103): the real one follows
        self._finish()

    # -- one request ----------------------------------------------------------------------

    def request(self, data: bytes, timeout: float) -> asyncio.Future[Reply]:
        """Send ``data``; the future gets the answer, or fails with a ``TransientError``."""
        assert self.transport is not None
        assert self._waiter is None
        self._reset()  # the last answer's state must not speak for this one
        waiter = self._waiter = self._loop.create_future()
        self._timer = self._loop.call_later(timeout, self._time_out)
        self.transport.write(data)
        return waiter

    def _time_out(self) -> None:
        self._timer = None
        self._fail(TransportError("timeout", "request timed out"))

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        try:
            body = self._decoded(body)
        except BadResponseError as exc:
            self._fail(exc)
            return
        self._settle()
        if not self._keep_alive:
            self.close()
        if not waiter.done():
            waiter.set_result(
                Reply(
                    self._status,
                    self._content_type.decode("latin-1"),
                    None if self._retry_after is None else self._retry_after.decode("latin-1"),
                    body,
                )
            )

    def _decoded(self, body: bytes) -> bytes:
        """The body after its Content-Encoding, held to the cap as it inflates."""
        encoding = self._encoding
        if not encoding or encoding == b"identity":
            return body
        if encoding in (b"gzip", b"x-gzip"):
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif encoding == b"deflate":
            # RFC 9110's deflate is zlib-wrapped; some servers send it raw.
            raw = len(body) < 2 or (body[0] * 256 + body[1]) % 31 != 0
            inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        else:
            raise BadResponseError("bad_encoding", "a Content-Encoding that was not asked for")
        try:
            out = inflater.decompress(body, self._max_body + 1)
        except zlib.error as exc:
            raise BadResponseError("truncated_body", "compressed body is corrupt") from exc
        if len(out) > self._max_body:
            raise BadResponseError("too_large", f"body over the {self._max_body}-byte cap")
        if not inflater.eof:
            raise BadResponseError("truncated_body", "compressed body ended early")
        return out

    def _fail(self, exc: Exception) -> None:
        """The request failed: the connection is in an unknown state, so it is closed."""
        waiter = self._waiter
        self._settle()
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _settle(self) -> None:
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Close now; any request on it fails as dropped."""
        self.open = False
        if self.transport is not None:
            self.transport.abort()


class Http1Transport:
    """Polls ``endpoint?id=...`` over a pool of keep-alive connections (at most one request
    on each at a time; as many connections as requests in flight, so the caller's
    concurrency cap is the connection cap)."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str,
        max_body_bytes: int,
        connect_timeout: float,
        request_timeout: float,
    ) -> None:
        url = URL(endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"cannot poll {endpoint!r}: need an http:// or https:// URL")
        self.endpoint = endpoint
        self._host = url.raw_host or url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        # Verified with the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR are honoured).
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        host_header = url.raw_host if url.is_default_port() else f"{url.raw_host}:{url.port}"
        if url.raw_host and ":" in url.raw_host:  # an IPv6 literal
            host_header = f"[{url.raw_host}]" + ("" if url.is_default_port() else f":{url.port}")
        # Each request is these two byte strings with the id between them: nothing is built
        # a request but the id's bytes. (The token was checked to have no spaces or controls.)
        self._head = f"GET {url.raw_path}?id=".encode("ascii")
        self._tail = (
            f" HTTP/1.1\r\nHost: {host_header}\r\nAuthorization: Bearer {token}\r\n"
            f"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
            f"User-Agent: harvester/{__version__}\r\n\r\n"
        ).encode("latin-1")
        self._max_body = max_body_bytes
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def fetch(self, conversation_id: str) -> Reply:
        """One poll of ``conversation_id`` (a canonical uuid: it needs no quoting)."""
        idle = self._idle
        conn = idle.pop() if idle else None
        while conn is not None and not conn.open:
            self._all.discard(conn)
            conn = idle.pop() if idle else None
        if conn is None:
            conn = await self._connect()
        try:
            reply = await conn.request(
                self._head + conversation_id.encode("ascii") + self._tail, self._request_timeout
            )
        except BaseException:
            # Failed or cancelled mid-request: the connection's state is unknown; never reused.
            conn.close()
            self._all.discard(conn)
            raise
        if conn.open:
            idle.append(conn)
        else:
            self._all.discard(conn)
        return reply

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self._max_body)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise TransportError("timeout", "connect timeout") from exc
        except ssl.SSLError as exc:  # SSLCertVerificationError among them
            raise TlsError(
                f"TLS verification failed for {self._host} ({exc}); fix the server's "
                "certificate, or point SSL_CERT_FILE at the CA that signed it"
            ) from exc
        except OSError as exc:
            raise TransportError("connect_error", os_cause(self._host, exc)) from exc
        self._all.add(conn)
        return conn

    async def close(self) -> None:
        """Close every connection (call once the polls are over)."""
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()


_REFUSED_TEXT = f"[Errno {errno.ECONNREFUSED}]"


def os_cause(host: str, cause: OSError) -> str:
    """Why a connection could not be made, in words a user acts on: refused, DNS, timeout."""
    if isinstance(cause, socket.gaierror):
        return f"DNS lookup of {host} failed ({cause.strerror or cause})"
    # Every address of a name refused (localhost: ::1 and 127.0.0.1) is one OSError whose
    # text lists each address's errno: asyncio keeps no error object per address.
    if isinstance(cause, ConnectionRefusedError) or _REFUSED_TEXT in str(cause):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return "connect timeout"
    return f"cannot connect ({cause.strerror or cause})"
