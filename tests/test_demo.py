"""``harvester demo`` as a newcomer runs it: exit 0, none unresolved, nothing left behind
outside its DIR, and a DIR every reader opens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def test_a_small_demo_ends_clean_and_leaves_nothing_outside_its_dir(tmp_path: Path) -> None:
    """A 600-id demo exits 0 with every id resolved, its ids file inside DIR's metadata."""
    env = {k: v for k, v in os.environ.items() if k != "MASSIVE_API_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "harvester", "demo", "--ids", "600", "--out", "demo-out",
         "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unresolved 0" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]
    assert (tmp_path / "demo-out" / "_harvester" / "demo-ids.csv").is_file()
    table = pq.read_table(tmp_path / "demo-out")
    assert table.num_rows == 600
    assert set(table.column("status").to_pylist()) <= {"completed", "failed"}
