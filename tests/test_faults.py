"""The fault matrix: every kind of failure ends with every id accounted for and nothing wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fault_cases import CASES, run_case


@pytest.mark.parametrize("name", list(CASES))
async def test_fault_kind_loses_nothing_and_stores_nothing_wrong(tmp_path: Path, name: str) -> None:
    """Against this fault every id gets its right row, retries stay bounded, the kind is counted."""
    row = await run_case(name, tmp_path)
    assert row["unresolved"] == 0
    assert row["rows"] == row["ids"]
    assert row["completed"] + row["failed"] == row["ids"]
    assert row["rows_lost"] == 0
    assert row["duplicate_rows"] == 0
    assert row["wrong_rows"] == 0
    retries = CASES[name].settings.get("max_retries", 12)
    assert row["max_polls_per_id"] <= retries + 1  # bounded, whatever the server does
    assert set(row["errors"]) <= CASES[name].error_kinds
    assert sum(row["errors"].values()) > 0
