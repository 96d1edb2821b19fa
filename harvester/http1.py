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

import aiohappyeyeballs
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


# Headers beyond this are refused: aiohttp caps a header line at 8 KiB; without a cap a
# server could send one endless header until the request timeout, held in memory.
MAX_HEADER_BYTES = 64 * 1024
# Seconds before the next address of a host is tried alongside (RFC 8305, as aiohttp does):
# a host whose IPv6 address is unreachable still connects over IPv4 at once.
HAPPY_EYEBALLS_DELAY = 0.25


class _Done(Exception):
    """Raised inside a parser callback to stop parsing: the request has failed already."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill in the answer being read."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        # Bare LF line ends, as aiohttp accepts them.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
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
        self._encodings: list[bytes] = []  # Content-Encoding, in the order applied
        self._length: int | None = None
        self._chunked = False
        self._headers_done = False
        self._keep_alive = True
        self._body: list[bytes] = []
        self._size = 0
        self._head_bytes = 0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def eof_received(self) -> bool:
        self.open = False  # the server is done with it: not picked from the pool again
        return False  # close our side too (then connection_lost reads what came)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and self._length is None and not self._chunked and exc is None:
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
        except httptools.HttpParserUpgrade:
            self._fail(BadResponseError("bad_answer", "the server switched protocols"))
        except httptools.HttpParserError:
            self._fail(BadResponseError("bad_answer", "not an HTTP answer"))
            return
        if not self._headers_done and self._waiter is not None:
            # Still in the headers after all of this read (a read that completes them may
            # carry any size of body): count what they have taken so far.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._fail(BadResponseError("too_large", "headers over 64 KiB"))

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer after the one asked for (a server answering twice, or a stale
            # answer mis-framed): the connection is mid-message, so it can never be reused.
            self.close()
            raise _Done
        self._reset()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer field: it may not change how the body reads
        name = name.lower()
        if name == b"content-type":
            self._content_type = value
        elif name == b"content-length":
            self._length = int(value) if value.strip().isdigit() else None
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()
        elif name == b"content-encoding":
            coding = (c.strip() for c in value.lower().split(b","))
            self._encodings += [c for c in coding if c and c != b"identity"]
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
            # An interim answer (100 Continue, 103): the real one follows, headers and all.
            self._headers_done = False
            self._head_bytes = 0
            return
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
        self._body = []  # an idle connection holds no copy of the last answer
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
        """The body after its Content-Encoding(s), held to the cap as it inflates."""
        if not body:
            return body  # an empty body needs no decoding, whatever it says (a 429, a 204)
        for encoding in reversed(self._encodings):
            body = self._inflate(encoding, body)
        return body

    def _inflate(self, encoding: bytes, data: bytes) -> bytes:
        if encoding in (b"gzip", b"x-gzip"):
            wbits = 16 + zlib.MAX_WBITS
        elif encoding == b"deflate":
            # RFC 9110's deflate is zlib-wrapped; some servers send it raw. A zlib header is
            # CM 8 with a window of at most 32 KiB and a check making the first two bytes a
            # multiple of 31 (raw data passes the last test alone about 1 time in 31).
            zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and data[0] >> 4 <= 7
            wrapped = zlib_header and (data[0] * 256 + data[1]) % 31 == 0
            wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
        else:
            raise BadResponseError("bad_encoding", "a Content-Encoding that was not asked for")
        cap = self._max_body
        out: list[bytes] = []
        size = 0
        while data:  # gzip may hold several members, one after another
            inflater = zlib.decompressobj(wbits=wbits)
            try:
                piece = inflater.decompress(data, cap + 1 - size)
            except zlib.error as exc:
                raise BadResponseError("truncated_body", "compressed body is corrupt") from exc
            size += len(piece)
            if size > cap:
                raise BadResponseError("too_large", f"body over the {cap}-byte cap")
            if not inflater.eof:
                raise BadResponseError("truncated_body", "compressed body ended early")
            out.append(piece)
            data = inflater.unused_data if wbits > zlib.MAX_WBITS else b""
        return b"".join(out)

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

    def abandon(self) -> None:
        """The request was cancelled: stop its timer and close (its answer is never read)."""
        self._settle()
        self.close()

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
        self._closed = False

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
            conn.abandon()
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
                infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
                sock = await aiohappyeyeballs.start_connection(
                    infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
                )
                try:
                    await loop.create_connection(
                        lambda: conn,
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError as exc:
            raise TransportError("timeout", "connect timeout") from exc
        except ssl.SSLCertVerificationError as exc:
            raise tls_error(self._host, exc.verify_message or exc) from exc
        except ssl.SSLError as exc:
            # Not the certificate: a handshake refused or garbled (a plain-http port, a busy
            # balancer). Retried like any failed connection; exit 5 if it never answers.
            raise TransportError(
                "connect_error", f"TLS handshake failed ({exc.reason or exc})"
            ) from exc
        except OSError as exc:
            raise TransportError("connect_error", os_cause(self._host, exc)) from exc
        if self._closed:
            conn.close()
            raise TransportError("disconnected", "the transport was closed")
        self._all.add(conn)
        return conn

    async def close(self) -> None:
        """Close every connection (call once the polls are over)."""
        self._closed = True
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()


def tls_error(host: str, detail: object) -> TlsError:
    """The fatal error of a certificate that fails verification, with what to do about it."""
    return TlsError(
        f"TLS verification failed for {host} ({detail}); fix the server's certificate, "
        "or point SSL_CERT_FILE at the CA that signed it"
    )


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
