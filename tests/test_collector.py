"""``quiet_collector``: what is alive when a harvest starts is frozen out of gc walks."""

from __future__ import annotations

import gc
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from harvester.collector import quiet_collector
from harvester.runner import harvest
from tests.conftest import api_document, fast_settings, make_ids, write_csv


def test_the_block_freezes_and_its_end_thaws() -> None:
    """Inside, the objects alive at entry sit in the permanent generation; after, none do."""
    before = gc.get_freeze_count()
    with quiet_collector():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == 0


def test_nested_blocks_thaw_once_at_the_outermost_end() -> None:
    """Two harvests in one process (tests, bench): the inner one's end keeps the freeze."""
    with quiet_collector():
        frozen = gc.get_freeze_count()
        with quiet_collector():
            pass
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0


def test_an_error_inside_still_thaws() -> None:
    """A harvest that raises leaves the process as it found it."""
    try:
        with quiet_collector():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_cycles_made_inside_are_still_collected() -> None:
    """The collector is not off: garbage cycles the run makes are found while frozen."""
    with quiet_collector():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2


async def test_a_harvest_runs_frozen(tmp_path: Path) -> None:
    """While a real run polls (aiohttp test server, the default transport), the freeze is
    on; the summary afterwards finds it lifted."""
    counts: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        counts.append(gc.get_freeze_count())
        return web.Response(body=orjson.dumps(api_document()), content_type="application/json")

    app = web.Application()
    app.router.add_get("/ai/completions", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        ids = write_csv(tmp_path / "ids.csv", make_ids(20))
        settings = fast_settings(ids, tmp_path / "out", str(server.make_url("")).rstrip("/"))
        result = await harvest(settings)
    assert result.exit_code == 0
    assert result.summary["rows_written"] == 20
    assert len(counts) == 20
    assert min(counts) > 0
    assert gc.get_freeze_count() == 0
