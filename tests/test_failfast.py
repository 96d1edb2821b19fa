"""Fail fast when nothing answers: a wrong --base-url stops with exit 5 and one line within
--unreachable-after seconds; a server that has answered once is ridden out as before."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey

from harvester.errors import EXIT_MEANINGS, ExitCode, UnreachableError, worst_code
from harvester.runner import harvest
from harvester.session import connect_cause
from harvester.sim import NO_CREDIT_TOKEN

from .api_double import RETRIEVING, ApiDouble
from .conftest import TOKEN, ThreadedSimulator, fast_settings, free_port, make_ids, write_csv

# Loose: the deadline is 2 s; interpreter start-up and a busy CI machine take the rest.
BOUND_S = 20.0


def run_cli(
    tmp: Path, *args: str, ids: int = 1, token: str = TOKEN
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``harvester run`` in a child process (its defaults: backoff up to 30 s, 10 retries),
    with the token in its environment; returns the result and the seconds it took."""
    path = write_csv(tmp / "ids.csv", make_ids(ids, seed=5))
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(path), "--out", str(tmp / "out"),
        "--no-progress", *args,
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "MASSIVE_API_TOKEN": token,
    }
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    return done, time.monotonic() - started


def unreachable_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "nothing answers at" in line]


def test_a_refused_port_exits_5_within_the_bound_with_one_line(tmp_path: Path) -> None:
    """Nothing listening: exit 5 well before the 100+ s of retries, one line naming the URL,
    the cause and what to check; the summary still counts the id as unresolved."""
    url = f"http://127.0.0.1:{free_port()}"
    done, took = run_cli(tmp_path, "--base-url", url, "--unreachable-after", "2", "--json")
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert took < BOUND_S
    assert unreachable_lines(done.stderr) == [
        f"harvester: nothing answers at {url}/ai/completions for 2 s: connection refused; "
        "check --base-url"
    ]
    summary = orjson.loads(done.stdout)
    assert (summary["exit_code"], summary["unresolved"], summary["completed"]) == (5, 1, 0)
    assert summary["errors"].get("connect_error", 0) >= 1


def test_the_line_names_the_endpoint_polled(tmp_path: Path) -> None:
    """With --endpoint ai, the URL in the line is the newer /ai."""
    url = f"http://127.0.0.1:{free_port()}"
    done, _ = run_cli(tmp_path, "--base-url", url, "--unreachable-after", "1", "--endpoint", "ai")
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    [line] = unreachable_lines(done.stderr)
    assert f" at {url}/ai for 1 s: connection refused" in line


def test_workers_to_a_refused_port_exit_5(tmp_path: Path) -> None:
    """--workers 2: each child stops with 5, the parent's merged code is 5 too, and the line
    is said once, by the parent, not once a worker."""
    url = f"http://127.0.0.1:{free_port()}"
    done, took = run_cli(
        tmp_path, "--base-url", url, "--unreachable-after", "2", "--workers", "2", "--json",
        ids=20,
    )  # fmt: skip
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert took < BOUND_S
    assert unreachable_lines(done.stderr) == [
        f"harvester: nothing answers at {url}/ai/completions for 2 s: connection refused; "
        "check --base-url"
    ]
    assert orjson.loads(done.stdout)["exit_code"] == ExitCode.UNREACHABLE


def test_workers_say_a_402_once_too(tmp_path: Path) -> None:
    """The same one line for any fatal stop with --workers: out of credit, exit 3."""
    with ThreadedSimulator() as sim:
        done, _ = run_cli(
            tmp_path, "--base-url", sim.base_url, "--workers", "2", "--json", ids=20,
            token=NO_CREDIT_TOKEN,
        )  # fmt: skip
    assert done.returncode == ExitCode.REFUSED, done.stderr
    fatal = [line for line in done.stderr.splitlines() if "HTTP 402" in line]
    assert len(fatal) == 1, done.stderr
    assert fatal[0].startswith("harvester: HTTP 402")


async def test_a_server_that_answered_once_is_ridden_out(tmp_path: Path) -> None:
    """The server answers (retrieving), then goes away for good: the deadline never arms,
    the id uses up its retries over longer than --unreachable-after, and the run ends
    exit 1 as before, not 5."""
    [cid] = make_ids(1, seed=6)
    ids = write_csv(tmp_path / "ids.csv", [cid])
    with ApiDouble({cid: [RETRIEVING]}, token=TOKEN) as double:
        settings = fast_settings(
            ids,
            tmp_path / "out",
            double.base_url,
            unreachable_after=0.3,
            max_retries=6,
            backoff_base=0.2,
            backoff_max=0.5,
        )
        run = asyncio.create_task(harvest(settings))
        deadline = time.monotonic() + 10
        while not double.polls[cid]:
            assert time.monotonic() < deadline, "the double was never polled"
            await asyncio.sleep(0.01)
    gone = time.monotonic()
    result = await asyncio.wait_for(run, 30)
    assert result.exit_code == ExitCode.UNRESOLVED, result.message
    assert time.monotonic() - gone > settings.unreachable_after  # it would have fired by then
    assert result.summary["errors"].get("connect_error", 0) >= 1
    assert "nothing answers" not in (result.message or "")


