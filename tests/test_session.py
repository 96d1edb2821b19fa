"""The tuned session (``client.make_session``) behaves as the API needs, not just faster."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from harvester.client import CompletionsClient
from harvester.errors import BadResponseError
from harvester.model import Kind
from harvester.session import make_session

DOC = {
    "model": "chatgpt",
    "query": "q",
    "html": "<p>é</p>" * 1000,
    "prompt": "p",
    "completion": "c",
    "sources": "",
    "ads": "",
    "fanouts": [],
}


async def test_cookies_are_never_sent_back() -> None:
    """A Set-Cookie from a server (a load balancer's, say) is not stored nor sent back:
    the session has no cookie jar, so every request carries only the auth header."""
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.Response(body=orjson.dumps(DOC), content_type="application/json")
        resp.set_cookie("lb", "node-7")
        return resp

    app = web.Application()
    app.router.add_get("/ai/completions", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        session = make_session("tok", limit=4, connect_timeout=5, request_timeout=5)
        try:
            client = CompletionsClient(
                session,
                str(server.make_url("/ai/completions")),
                token="tok",
                max_body_bytes=1 << 20,
            )
            for _ in range(3):
                kind, doc = await client.poll("6513270e-269e-4d37-b2a7-4de452e6b438")
                assert kind is Kind.COMPLETED
                assert doc is not None
                assert doc["html"] == DOC["html"]
        finally:
            await session.close()
    assert seen == [None, None, None]


async def test_a_body_with_its_length_is_read_whole_and_exact() -> None:
    """The one-read path for a body of known length returns it byte for byte, and one
    over the cap is refused before it is read."""
    body = orjson.dumps(DOC)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/ai/completions", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        session = make_session("tok", limit=4, connect_timeout=5, request_timeout=5)
        try:
            url = str(server.make_url("/ai/completions"))
            exact = CompletionsClient(session, url, token="tok", max_body_bytes=len(body))
            kind, doc = await exact.poll("6513270e-269e-4d37-b2a7-4de452e6b438")
            assert kind is Kind.COMPLETED
            assert doc is not None
            assert doc["html"] == DOC["html"]
            small = CompletionsClient(session, url, token="tok", max_body_bytes=len(body) - 1)
            with pytest.raises(BadResponseError) as refused:
                await small.poll("6513270e-269e-4d37-b2a7-4de452e6b438")
            assert refused.value.label == "too_large"
        finally:
            await session.close()
