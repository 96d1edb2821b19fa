"""The lean poll transport (``http1.Http1Transport``) against a raw TCP server that answers
exactly the bytes each test gives: keep-alive, framing, encodings, and every way it breaks.

The outcomes shared with the aiohttp transport (statuses, caps, timeouts, drops) are tested
on both in ``test_client_parsing.py``; these are what only a hand-held connection can get wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from harvester.errors import BadResponseError, TransportError
from harvester.http1 import Http1Transport

ID = "0b3c51a8-5f8e-4d9c-9b0e-3f8d2a6c1e47"
OK = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 25\r\n\r\n"
    b'{"status": "retrieving"}\n'
)


@dataclass
class RawServer:
    """Counts connections and keeps every request head; ``answer`` makes each reply."""

    answer: Callable[[int], bytes]
    close_after: bool = False
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    endpoint: str = ""


@asynccontextmanager
async def raw(
    answer: Callable[[int], bytes] | bytes, *, close_after: bool = False
) -> AsyncIterator[RawServer]:
    """Serve on loopback; each request head read gets ``answer(n)`` (n counts requests)."""
    state = RawServer(answer if callable(answer) else (lambda _n: answer), close_after)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                state.heads.append(head)
                writer.write(state.answer(len(state.heads)))
                await writer.drain()
                if state.close_after:
                    return
        finally:
            writer.close()

    async with listening(handle) as port:
        state.endpoint = f"http://127.0.0.1:{port}/ai/completions"
        yield state


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def listening(handle: Handler) -> AsyncIterator[int]:
    """A TCP server on loopback running ``handle`` for each connection; yields its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def transport(endpoint: str, **kwargs: float) -> Http1Transport:
    """A transport with short timeouts and a 64 KiB cap."""
    options = {"connect_timeout": 2.0, "request_timeout": 2.0, **kwargs}
    return Http1Transport(endpoint, token="tok", max_body_bytes=64 * 1024, **options)