async def test_a_dropping_server_that_never_answers_is_unreachable(tmp_path: Path) -> None:
    """A port that accepts and closes every connection at once (no HTTP answer ever) is as
    unreachable as a refused one: the stop comes within the deadline, code 5."""
    [cid] = make_ids(1, seed=7)

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = fast_settings(
        write_csv(tmp_path / "ids.csv", [cid]),
        tmp_path / "out",
        f"http://127.0.0.1:{port}",
        unreachable_after=0.5,
        max_retries=1000,
        backoff_base=0.05,
        backoff_max=0.2,
    )
    try:
        result = await asyncio.wait_for(harvest(settings), 15)
    finally:
        server.close()
        await server.wait_closed()
    assert result.exit_code == ExitCode.UNREACHABLE
    assert result.message is not None
    assert result.message.startswith(f"nothing answers at http://127.0.0.1:{port}/ai/completions")


async def test_a_port_that_never_accepts_is_a_connect_timeout(tmp_path: Path) -> None:
    """A listening socket whose accept queue is full drops new handshakes: every connect
    times out (the connect timeout), and the line says "connect timeout"."""
    [cid] = make_ids(1, seed=8)
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue; later handshakes are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        settings = fast_settings(
            write_csv(tmp_path / "ids.csv", [cid]), tmp_path / "out", f"http://127.0.0.1:{port}",
            connect_timeout=0.2, unreachable_after=1.0, max_retries=1000,
        )  # fmt: skip
        result = await asyncio.wait_for(harvest(settings), 15)
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert result.exit_code == ExitCode.UNREACHABLE
    assert (result.message or "").endswith(": connect timeout; check --base-url")
    assert result.summary["errors"].get("timeout", 0) >= 1


def key(host: str) -> ConnectionKey:
    return ConnectionKey(host, 443, True, True, None, None, None, None)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            aiohttp.ClientConnectorError(key("127.0.0.1"), ConnectionRefusedError(111, "x")),
            "connection refused",
        ),
        (
            # localhost: ::1 and 127.0.0.1 both refused: one OSError listing each errno.
            aiohttp.ClientConnectorError(
                key("localhost"),
                OSError(
                    "Multiple exceptions: [Errno 111] Connect call failed ('::1', 1), "
                    "[Errno 111] Connect call failed ('127.0.0.1', 1)"
                ),
            ),
            "connection refused",
        ),
        (
            aiohttp.ClientConnectorDNSError(
                key("no-such-host.invalid"), socket.gaierror(-2, "Name or service not known")
            ),
            "DNS lookup of no-such-host.invalid failed (Name or service not known)",
        ),
        (aiohttp.ClientConnectorError(key("10.0.0.1"), TimeoutError()), "connect timeout"),
        (
            aiohttp.ClientConnectorError(key("10.0.0.1"), OSError(101, "Network is unreachable")),
            "cannot connect (Network is unreachable)",
        ),
    ],
    ids=["refused", "refused-every-address", "dns", "timeout", "other"],
)
def test_connect_errors_say_what_failed(error: aiohttp.ClientConnectorError, expected: str) -> None:
    """The cause a user acts on: refused, a DNS failure naming the host, a timeout."""
    assert connect_cause(error) == expected


@pytest.mark.parametrize(
    ("codes", "merged"),
    [
        ([ExitCode.UNREACHABLE, ExitCode.UNREACHABLE], ExitCode.UNREACHABLE),
        ([ExitCode.UNREACHABLE, ExitCode.UNRESOLVED], ExitCode.UNREACHABLE),
        ([ExitCode.OK, ExitCode.UNREACHABLE, ExitCode.INTERRUPTED], ExitCode.UNREACHABLE),
        ([ExitCode.REFUSED, ExitCode.UNREACHABLE], ExitCode.REFUSED),
        ([-9, ExitCode.UNREACHABLE], ExitCode.UNREACHABLE),
    ],
)
def test_workers_merge_keeps_unreachable(codes: list[int], merged: ExitCode) -> None:
    """Among workers' codes, 5 outranks the mild ones and a killed worker; 3 outranks it."""
    assert worst_code(codes) == merged


def test_the_code_is_documented() -> None:
    """Code 5 has its meaning line (run --help lists it) and its README entry."""
    assert UnreachableError("x").exit_code is ExitCode.UNREACHABLE
    assert int(ExitCode.UNREACHABLE) == 5
    assert "--base-url" in EXIT_MEANINGS[ExitCode.UNREACHABLE]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^\|?\s*`?5`?\s*\|.*(answer|unreachable)", readme, re.M | re.I), (
        "README.md lists no exit code 5"
    )
