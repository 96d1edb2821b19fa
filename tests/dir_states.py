"""Every state the harvester can leave its DIR in, each made by real runs against the
independent API double: what the reader tests and the README's snippets are run over.

Each state is a folder holding ``completions/`` (the README's name for DIR) and the rows
the harvester must have committed there, by id: ``(status, model)``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow.parquet as pq

from harvester import dataset
from harvester.dataset import committed_files
from harvester.errors import ExitCode
from harvester.runner import harvest

from .api_double import FAILED, RETRIEVING, Answer, ApiDouble
from .conftest import TOKEN, api_document, fast_settings, make_ids, write_csv

# Models no simulator of ours serves, each of which once broke a layout or a reader.
HOSTILE_MODELS = [
    "", " ", ".", "..", "...", "/", "\\", "%", "%2F", "=", "model=x", "~", "~null",
    "__HIVE_DEFAULT_PARTITION__", "../../x", "a/b", "/etc/passwd", "..\\..\\x", "\x00",
    "line\nbreak", "m" * 300, "é" * 150, "日本語モデル", "emoji 🤖", "NaN", "true", "inf",
    "epoch", "null", "2026-12-01", "12345", "_hidden", ".hidden",
    "chatgpt", "gemini", "gpt-4o", "claude-3.5-sonnet",
]  # fmt: skip
INVALID_VALUES = ["not-a-uuid", "x" * 40, "日本", "3F2504E0"]
CREDIT = (402, "Credit balance is 0; top up at https://example.com/billing")

Rows = dict[str, tuple[str, str | None]]


@dataclass(frozen=True)
class State:
    """One DIR as a run left it, and the rows it must hold."""

    name: str
    home: Path  # the working directory of the README's snippets
    rows: Rows

    @property
    def root(self) -> Path:
        return self.home / "completions"


def _completed(models: list[str], ids: list[str]) -> tuple[dict[str, list[Answer]], Rows]:
    """Scripts that answer ``retrieving`` once, then a Completion of each model in turn."""
    scripts: dict[str, list[Answer]] = {}
    rows: Rows = {}
    for n, (cid, model) in enumerate(zip(ids, models, strict=True)):
        extra: dict[str, Any] = {"country": "US", "city": "Zürich"} if n % 3 == 0 else {}
        if n % 4 == 0:
            extra["latency_ms"] = n  # a field beyond the spec
        scripts[cid] = [RETRIEVING, (200, api_document(model, html=f"<p>{model}</p>", **extra))]
        rows[cid] = ("completed", model)
    return scripts, rows


def _harvest(home: Path, ids: list[str], double: ApiDouble) -> int:
    path = write_csv(home / f"ids-{len(list(home.glob('ids-*.csv')))}.csv", ids)
    settings = fast_settings(path, home / "completions", double.base_url, max_retries=2)
    return int(asyncio.run(harvest(settings)).exit_code)


def aborted_at_once(home: Path) -> Rows:
    """402 to the first request: a run that stopped before any answer (a schema file only)."""
    with ApiDouble(token=TOKEN, every=CREDIT) as double:
        assert _harvest(home, make_ids(5, seed=81), double) == ExitCode.REFUSED
    return {}


def only_invalid(home: Path) -> Rows:
    """Invalid input values are written, then the account is out of credit: no model at all."""
    with ApiDouble(token=TOKEN, every=CREDIT) as double:
        ids = [*INVALID_VALUES, *make_ids(3, seed=82)]
        assert _harvest(home, ids, double) == ExitCode.REFUSED
    return dict.fromkeys(INVALID_VALUES, ("invalid", None))


def only_failed(home: Path) -> Rows:
    """Every conversation failed."""
    ids = make_ids(20, seed=83)
    with ApiDouble({cid: [RETRIEVING, FAILED] for cid in ids}, token=TOKEN) as double:
        assert _harvest(home, ids, double) == ExitCode.OK
    return dict.fromkeys(ids, ("failed", None))


def mixed(home: Path, *, seed: int = 84, models: list[str] = HOSTILE_MODELS) -> Rows:
    """Completed (every hostile model), failed, 422 and invalid rows in one run."""
    completed_ids, failed_ids, rejected_ids = (
        make_ids(len(models), seed=seed),
        make_ids(5, seed=seed + 1000),
        make_ids(3, seed=seed + 2000),
    )
    scripts, rows = _completed(models, completed_ids)
    scripts.update({cid: [FAILED] for cid in failed_ids})
    scripts.update(
        {cid: [(422, "Character counts must be no more than 255")] for cid in rejected_ids}
    )
    rows.update(dict.fromkeys(failed_ids, ("failed", None)))
    rows.update(dict.fromkeys(rejected_ids, ("invalid", None)))
    invalid = [f"{value}-{seed}" for value in INVALID_VALUES]
    rows.update(dict.fromkeys(invalid, ("invalid", None)))
    with ApiDouble(scripts, token=TOKEN) as double:
        ids = [*completed_ids, *failed_ids, *rejected_ids, *invalid]
        assert _harvest(home, ids, double) == ExitCode.OK
    return rows


def appended(home: Path) -> Rows:
    """A later run adds new ids (and other models) to a DIR an earlier run filled."""
    first = mixed(home, seed=85, models=HOSTILE_MODELS[:20])
    second = mixed(home, seed=86, models=HOSTILE_MODELS[20:])
    return {**first, **second}


def _run_then_kill(
    home: Path, ids: list[str], double: ApiDouble, ready: Callable[[], bool]
) -> None:
    """``harvester run`` in a child process, SIGKILLed once ``ready()`` holds."""
    path = write_csv(home / "ids.csv", ids)
    argv = [
        sys.executable, "-m", "harvester", "run", "--ids", str(path),
        "--out", str(home / "completions"), "--base-url", double.base_url,
        "--flush-interval", "0.2", "--poll-interval", "0.05", "--max-poll-interval", "0.2",
        "--no-progress", "--json",
    ]  # fmt: skip
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the run never reached the state to kill it in"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _committed_rows(root: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in committed_files(root))


def killed_mid_run(home: Path) -> Rows:
    """kill -9 once half the ids are committed while the other half are still retrieving."""
    ids = make_ids(40, seed=87)
    scripts, rows = _completed(HOSTILE_MODELS[: len(ids) // 2], ids[: len(ids) // 2])
    with ApiDouble(scripts, token=TOKEN) as double:
        _run_then_kill(
            home, ids, double, lambda: _committed_rows(home / "completions") == len(rows)
        )
    return rows


def killed_at_start(home: Path) -> Rows:
    """kill -9 before any answer was committed (every id still retrieving)."""
    with ApiDouble(token=TOKEN) as double:
        _run_then_kill(
            home, make_ids(10, seed=88), double, lambda: bool(committed_files(home / "completions"))
        )
    return {}


def interrupted_while_loading(home: Path) -> Rows:
    """SIGTERM while the run loads what is done, before any request (exit 130)."""
    real = dataset.load_done

    def load_then_signal(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the run's loop: a clean stop
        return real(*args, **kwargs)

    with (
        ApiDouble(token=TOKEN) as double,
        mock.patch("harvester.runner.load_done", load_then_signal),
    ):
        assert _harvest(home, make_ids(5, seed=89), double) == ExitCode.INTERRUPTED
        assert not double.polls
    return {}


BUILDERS: dict[str, Callable[[Path], Rows]] = {
    "interrupted_while_loading": interrupted_while_loading,
    "aborted_at_once": aborted_at_once,
    "only_invalid": only_invalid,
    "only_failed": only_failed,
    "mixed": mixed,
    "appended": appended,
    "killed_mid_run": killed_mid_run,
    "killed_at_start": killed_at_start,
}


def build_states(base: Path) -> dict[str, State]:
    """Every state, each in a folder of its own under ``base``."""
    states = {}
    for name, build in BUILDERS.items():
        home = base / name
        home.mkdir()
        states[name] = State(name, home, build(home))
    return states