@asynccontextmanager
async def raw_answer(answer: bytes) -> AsyncIterator[Http1Transport]:
    """A transport to a server answering ``answer`` to every request."""
    async with raw(answer) as server:
        http = transport(server.endpoint)
        try:
            yield http
        finally:
            await http.close()


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    """An HTTP/1.1 answer with ``body`` and its Content-Length."""
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_one_connection_carries_many_polls() -> None:
    """Sequential polls reuse one kept-alive connection; each request is the exact GET."""
    async with raw(OK) as server:
        http = transport(server.endpoint)
        try:
            for _ in range(20):
                answer = await http.fetch(ID)
                assert answer.status == 202
                assert answer.body == b'{"status": "retrieving"}\n'
        finally:
            await http.close()
    assert server.connections == 1
    head = server.heads[0].decode()
    port = server.endpoint.split(":")[2].split("/")[0]
    assert head.startswith(f"GET /ai/completions?id={ID} HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in head
    assert "\r\nAuthorization: Bearer tok\r\n" in head
    assert "\r\nAccept: application/json\r\n" in head
    assert "\r\nAccept-Encoding: gzip, deflate\r\n" in head
    assert "\r\nUser-Agent: harvester" in head


async def test_concurrent_polls_open_one_connection_each() -> None:
    """Requests in flight at once never share a connection; afterwards they are reused."""
    async with raw(OK) as server:
        http = transport(server.endpoint)
        try:
            await asyncio.gather(*(http.fetch(ID) for _ in range(8)))
            await asyncio.gather(*(http.fetch(ID) for _ in range(8)))
        finally:
            await http.close()
    assert server.connections == 8
    assert len(server.heads) == 16


async def test_connection_close_is_honoured() -> None:
    """``Connection: close`` ends the connection after the answer; the next poll reconnects."""
    answer = reply(b'{"status": "retrieving"}', "Connection: close", status="202 Accepted")
    async with raw(answer, close_after=True) as server:
        http = transport(server.endpoint)
        try:
            for _ in range(3):
                assert (await http.fetch(ID)).status == 202
        finally:
            await http.close()
    assert server.connections == 3


async def test_server_hangs_up_an_idle_connection() -> None:
    """A kept-alive connection the server closed while idle is skipped, not failed on."""
    async with raw(OK, close_after=True) as server:  # no Connection: close, but it hangs up
        http = transport(server.endpoint)
        try:
            assert (await http.fetch(ID)).status == 202
            await asyncio.sleep(0.1)  # the close reaches the client
            assert (await http.fetch(ID)).status == 202
        finally:
            await http.close()
    assert server.connections == 2


async def test_body_to_end_of_connection() -> None:
    """An HTTP/1.0-style answer with neither length nor chunks runs to the connection's end."""
    answer = b'HTTP/1.0 202 Accepted\r\nContent-Type: application/json\r\n\r\n{"status": "failed"}'
    async with raw(answer, close_after=True) as server:
        http = transport(server.endpoint)
        try:
            got = await http.fetch(ID)
        finally:
            await http.close()
    assert (got.status, got.body) == (202, b'{"status": "failed"}')


async def test_chunked_answer() -> None:
    """Chunked transfer coding is reassembled."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"a":\r\n4\r\n "b"\r\n1\r\n}\r\n0\r\n\r\n'
    )
    async with raw(answer) as server:
        http = transport(server.endpoint)
        try:
            assert (await http.fetch(ID)).body == b'{"a": "b"}'
            assert (await http.fetch(ID)).body == b'{"a": "b"}'  # and the connection is reusable
        finally:
            await http.close()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # RFC 9110: zlib-wrapped
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw, as some servers send it
    ],
)
async def test_compressed_answers_are_decoded(
    encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    """gzip and both forms of deflate come back as the original bytes."""
    original = b'{"status": "retrieving", "pad": "' + b"x" * 5000 + b'"}'
    answer = reply(encode(original), f"Content-Encoding: {encoding}")
    async with raw(answer) as server:
        http = transport(server.endpoint)
        try:
            assert (await http.fetch(ID)).body == original
        finally:
            await http.close()


async def test_unasked_encoding_is_a_bad_answer() -> None:
    """An encoding never offered (br) cannot be read: retried as ``bad_encoding``."""
    async with raw(reply(b"\x0b\x02\x80", "Content-Encoding: br")) as server:
        http = transport(server.endpoint)
        try:
            with pytest.raises(BadResponseError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "bad_encoding"


async def test_corrupt_gzip_is_a_truncated_body() -> None:
    """A gzip body cut short or mangled is ``truncated_body`` (as aiohttp reports it)."""
    data = gzip.compress(b'{"status": "retrieving"}' * 50)
    async with raw(reply(data[: len(data) // 2], "Content-Encoding: gzip")) as server:
        http = transport(server.endpoint)
        try:
            with pytest.raises(BadResponseError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "truncated_body"


async def test_garbage_is_a_bad_answer() -> None:
    """Bytes that are not HTTP are ``bad_answer``, and the connection is not reused."""
    answers = {1: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 2: OK}
    async with raw(lambda n: answers[n]) as server:
        http = transport(server.endpoint)
        try:
            with pytest.raises(BadResponseError) as info:
                await http.fetch(ID)
            assert (await http.fetch(ID)).status == 202
        finally:
            await http.close()
    assert info.value.label == "bad_answer"
    assert server.connections == 2


async def test_interim_answer_is_skipped() -> None:
    """A 100 Continue before the answer is not taken for it."""
    async with raw(b"HTTP/1.1 100 Continue\r\n\r\n" + OK) as server:
        http = transport(server.endpoint)
        try:
            assert (await http.fetch(ID)).status == 202
        finally:
            await http.close()


async def test_headers_read_case_blind() -> None:
    """Content-Type and Retry-After are found whatever their case."""
    answer = (
        b"HTTP/1.1 429 Too Many\r\ncontent-TYPE: text/plain\r\nretry-after: 7\r\n"
        b"content-length: 0\r\n\r\n"
    )
    async with raw(answer) as server:
        http = transport(server.endpoint)
        try:
            got = await http.fetch(ID)
        finally:
            await http.close()
    assert (got.status, got.content_type, got.retry_after) == (429, "text/plain", "7")


async def test_cancelled_poll_never_reuses_its_connection() -> None:
    """A poll cancelled mid-request (a stop) closes its connection: a late answer to it must
    never be read as the next id's."""
    # The first request gets no answer (yet); every later one is answered at once.
    async with raw(lambda n: b"" if n == 1 else OK) as server:
        http = transport(server.endpoint, request_timeout=5.0)
        try:
            task = asyncio.create_task(http.fetch(ID))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await http.fetch(ID)).status == 202
        finally:
            await http.close()
    assert server.connections == 2


