"""The fault matrix as a table: one harvest per kind of failure (the cases live in
``tests/fault_cases.py``, which ``tests/test_faults.py`` asserts on).

    python -m benchmarks.fault_matrix          # prints the table, writes results/fault_matrix.json
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from tests.fault_cases import CASES, FAULT_RATE, run_case

from ._common import save


async def _main() -> None:
    rows = []
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            row = await run_case(name, Path(tmp))
        rows.append(row)
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items())
        print(
            f"| {name} | {row['ids']} | {row['ids_affected']} | {row['retries']} "
            f"(+{row['throttled']} throttled) | {row['completed']} completed, {row['failed']} "
            f"failed, {row['unresolved']} unresolved | {row['rows_lost']} | {errors} |"
        )
    save("fault_matrix", {"fault_rate": FAULT_RATE, "cases": rows})


if __name__ == "__main__":
    print("| fault | ids | ids affected | retries | outcome | rows lost | errors counted |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    asyncio.run(_main())
