"""Shared fixtures: id files, fast run settings, and the simulator on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from harvester.client import validate_completion
from harvester.dataset import open_dataset
from harvester.model import TARGETING_FIELDS, Completion
from harvester.settings import RunSettings
from harvester.sim import Simulator

from .server_thread import ServerThread

TOKEN = "test-token-7f3a9c"  # distinctive, so tests can grep outputs for it


def make_ids(count: int, seed: int = 1) -> list[str]:
    """Reproducible canonical uuids."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def api_document(model: str = "chatgpt", **changes: Any) -> dict[str, Any]:
    """A Completion as the API sends it: every field of the spec (targeting null), with
    ``changes`` applied; a name beyond the spec is an extra field."""
    doc: dict[str, Any] = {
        "model": model,
        "query": "q",
        "html": "<html></html>",
        "prompt": "p",
        "completion": "c",
        "sources": "[]",
        "ads": "[]",
        "fanouts": ["f"],
        **dict.fromkeys(TARGETING_FIELDS),
    }
    doc.update(changes)
    return doc


def completion(model: str = "chatgpt", **changes: Any) -> Completion:
    """The same document as the client hands it to the sink (validated, extras as JSON)."""
    return validate_completion(api_document(model, **changes))


def write_csv(path: Path, values: list[str], header: str | None = "id") -> Path:
    """A CSV with an optional header and one value a line."""
    lines = ([header] if header is not None else []) + values
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fast_settings(ids: Path | str, out: Path | str, base_url: str, **overrides: Any) -> RunSettings:
    """Settings whose waits are scaled down for tests; every loop still bounded by max_wait."""
    base = RunSettings(
        ids_path=ids,
        out_dir=out,
        token=TOKEN,
        base_url=base_url,
        rate=2000,
        concurrency=32,
        poll_interval=0.02,
        max_poll_interval=0.1,
        max_wait=20.0,
        backoff_base=0.01,
        backoff_max=0.1,
        flush_interval=0.5,
        progress=False,
    )
    return replace(base, **overrides)


def read_rows(out: Path) -> pa.Table:
    """Every committed row, with the partition columns, as readers see them."""
    return open_dataset(out).to_table()


def read_hive(out: Path) -> pa.Table:
    """The dataset as a third-party reader sees it with plain hive partitioning."""
    return ds.dataset(out, format="parquet", partitioning="hive").to_table()


@pytest.fixture
def sim_factory() -> Callable[..., Simulator]:
    """Build simulators that tests enter themselves (``async with``)."""
    return lambda **kw: Simulator(**{"token": TOKEN, "profile": "instant", **kw})


class ThreadedSimulator(ServerThread):
    """A simulator on its own loop in a thread, for tests that call the blocking CLI."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._kwargs = {"token": TOKEN, "profile": "instant", **kwargs}
        self.sim: Simulator | None = None

    async def _serve(self, stop: asyncio.Event) -> None:
        async with Simulator(**self._kwargs) as sim:
            self.sim = sim
            self._ready.set()
            await stop.wait()

    @property
    def base_url(self) -> str:
        assert self.sim is not None
        return self.sim.base_url

    def stats(self) -> dict[str, Any]:
        assert self.sim is not None
        return self.sim.stats.as_dict()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port with nothing listening on it (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launch_simulator(tmp: Path, *args: str, argv: list[str] | None = None) -> Iterator[str]:
    """``harvester serve ARGS`` (or ``argv``, a stand-in that prints its URL the same way) in a
    child process on a free loopback port; yields its base URL once ``/_sim/stats`` answers.

    The one launcher of a simulator in its own process, for tests whose server must not share
    the harvester's event loop (or must survive it being killed)."""
    log = tmp / f"sim-{len(list(tmp.glob('sim-*.log')))}.log"
    if argv is None:
        argv = [
            sys.executable, "-m", "harvester", "serve", "--host", "127.0.0.1", "--port", "0",
            "--token", TOKEN, *args,
        ]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        found: list[str] = []

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            match = re.search(r"http://127\.0\.0\.1:\d+", log.read_text())
            if match is None:
                return False
            found[:] = [match[0]]
            with urllib.request.urlopen(f"{match[0]}/_sim/stats", timeout=2) as answer:
                return bool(answer.status == 200)

        wait_until(listening, 30, "the simulator to answer /_sim/stats")
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def dir_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every state a run can leave DIR in (``tests/dir_states.py``), built once a session."""
    from .dir_states import build_states

    return build_states(tmp_path_factory.mktemp("states"))