async def test_oversize_length_fails_before_the_body() -> None:
    """A Content-Length over the cap is ``too_large`` at once, without reading the body."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
    )
    async with raw(answer) as server:
        http = transport(server.endpoint)
        try:
            with pytest.raises(BadResponseError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "too_large"


async def test_no_answer_in_time_is_a_timeout() -> None:
    """A server that reads the request and says nothing is ``timeout`` after request_timeout."""
    async with raw(b"") as server:
        http = transport(server.endpoint, request_timeout=0.2)
        try:
            with pytest.raises(TransportError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "timeout"


def test_ipv6_literal_and_default_port_in_host_header() -> None:
    """The Host header brackets an IPv6 literal and leaves out a default port."""
    six = Http1Transport(
        "http://[::1]:8080/ai", token="t", max_body_bytes=1024, connect_timeout=1, request_timeout=1
    )
    assert b"\r\nHost: [::1]:8080\r\n" in six._tail
    plain = Http1Transport(
        "https://api.example.com/ai/completions",
        token="t",
        max_body_bytes=1024,
        connect_timeout=1,
        request_timeout=1,
    )
    assert b"\r\nHost: api.example.com\r\n" in plain._tail
    assert plain._head == b"GET /ai/completions?id="


# -- what a fresh-eyes review found --------------------------------------------------------


async def test_raw_deflate_that_looks_like_a_zlib_check_is_decoded() -> None:
    """About 1 raw-deflate body in 31 starts with two bytes that pass zlib's header check
    alone; the header's method and window bits must match too, or it is refused forever."""
    found = None
    for n in range(3000):
        original = (b"%d " % n) * 40  # bodies that start differently, unlike JSON's "{"
        raw = zlib.compress(original)[2:-4]
        if (raw[0] * 256 + raw[1]) % 31 == 0:
            found = (original, raw)
            break
    assert found is not None
    original, raw = found
    async with raw_answer(reply(raw, "Content-Encoding: deflate")) as http:
        assert (await http.fetch(ID)).body == original


async def test_a_second_answer_never_answers_the_next_request() -> None:
    """A server that answers twice: the extra answer must not be read as the next id's."""
    failed = reply(b'{"status": "failed"}', status="202 Accepted")
    retrieving = reply(b'{"status": "retrieving"}', status="202 Accepted")
    # The first request's answer, then the start of a stray second one in the same write.
    async with raw(lambda n: retrieving + failed[:20] if n == 1 else retrieving) as server:
        http = transport(server.endpoint)
        try:
            assert (await http.fetch(ID)).body == b'{"status": "retrieving"}'
            assert (await http.fetch(ID)).body == b'{"status": "retrieving"}'
        finally:
            await http.close()
    assert server.connections == 2


async def test_an_empty_compressed_throttle_is_still_a_throttle() -> None:
    """A 429 with ``Content-Encoding: gzip`` and no body is read as the 429 it is."""
    answer = reply(b"", "Content-Encoding: gzip", "Retry-After: 30", status="429 Too Many")
    async with raw_answer(answer) as http:
        got = await http.fetch(ID)
    assert (got.status, got.retry_after, got.body) == (429, "30", b"")


async def test_endless_headers_are_refused() -> None:
    """Headers past 64 KiB are ``too_large``, not held until the request timeout."""
    answer = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (256 * 1024)
    async with raw_answer(answer) as http:
        with pytest.raises(BadResponseError) as info:
            await http.fetch(ID)
    assert info.value.label == "too_large"


async def test_switching_protocols_is_a_bad_answer() -> None:
    """A 101 is not an answer to a poll."""
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with raw_answer(answer) as http:
        with pytest.raises(BadResponseError) as info:
            await http.fetch(ID)
    assert info.value.label == "bad_answer"


