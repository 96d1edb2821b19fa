"""``prefer_jemalloc``: Arrow allocates from jemalloc in harvester unless the user chose a pool;
``fix_malloc_thresholds``: glibc gives big freed blocks back during a harvest."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from harvester import allocator, runner
from harvester.sim import Simulator

from .conftest import TOKEN, fast_settings, make_ids, write_csv

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


# Run in a fresh interpreter (malloc's state is per process): an 8 MiB block is freed, which
# by default raises glibc's mmap threshold to 8 MiB; then four 2 MiB blocks are made and freed.
MALLOC_PROBE = """
import ctypes, sys
from harvester.allocator import fix_malloc_thresholds

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
fixed = fix_malloc_thresholds() if sys.argv[1] == "fix" else False
big = bytearray(8 << 20)
del big
before = libc.mallinfo2()
blocks = [bytes(bytearray(2 << 20)) for _ in range(4)]
after = libc.mallinfo2()
del blocks
print(fixed, (after.hblkhd - before.hblkhd) >> 20, libc.mallinfo2().fordblks >> 20)
"""


def _malloc_in_child(mode: str, **env: str) -> tuple[bool, int, int]:
    """(thresholds fixed, MiB of the 2 MiB blocks mapped, MiB left free in the heap after)."""
    child_env = {k: v for k, v in os.environ.items() if k not in allocator.MALLOC_VARIABLES}
    child_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE, mode],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    fixed, mapped, free = done.stdout.split()
    return fixed == "True", int(mapped), int(free)


_GLIBC = platform.libc_ver()[0] == "glibc"
TUNED = [
    ("MALLOC_MMAP_THRESHOLD_", "4194304", 0),
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4194304", 0),
    ("MALLOC_TRIM_THRESHOLD_", "4194304", 8),
]


@pytest.mark.skipif(not _GLIBC, reason="mallopt's thresholds are glibc's")
def test_fixed_thresholds_map_big_blocks_and_give_them_back() -> None:
    """With the thresholds fixed, 2 MiB blocks are mapped and unmapped when freed; by
    default (the control) they come from the heap and stay resident once freed."""
    assert _malloc_in_child("fix") == (True, 8, 0)
    fixed, mapped, free = _malloc_in_child("default")
    assert (fixed, mapped) == (False, 0)
    assert free >= 6  # most of the 8 MiB still held by the heap after the blocks went


# Each variable with a value whose effect shows: the user's 4 MiB mmap threshold keeps 2 MiB
# blocks in the heap; a trim threshold alone leaves glibc's fixed default mmap threshold.
@pytest.mark.skipif(not _GLIBC, reason="mallopt's thresholds are glibc's")
@pytest.mark.parametrize(("name", "value", "mapped"), TUNED)
def test_malloc_tuned_by_the_user_is_left_alone(name: str, value: str, mapped: int) -> None:
    """A user who tuned glibc's malloc in the environment keeps their settings."""
    assert set(allocator.MALLOC_VARIABLES) == {tuned for tuned, _, _ in TUNED}  # all tried
    fixed, really_mapped, _ = _malloc_in_child("fix", **{name: value})
    assert not fixed
    assert really_mapped == mapped


def test_no_threshold_is_set_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another C library (musl, macOS) is left as it is."""
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.fix_malloc_thresholds() is False


async def test_a_harvest_fixes_the_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``harvest`` asks for the thresholds before polling."""
    calls: list[str] = []

    def spy() -> bool:
        calls.append("asked")
        return True

    monkeypatch.setattr(runner, "fix_malloc_thresholds", spy)
    path = write_csv(tmp_path / "ids.csv", make_ids(20))
    async with Simulator(token=TOKEN, profile="instant") as sim:
        result = await runner.harvest(fast_settings(path, tmp_path / "out", sim.base_url))
    assert result.summary["unique_ids"] == 20
    assert calls == ["asked"]
