"""``prefer_jemalloc``: Arrow allocates from jemalloc in harvester unless the user chose a pool."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harvester import allocator

POOL = "import harvester, pyarrow; print(pyarrow.default_memory_pool().backend_name)"


def _pool_in_child(**env: str) -> str:
    """The backend a fresh interpreter ends up with after ``import harvester`` (then pyarrow)."""
    child_env = {k: v for k, v in os.environ.items() if k != allocator.ARROW_POOL_VARIABLE}
    child_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", POOL],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr == ""  # no "unsupported backend" warning from Arrow
    return done.stdout.strip()


@pytest.mark.skipif(not allocator._HAS_JEMALLOC, reason="pyarrow ships jemalloc on Linux x86-64")
def test_importing_harvester_makes_jemalloc_arrows_pool() -> None:
    """The package sets the variable before pyarrow reads it (mimalloc held ~40 MiB more)."""
    assert _pool_in_child() == "jemalloc"


@pytest.mark.parametrize("chosen", ["system", "mimalloc"])
def test_a_pool_the_user_chose_is_kept(chosen: str) -> None:
    """``ARROW_DEFAULT_MEMORY_POOL`` set by the user wins over the preference."""
    assert _pool_in_child(ARROW_DEFAULT_MEMORY_POOL=chosen) == chosen


def test_nothing_is_asked_where_the_wheels_lack_jemalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Linux x86-64 the variable is left alone, so Arrow never warns of a missing backend."""
    monkeypatch.delenv(allocator.ARROW_POOL_VARIABLE, raising=False)
    monkeypatch.setattr(allocator, "_HAS_JEMALLOC", False)
    allocator.prefer_jemalloc()
    assert allocator.ARROW_POOL_VARIABLE not in os.environ
