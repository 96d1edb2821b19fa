"""An independent stand-in for the API, written apart from ``harvester.sim``: each id answers
from a script, so a test can serve values our simulator never would (an empty model, a
path-like one, ``__HIVE_DEFAULT_PARTITION__``) and check that they are stored as sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from .server_thread import ServerThread

RETRIEVING = (202, {"status": "retrieving"})
FAILED = (202, {"status": "failed"})
# Status and a JSON body (a dict) or a text body (a str), and optionally headers.
Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]]


class ApiDouble(ServerThread):
    """``GET /ai/completions?id=`` on a loopback port, served from a thread of its own.

    ``scripts`` maps an id to the answers of its polls in order; the last one repeats. Ids
    without a script stay ``retrieving``. ``every`` answers every request alike (a 402, say).
    """

    PATHS: tuple[str, ...] = ("/ai/completions",)  # where it answers (a subclass may move it)

    def __init__(
        self,
        scripts: dict[str, list[Answer]] | None = None,
        *,
        token: str,
        every: Answer | None = None,
    ) -> None:
        super().__init__()
        self.scripts = scripts or {}
        self.token = token
        self.every = every
        self.polls: Counter[str] = Counter()
        self.base_url = ""

    async def _answer(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=403, text="Valid API token must be provided")
        conversation_id = request.query.get("id", "")
        self.polls[conversation_id] += 1
        if self.every is not None:
            answer = self.every
        else:
            script = self.scripts.get(conversation_id, [RETRIEVING])
            answer = script[min(self.polls[conversation_id], len(script)) - 1]
        status, body = answer[0], answer[1]
        headers = answer[2] if len(answer) > 2 else {}
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        return web.Response(
            status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    async def _serve(self, stop: asyncio.Event) -> None:
        app = web.Application()
        for path in self.PATHS:
            app.router.add_get(path, self._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
