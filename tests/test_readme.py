"""The README's "Query it" snippets run as written against a dataset this harvester wrote."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harvester.runner import harvest
from harvester.sim import Simulator

from .conftest import TOKEN, fast_settings, make_ids, write_csv

README = Path(__file__).resolve().parents[1] / "README.md"


def query_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### Query it")
    return text[start : text.index("\n## ", start)]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def completions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset named as in the README, with completed and failed (null-model) rows."""
    import asyncio

    root = tmp_path_factory.mktemp("readme")
    path = write_csv(root / "ids.csv", make_ids(300, seed=5))

    async def run() -> None:
        async with Simulator(token=TOKEN, profile="instant") as sim:
            result = await harvest(fast_settings(path, root / "completions", sim.base_url))
        assert result.summary["failed"] > 0  # null-model rows are part of what is read

    asyncio.run(run())
    return root


def test_the_python_snippet_runs(completions: Path) -> None:
    """pyarrow, Polars and pandas, as the README shows them."""
    [code] = blocks(query_section(), "python")
    done = subprocess.run(
        [sys.executable, "-c", code + "\nassert len(df) == 300 and table.num_rows > 0\n"],
        cwd=completions, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_duckdb_command_runs(completions: Path) -> None:
    """The DuckDB one-liner, with this interpreter for ``python``."""
    [command] = blocks(query_section(), "sh")
    argv = ["sh", "-c", command.replace("python -c", f"'{sys.executable}' -c", 1)]
    done = subprocess.run(
        argv, cwd=completions, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout
    assert "failed" in done.stdout
