"""``harvester inspect DIR``: its counts are DuckDB's own over every state a DIR can be in."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from harvester.cli import main
from harvester.dataset import committed_files
from harvester.inspect import LAST_RUNS, SMALL_FILE_BYTES, inspect_dir
from harvester.report import save_report

from .dir_states import HOSTILE_MODELS, State

JSON_KEYS = {"rows", "by_status", "by_model", "no_model", "by_harvest_date", "files", "runs"}


def duckdb_counts(root: Path) -> dict[str, Any]:
    """What DuckDB itself counts over the committed files (hive partitions for the date)."""
    files = committed_files(root)
    if not files:
        return {"rows": 0, "status": {}, "model": {}, "date": {}}
    con = duckdb.connect()
    source = "read_parquet($files, hive_partitioning = true)"

    def grouped(column: str) -> dict[Any, int]:
        query = f"SELECT {column}, count(*) FROM {source} GROUP BY {column}"
        return dict(con.execute(query, {"files": files}).fetchall())

    [(rows,)] = con.execute(f"SELECT count(*) FROM {source}", {"files": files}).fetchall()
    return {
        "rows": rows,
        "status": grouped("status"),
        "model": grouped("model"),
        "date": {str(day): n for day, n in grouped("harvest_date").items()},
    }


def test_counts_equal_duckdbs_in_every_state(dir_states: dict[str, State]) -> None:
    """Rows, statuses, models (hostile ones included), dates and files, state by state."""
    for name, state in dir_states.items():
        figures = inspect_dir(state.root) if state.root.exists() else None
        if figures is None:  # a run refused before creating DIR: nothing to count
            assert not state.rows, name
            continue
        truth = duckdb_counts(state.root)
        assert figures["rows"] == truth["rows"] == len(state.rows), name
        assert {k: v for k, v in figures["by_status"].items() if v} == truth["status"], name
        models = {m: n for m, n in truth["model"].items() if m is not None}
        assert figures["by_model"] == models, name
        assert figures["no_model"] == truth["model"].get(None, 0), name
        assert figures["by_harvest_date"] == truth["date"], name
        assert figures["files"] == len(committed_files(state.root)), name
        expected = Counter(model for _, model in state.rows.values() if model is not None)
        assert figures["by_model"] == dict(expected), name


def test_json_shape(dir_states: dict[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    """--json: one line, one object with the documented keys and every status present."""
    state = dir_states["appended"]
    assert main(["inspect", str(state.root), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    figures = orjson.loads(out)
    assert figures.keys() >= JSON_KEYS
    assert set(figures["by_status"]) >= {"completed", "failed", "invalid"}
    assert figures["small_file_bytes"] == SMALL_FILE_BYTES == 8 * 2**20
    assert figures["small_files"] == figures["files"] > 0  # test files are all small
    assert figures["bytes"] == sum(Path(f).stat().st_size for f in committed_files(state.root))
    assert len(figures["runs"]) == figures["runs_total"] == 2  # two runs filled this DIR
    for run in figures["runs"]:
        assert {"run_id", "started", "exit_code", "completed", "elapsed_s"} <= run.keys()
        assert run["exit_code"] == 0
    assert figures["runs"][0]["run_id"] > figures["runs"][1]["run_id"]  # newest first


def test_text_output_is_readable(
    dir_states: dict[str, State], capsys: pytest.CaptureFixture[str]
) -> None:
    """The text form: one line per model (even "line\\nbreak" and "\\x00"), no huge lines."""
    state = dir_states["mixed"]
    assert main(["inspect", str(state.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{state.root}: {len(state.rows)} rows in ")
    for heading in ("by status:", "by model:", "by harvest date:", "last runs (1 of 1):"):
        assert heading in lines
    model_lines = lines[lines.index("by model:") + 1 : lines.index("by harvest date:")]
    assert len(model_lines) == len(set(HOSTILE_MODELS)) + 1  # and "(no model)"
    assert all(len(line) <= 80 and line.isprintable() for line in lines[1:-1])
    assert any("'line\\nbreak'" in line for line in model_lines)


def test_an_empty_dir_is_an_empty_dataset(tmp_path: Path) -> None:
    """A DIR with nothing in it yet: zero rows, not an error."""
    figures = inspect_dir(tmp_path)
    assert (figures["rows"], figures["files"], figures["runs"]) == (0, 0, [])
    assert figures["by_status"] == {"completed": 0, "failed": 0, "invalid": 0}


@pytest.mark.parametrize("case", ["missing", "a file", "not a dataset", "old layout"])
def test_a_missing_dir_or_non_dataset_is_exit_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Exit 2 and one line naming DIR, no traceback."""
    root = tmp_path / "dir"
    if case == "a file":
        root.write_text("x")
    elif case == "not a dataset":
        (root / "docs").mkdir(parents=True)
        (root / "docs" / "README.md").write_text("hello")
    elif case == "old layout":
        (root / "harvest_date=2026-01-01" / "model=x").mkdir(parents=True)
        (root / "harvest_date=2026-01-01" / "model=x" / "part-0.parquet").write_bytes(b"")
    assert main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(root) in err[0]


def test_strays_are_not_data(dir_states: dict[str, State], tmp_path: Path) -> None:
    """A temporary, a README or a CSV in a partition is not counted, as no reader counts it."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(dir_states["only_failed"].root, root)
    [partition] = {Path(f).parent for f in committed_files(root)}
    (partition / ".part-x.parquet.tmp").write_bytes(b"junk")
    (partition / "README.md").write_text("notes")
    (root / "ids.csv").write_text("id\n")
    figures = inspect_dir(root)
    assert figures["rows"] == 20
    assert figures["files"] == len(committed_files(root))


def test_runs_fold_workers_and_keep_the_newest(tmp_path: Path) -> None:
    """A --workers run is one run (its workers' reports folded); the last runs are listed."""
    for n in range(LAST_RUNS + 2):
        save_report(tmp_path, f"20260101T0000{n:02d}Z-0000000{n % 10}", {"exit_code": 1})
    children = ["20270101T000000Z-aaaaaaaa", "20270101T000000Z-bbbbbbbb"]
    for child in children:
        save_report(tmp_path, child, {"exit_code": 0, "completed": 5})
    parent = {"exit_code": 0, "completed": 10, "workers": 2, "worker_run_ids": children}
    save_report(tmp_path, "20270101T000001Z-cccccccc", parent)
    (tmp_path / "_harvester" / "runs" / "garbage.json").write_text("{not json")
    figures = inspect_dir(tmp_path)
    assert figures["runs_total"] == LAST_RUNS + 3
    assert len(figures["runs"]) == LAST_RUNS
    first = figures["runs"][0]
    assert (first["completed"], first["workers"], first["started"]) == (
        10,
        2,
        "2027-01-01T00:00:01Z",
    )
    assert not {run["run_id"] for run in figures["runs"]} & set(children)
