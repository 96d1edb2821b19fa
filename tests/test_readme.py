"""The README's "Query it" snippets run as written over a DIR in every state a run can leave
it in (``tests/dir_states.py``), so the docs and the layout cannot drift apart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .dir_states import State
from .readme_blocks import code_blocks, run_sh, section

# Runs one snippet in each state's folder (as the README's "completions" is meant: the
# working directory's) and prints the rows it got, one JSON line per state.
RUN_IN_EACH = """
import json, os, sys
code = sys.stdin.read()
for home in sys.argv[1:]:
    os.chdir(home)
    scope = {}
    exec(code, scope)
    result = scope.get("df", scope.get("table"))
    print(json.dumps({"home": home, "rows": len(result)}))
"""


def blocks(language: str) -> list[str]:
    return code_blocks(section("### Query it"), language)


def expected_rows(code: str, state: State) -> int:
    """What a snippet must find: every row, or the completed ones where it filters."""
    statuses = [status for status, _ in state.rows.values()]
    return statuses.count("completed") if '== "completed"' in code else len(statuses)


def test_the_readme_shows_every_reader() -> None:
    """pyarrow (both ways), pandas, Polars and DuckDB each have a snippet."""
    code = "\n".join(blocks("python") + blocks("sh"))
    for call in ("ds.dataset(", "pq.read_table(", "pd.read_parquet(", "pl.scan_parquet(", "duckdb"):
        assert call in code


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_snippet_runs_in_every_state(dir_states: dict[str, State], index: int) -> None:
    """Each python block reads every state's DIR and finds the rows the run committed."""
    code = blocks("python")[index]
    homes = [str(state.home) for state in dir_states.values()]
    done = subprocess.run(
        [sys.executable, "-c", RUN_IN_EACH, *homes],
        input=code, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{code}\n{done.stderr}"
    found = {line["home"]: line["rows"] for line in map(json.loads, done.stdout.splitlines())}
    for state in dir_states.values():
        assert found[str(state.home)] == expected_rows(code, state), (state.name, code)


def test_the_duckdb_command_runs_in_every_state(dir_states: dict[str, State]) -> None:
    """The DuckDB one-liner, with this interpreter for ``python``, in every state."""
    [command] = blocks("sh")
    argv = ["sh", "-c", command.replace("python -c", f"'{sys.executable}' -c", 1)]
    for state in dir_states.values():
        done = subprocess.run(
            argv, cwd=state.home, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, (state.name, done.stderr)
        for status in {status for status, _ in state.rows.values()}:
            assert status in done.stdout, (state.name, done.stdout)


def test_the_bench_example_runs_as_written(tmp_path: Path) -> None:
    """The README's bench block against ``harvester serve``: exit 0 and the three files
    (steps shortened to 2 s, and a free port, so the suite stays quick)."""
    from .conftest import free_port

    [block] = code_blocks(section("To try it without a token or a network"))
    port = str(free_port())
    command = block.replace("8411", port).replace("--step-seconds 5", "--step-seconds 2")
    done = run_sh(command, tmp_path, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max rate within SLO" in done.stdout
    result = json.loads((tmp_path / "bench-out" / "bench.json").read_text())
    assert result["max_rate_within_slo"] is not None
    assert (tmp_path / "bench-out" / "requests.parquet").is_file()


def test_the_pipeline_step_runs_as_written(tmp_path: Path) -> None:
    """The "Run it as a pipeline step" blocks against ``harvester serve`` (a free port for
    8080): config show names each source, the run logs JSON lines, inspect counts the rows."""
    from .conftest import free_port

    # Up to its first subsection (### Metrics, run by tests/test_exporter.py).
    text = section("## Run it as a pipeline step", end="\n#")
    port = str(free_port())
    [toml] = code_blocks(text, "toml")
    [block] = code_blocks(text)
    (tmp_path / "step.toml").write_text(toml.replace("8080", port))
    done = run_sh(block.replace("8080", port), tmp_path, timeout=150, drop_env=("HARVESTER_",))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^max_wait\s+900\.0\s+env \(HARVESTER_MAX_WAIT\)$", done.stdout, re.M)
    assert re.search(r"^log_format\s+json\s+file \(step\.toml\)$", done.stdout, re.M)
    assert re.search(r"^token\s+\(hidden\)\s+env", done.stdout, re.M)
    assert "sim-token" not in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["completed"] + summary["failed"] == 500
    assert re.search(r"^completions: 500 rows in \d+ files", done.stdout, re.M)
    logs = [line for line in done.stderr.splitlines() if line.startswith("{")]
    assert logs, done.stderr
    assert all(json.loads(line)["level"] for line in logs)
    assert "sim-token" not in done.stderr


def test_the_backfill_section_runs_as_written(tmp_path: Path) -> None:
    """The "Backfill a large CSV" block against ``harvester serve`` (a free port for 8080): a
    run stopped by SIGINT exits 130, the rerun resumes to exit 0 with one row per id."""
    from .conftest import free_port

    [block] = code_blocks(section("## Backfill a large CSV"))
    port = str(free_port())
    done = run_sh(block.replace("8080", port), tmp_path, timeout=240, drop_env=("HARVESTER_",))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopped: exit 130" in done.stdout, done.stdout + done.stderr
    assert "resumed: exit 0" in done.stdout, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["already_done"] > 0  # the stopped run's rows were kept and skipped
    assert summary["already_done"] + summary["completed"] + summary["failed"] == 2000
    assert re.search(r"^backfill: 2000 rows in \d+ files", done.stdout, re.M), done.stdout
