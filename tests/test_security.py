"""Security: the token stays secret, TLS is verified, limits are checked before the run."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web

from harvester.errors import ExitCode, UsageError
from harvester.open_files import FILES_BESIDES_SOCKETS, ensure_open_files
from harvester.runner import harvest
from harvester.session import make_session
from harvester.sim import Simulator, make_app

from .conftest import TOKEN, fast_settings, make_ids, write_csv


class TlsSimulator:
    """The simulator behind HTTPS with a throwaway CA, on its own loop in a thread."""

    def __init__(self, ca: trustme.CA) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._ctx)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.port = 0

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(make_app(token=TOKEN, profile="instant"), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._ctx)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> TlsSimulator:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def tls_server() -> Iterator[tuple[TlsSimulator, trustme.CA]]:
    """An HTTPS simulator whose certificate no system CA signed."""
    ca = trustme.CA()
    with TlsSimulator(ca) as server:
        yield server, ca


async def test_unverifiable_certificate_stops_the_run(
    tmp_path: Path, tls_server: tuple[TlsSimulator, trustme.CA]
) -> None:
    """TLS verification is on by default: an unknown CA stops the run (exit 3), no retries."""
    server, _ = tls_server
    path = write_csv(tmp_path / "ids.csv", make_ids(20))
    url = f"https://127.0.0.1:{server.port}"
    result = await harvest(fast_settings(path, tmp_path / "out", url))
    assert result.exit_code == ExitCode.REFUSED
    assert "TLS verification failed" in (result.message or "")
    assert "SSL_CERT_FILE" in (result.message or "")
    assert result.summary["requests"] <= 20  # the ones already in flight; none retried
    assert result.summary["retries"] == 0


def test_trusted_ca_via_ssl_cert_file(
    tmp_path: Path, tls_server: tuple[TlsSimulator, trustme.CA]
) -> None:
    """Pointing SSL_CERT_FILE at the CA that signed the server's certificate is enough."""
    server, ca = tls_server
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    path = write_csv(tmp_path / "ids.csv", make_ids(20))
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN, "SSL_CERT_FILE": str(ca_file)}
    done = subprocess.run(
        [sys.executable, "-m", "harvester", "run", "--ids", str(path), "--out",
         str(tmp_path / "out"), "--base-url", f"https://127.0.0.1:{server.port}", "--json",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["completed"] + orjson.loads(done.stdout)["failed"] == 20


async def test_session_verifies_tls_by_default() -> None:
    """The session harvester builds does not turn certificate checks off."""
    session = make_session(TOKEN, limit=4, connect_timeout=1, request_timeout=1)
    try:
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert session.connector._ssl is True  # aiohttp: True means verify with default CAs
    finally:
        await session.close()


async def test_token_appears_nowhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logs, stdout/stderr, summaries, reprs, messages and files never contain the token."""
    caplog.set_level(logging.DEBUG)
    ids = make_ids(200)
    path = write_csv(tmp_path / "ids.csv", ids)
    out = tmp_path / "out"
    async with Simulator(token=TOKEN, profile="chaos", time_scale=0.01) as sim:
        settings = fast_settings(path, out, sim.base_url, max_retries=3)
        ok = await harvest(settings)
    async with Simulator(token="another-token", profile="instant") as sim:
        # A DIR of its own: in the first one every id may already be done, and no request made.
        denied = await harvest(fast_settings(path, tmp_path / "denied", sim.base_url))
    assert denied.exit_code == ExitCode.REFUSED
    captured = capsys.readouterr()
    texts = [
        caplog.text,
        captured.out,
        captured.err,
        orjson.dumps(ok.summary).decode(),
        orjson.dumps(denied.summary).decode(),
        denied.message or "",
        repr(settings),
        str(settings),
    ]
    assert all(TOKEN not in text for text in texts)
    files = [f for d in (out, tmp_path / "denied") for f in d.rglob("*") if f.is_file()]
    assert files
    assert all(TOKEN.encode() not in f.read_bytes() for f in files)


def test_open_file_limit_is_raised_when_possible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A soft limit below --concurrency is raised up to what the run needs."""
    import resource

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: calls.append(limits))
    assert ensure_open_files(10_000) == 10_000 + FILES_BESIDES_SOCKETS
    assert calls == [(10_000 + FILES_BESIDES_SOCKETS, 65536)]


def test_open_file_limit_refuses_to_start_when_impossible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the hard limit the run refuses to start, saying what to change (never EMFILE later)."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 4096))
    with pytest.raises(UsageError, match=r"--concurrency 10000 .*hard limit is 4096"):
        ensure_open_files(10_000)
