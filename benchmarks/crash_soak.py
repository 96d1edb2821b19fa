"""Ten random kill -9s during a 50k-id harvest against the chaos simulator, then reruns to
exit 0: exactly one row per id, with the content the simulator served.

    python -m benchmarks.crash_soak --ids 50000 --kills 10

After every kill it checks that every visible Parquet file reads; at the end it compares every
row with ``expected_completion`` and writes results/crash_soak.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from harvester.dataset import committed_files, open_dataset
from harvester.sim import expected_completion

from ._common import SCRATCH, TOKEN, ids_file, save, simulator

CONTENT = ("model", "query", "html", "prompt", "completion", "sources", "ads", "fanouts")
SEED = 0  # the seed _common.simulator starts harvester serve with (its default)


def run_cmd(ids: Path, out: Path, url: str) -> list[str]:
    """The one command every attempt runs: the same after each kill, as a user would."""
    return [
        sys.executable, "-m", "harvester", "run", "--ids", str(ids), "--out", str(out),
        "--base-url", url, "--rate", "3000", "--concurrency", "128", "--max-in-play", "5000",
        "--poll-interval", "0.04", "--max-poll-interval", "0.3", "--max-wait", "60",
        "--max-retries", "6", "--flush-interval", "1", "--no-progress", "--json",
    ]  # fmt: skip


def readable_rows(out: Path) -> int:
    """Rows in every visible data file; raises if any file does not read."""
    return sum(pq.read_table(f).num_rows for f in committed_files(out))


def verify(out: Path, ids: list[str]) -> dict[str, int]:
    """Exactly one row per id, each as the simulator served it."""
    table = open_dataset(out).to_table()
    rows = table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    wrong = 0
    for conversation_id in ids:
        expected = expected_completion(conversation_id, seed=SEED, profile="chaos")
        row = by_id.get(conversation_id)
        if row is None:
            continue
        if expected is None:
            wrong += row["status"] != "failed"
        else:
            wrong += any(row[f] != expected[f] for f in CONTENT)
    return {
        "rows": len(rows),
        "unique_ids_with_a_row": len(by_id),
        "missing": len(set(ids) - set(by_id)),
        "duplicates": len(rows) - len(by_id),
        "wrong_content": wrong,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=50_000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    ids_path = ids_file(args.ids, seed=3)
    ids = [line.strip() for line in ids_path.read_text().splitlines()[1:] if line.strip()]
    out = SCRATCH / "crash-soak-out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    kills: list[dict[str, Any]] = []
    started = time.monotonic()
    with simulator("chaos", time_scale=0.01) as url:
        cmd = run_cmd(ids_path, out, url)
        for _ in range(args.kills):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            after = rng.uniform(1.0, 6.0)
            time.sleep(after)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            rows = readable_rows(out)
            kills.append({"after_s": round(after, 2), "rows_committed": rows})
            print(f"kill -9 after {after:.1f} s: {rows} rows committed, every file readable")
        codes = []
        for _ in range(10):  # bounded: each rerun polls only what is still missing
            done = subprocess.run(cmd, env=env, capture_output=True, timeout=900, check=False)
            codes.append(done.returncode)
            print(f"rerun: exit {done.returncode}")
            if done.returncode == 0:
                break
    check = verify(out, ids)
    result = {
        "ids": args.ids,
        "kills": kills,
        "rerun_exit_codes": codes,
        "leftover_temporaries": len(list(out.glob("*/*/.part-*.tmp"))),
        "elapsed_s": round(time.monotonic() - started, 1),
        **check,
    }
    save("crash_soak", result)
    print(
        f"{args.ids} ids, {args.kills} kills, reruns {codes}: {check['rows']} rows, "
        f"{check['missing']} missing, {check['duplicates']} duplicates, "
        f"{check['wrong_content']} with wrong content"
    )


if __name__ == "__main__":
    main()
