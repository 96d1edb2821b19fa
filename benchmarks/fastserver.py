"""A deliberately cheap HTTP/1.1 server for client-side benchmarks.

It answers every request on a keep-alive connection with the same 200 Completion, using a
bare asyncio protocol: a few microseconds a request, so that on a 2-core machine the
harvester, not the server, is what a benchmark measures.

    python -m benchmarks.fastserver --port 8081
"""

from __future__ import annotations

import argparse
import asyncio

import orjson

BODY = orjson.dumps(
    {
        "model": "chatgpt",
        "query": "best basketball shoes for 2026",
        "html": "<html>" + "<p>answer text</p>" * 120 + "</html>",
        "prompt": "<h4>You said: best basketball shoes for 2026</h4>",
        "completion": "<div>" + "<p>ChatGPT said: ...</p>" * 40 + "</div>",
        "sources": "<section aria-label='Sources'>...</section>",
        "ads": "",
        "fanouts": ["best basketball shoes 2026", "top rated basketball shoes"],
        "device": None,
        "country": None,
        "subdivision": None,
        "city": None,
    }
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class _Protocol(asyncio.Protocol):
    """Counts complete request heads in the stream and answers each one."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffered = self._pending + data
        heads = buffered.count(b"\r\n\r\n")  # GETs carry no body
        self._pending = buffered[buffered.rfind(b"\r\n\r\n") + 4 :] if heads else buffered
        if heads and self._transport is not None:
            self._transport.write(RESPONSE * heads)


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Protocol, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
