"""Helpers shared by the benchmarks: a simulator subprocess, id files, medians, result files."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvester.sim.demo import write_demo_ids

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = RESULTS / "scratch"  # ignored by git: id files and datasets
TOKEN = "bench-token"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator(
    profile: str = "instant",
    time_scale: float = 1.0,
    capacity: float = 0.0,
    *extra: str,
    token: str = TOKEN,
) -> Iterator[str]:
    """``harvester serve`` in its own process (its own core); yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "harvester",
        "serve",
        "--port",
        str(port),
        "--token",
        token,
        "--profile",
        profile,
        "--time-scale",
        str(time_scale),
        "--capacity",
        str(capacity),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/_sim/stats", timeout=1).read()
                break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def server_stats(url: str) -> dict[str, Any]:
    """What the simulator served (requests by status, peak in flight, max per second)."""
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as resp:
        return dict(json.load(resp))


def reset_server(url: str) -> None:
    """Zero the simulator's counters between runs."""
    req = urllib.request.Request(f"{url}/_sim/reset", method="POST")
    urllib.request.urlopen(req, timeout=5).read()


def ids_file(count: int, seed: int = 1) -> Path:
    """A CSV of ``count`` reproducible ids, made once and reused."""
    path = SCRATCH / f"ids-{count}-{seed}.csv"
    if not path.exists():
        write_demo_ids(path, count, seed=seed)
    return path


def harvest_command(ids: Path, out: Path, url: str, *args: str) -> list[str]:
    """``harvester run --json --no-progress`` of ``ids`` into ``out`` against ``url``."""
    return [
        sys.executable,
        "-m",
        "harvester",
        "run",
        "--ids",
        str(ids),
        "--out",
        str(out),
        "--base-url",
        url,
        "--json",
        "--no-progress",
        *args,
    ]


def harvest_json(
    ids: Path, out: Path, url: str, *args: str, timeout: float = 900
) -> dict[str, Any]:
    """Run ``harvester run --json`` as a child process and return its summary."""
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    cmd = harvest_command(ids, out, url, *args)
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"harvester run failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


def median(values: list[float]) -> float:
    """Median, rounded for printing."""
    return round(statistics.median(values), 2)


def code_state() -> dict[str, Any]:
    """The commit measured, and whether harvester/ had uncommitted changes then."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "harvester")),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write a small JSON result (committed when the README cites it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "code": code_state(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