async def test_trailers_do_not_change_the_answer() -> None:
    """A trailer field after a chunked body cannot change its type or encoding."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: Content-Type\r\n\r\n2\r\n{}\r\n0\r\nContent-Type: text/html\r\n"
        b"Content-Encoding: gzip\r\n\r\n"
    )
    async with raw_answer(answer) as http:
        got = await http.fetch(ID)
    assert (got.content_type, got.body) == ("application/json", b"{}")


@pytest.mark.parametrize(
    ("headers", "encode"),
    [
        (("Content-Encoding: gzip, identity",), gzip.compress),
        (
            ("Content-Encoding: gzip", "Content-Encoding: gzip"),
            lambda d: gzip.compress(gzip.compress(d)),
        ),
        (("Content-Encoding: GZIP",), lambda d: gzip.compress(d[:10]) + gzip.compress(d[10:])),
    ],
    ids=["with-identity", "twice", "two-members"],
)
async def test_encoding_lists_and_gzip_members(
    headers: tuple[str, ...], encode: Callable[[bytes], bytes]
) -> None:
    """Codings listed or repeated are undone in reverse order; every gzip member is read."""
    original = b'{"status": "retrieving", "pad": "' + b"y" * 300 + b'"}'
    async with raw_answer(reply(encode(original), *headers)) as http:
        assert (await http.fetch(ID)).body == original


async def test_bare_lf_line_ends_are_accepted() -> None:
    """A server that ends header lines with LF alone is read, as aiohttp reads it."""
    answer = b"HTTP/1.1 202 Accepted\nContent-Type: application/json\nContent-Length: 2\n\n{}"
    async with raw_answer(answer) as http:
        assert (await http.fetch(ID)).body == b"{}"


async def test_a_reset_mid_body_to_eof_is_not_a_whole_answer() -> None:
    """A body that runs to the connection's end, cut by a reset, is ``truncated_body``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.0 202 Accepted\r\nContent-Type: application/json\r\n\r\n{"sta')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with listening(handle) as port:
        http = transport(f"http://127.0.0.1:{port}/ai/completions")
        try:
            with pytest.raises(BadResponseError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "truncated_body"


async def test_a_cancelled_poll_leaves_no_timer() -> None:
    """Cancelling a poll stops its request timer with it."""
    async with raw(b"") as server:
        http = transport(server.endpoint, request_timeout=30.0)
        try:
            task = asyncio.create_task(http.fetch(ID))
            await asyncio.sleep(0.1)
            (conn,) = http._all
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn._timer is None
        finally:
            await http.close()


async def test_an_unreachable_first_address_falls_through_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name whose first address never answers connects over the next one within the
    Happy Eyeballs delay, not after the whole connect timeout."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.2", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):  # fill its backlog: further connects hang without an answer
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(blackhole.getsockname())
        fillers.append(filler)
    async with raw(OK) as server:
        port = int(server.endpoint.split(":")[2].split("/")[0])
        dead = blackhole.getsockname()[1]
        loop = asyncio.get_running_loop()

        async def addresses(host: str, _port: int, **_kw: object) -> list[tuple[object, ...]]:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", dead)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]

        monkeypatch.setattr(loop, "getaddrinfo", addresses)
        http = transport(f"http://api.test:{port}/ai/completions", connect_timeout=5.0)
        try:
            started = loop.time()
            assert (await http.fetch(ID)).status == 202
            assert loop.time() - started < 4.0  # well inside the 5 s connect timeout
        finally:
            await http.close()
    blackhole.close()
    for filler in fillers:
        filler.close()


async def test_a_tls_handshake_failure_is_retried_not_fatal() -> None:
    """A plain-http server behind an https URL fails the handshake: a ``connect_error`` to
    retry (exit 5 if nothing ever answers), not the fatal certificate error."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An http server's answer to bytes it cannot read, then hang up."""
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with listening(plain) as port:
        http = transport(f"https://127.0.0.1:{port}/ai/completions")
        try:
            with pytest.raises(TransportError) as info:
                await http.fetch(ID)
        finally:
            await http.close()
    assert info.value.label == "connect_error"
    assert "TLS handshake failed" in str(info.value)


async def test_a_large_answer_in_one_read_is_not_taken_for_large_headers() -> None:
    """Headers and a body far past the header cap, arriving together, read fine: only bytes
    still in the headers count against the cap."""
    body = b'{"status": "retrieving", "pad": "' + b"z" * (600 * 1024) + b'"}'
    async with raw(reply(body)) as server:
        http = Http1Transport(
            server.endpoint,
            token="tok",
            max_body_bytes=1024 * 1024,
            connect_timeout=2.0,
            request_timeout=5.0,
        )
        try:
            for _ in range(3):
                assert (await http.fetch(ID)).body == body
        finally:
            await http.close()
