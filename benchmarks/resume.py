"""Resume at scale: reading 10M done ids back, and how soon a rerun starts polling.

Builds once (reused while its parameters match) a dataset of ``--rows`` rows laid out as
``harvester run`` lays it out (``FILE_SCHEMA``, ``partition_dir``, zstd, one row group a file)
across a few harvest dates and models, plus a CSV whose first ``--new`` ids are new and whose
rest are every id of the dataset. Then, each time in a fresh process:

(a) ``load_done(root)``: wall time, peak RSS growth over the RSS after imports, bytes per id;
(b) ``harvester run --ids CSV --out COPY --json`` against ``harvester serve --profile instant``:
    seconds from launch until the server has seen its first request (polled every 20 ms), and
    the run's elapsed time and peak RSS from its summary. COPY is a hard-linked copy of the
    dataset (files are immutable once renamed), so every repeat starts from the same state.

Invalid rows come in two kinds, as the harvester writes them: an input value that is not a
uuid (stored as given), and a canonical uuid the API answered 422 for. The server should see
exactly ``--new`` requests; any more are done ids polled again.

    python -m benchmarks.resume --repeats 3
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from harvester.dataset import FILE_SCHEMA, load_done, partition_dir

from ._common import (
    SCRATCH,
    TOKEN,
    median,
    reset_server,
    save,
    server_stats,
    simulator,
)

BASE = SCRATCH / "resume-base"
IDS_CSV = SCRATCH / "resume-ids.csv"
DATES = ("2026-11-20", "2026-11-21", "2026-11-22", "2026-11-23")
MODELS = ("chatgpt", "gemini", "perplexity", "copilot")
NULL_FILES_PER_DATE = 2  # files of failed and invalid rows (model null) per date
INVALID_PER_NULL_FILE = 250  # half 422'd canonical uuids, half non-uuid input values
POLL_SECONDS = 0.02

_HEX_PAIRS = np.array([list(f"{b:02x}".encode()) for b in range(256)], dtype=np.uint8)
_UUID_COLUMNS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def uuid_rows(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint8]:
    """``n`` random v4 uuids as an (n, 36) array of their canonical ASCII bytes."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    rows = np.full((n, 36), ord("-"), dtype=np.uint8)
    rows[:, _UUID_COLUMNS] = _HEX_PAIRS[raw].reshape(n, 32)
    return rows


def string_array(rows: npt.NDArray[np.uint8]) -> pa.Array:
    """An arrow string array of fixed-width ASCII rows, built without Python strings."""
    n, width = rows.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(rows.tobytes())
    )


def _table(
    ids: pa.Array, status: pa.Array, completed: bool, date: str, model: str | None = None
) -> pa.Table:
    n = len(ids)
    columns: dict[str, pa.Array] = {"id": ids, "status": status}
    # Every field is a column now, ``model`` included (the folder holds its model_key).
    columns["model"] = pa.repeat(model, n) if model is not None else pa.nulls(n, pa.string())
    for name in ("query", "html", "prompt", "completion", "sources", "ads"):
        columns[name] = pa.repeat("x", n) if completed else pa.nulls(n, pa.string())
    if completed:
        values = pa.repeat("fanout", n)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32))
        columns["fanouts"] = pa.ListArray.from_arrays(offsets, values)
    else:
        columns["fanouts"] = pa.nulls(n, pa.list_(pa.string()))
    for name in ("device", "country", "subdivision", "city"):
        columns[name] = pa.nulls(n, pa.string())
    columns["polls"] = pa.array(np.ones(n, dtype=np.int32))
    stamp = calendar.timegm(time.strptime(date, "%Y-%m-%d")) * 1_000_000
    columns["harvested_at"] = pa.array(
        np.full(n, stamp, dtype=np.int64), type=pa.timestamp("us", tz="UTC")
    )
    columns["extra"] = pa.nulls(n, pa.string())
    return pa.table([columns[name] for name in FILE_SCHEMA.names], schema=FILE_SCHEMA)


def build(rows: int, files: int, new: int) -> dict[str, Any]:
    """The dataset and the ids CSV, made once and reused while the parameters match."""
    params = {"rows": rows, "files": files, "new": new, "layout": 3}
    marker = BASE / "_bench.json"
    if marker.exists() and IDS_CSV.exists():
        meta: dict[str, Any] = json.loads(marker.read_text())
        if meta.get("params") == params:
            return meta
    shutil.rmtree(BASE, ignore_errors=True)
    started = time.monotonic()
    rng = np.random.default_rng(20261126)
    per_file = rows // files
    per_date = files // len(DATES)
    counts = {"completed": 0, "failed": 0, "invalid_uuid": 0, "invalid_value": 0}
    tmp_csv = IDS_CSV.with_suffix(".tmp")
    with tmp_csv.open("wb") as csv:
        csv.write(b"id\n")
        head = uuid_rows(rng, new)
        csv.write(np.hstack((head, np.full((new, 1), 10, np.uint8))).tobytes())
        for seq in range(files):
            date = DATES[min(seq // per_date, len(DATES) - 1)]
            slot = seq % per_date
            if slot < NULL_FILES_PER_DATE:
                # failed rows, 422'd uuids (invalid, stored as the uuid), non-uuid values
                bad = INVALID_PER_NULL_FILE // 2
                uuids = uuid_rows(rng, per_file - bad)
                values = [f"not-a-uuid-{seq:03d}-{k:04d}" for k in range(bad)]
                ids = pa.concat_arrays([string_array(uuids), pa.array(values, pa.string())])
                status = ["failed"] * (per_file - 2 * bad) + ["invalid"] * (2 * bad)
                table = _table(ids, pa.array(status, pa.string()), False, date)
                model: str | None = None
                counts["failed"] += per_file - 2 * bad
                counts["invalid_uuid"] += bad
                counts["invalid_value"] += bad
                lines = np.hstack((uuids, np.full((len(uuids), 1), 10, np.uint8))).tobytes()
                lines += "".join(f"{v}\n" for v in values).encode()
            else:
                uuids = uuid_rows(rng, per_file)
                ids = string_array(uuids)
                model = MODELS[slot % len(MODELS)]
                table = _table(ids, pa.repeat("completed", per_file), True, date, model)
                counts["completed"] += per_file
                lines = np.hstack((uuids, np.full((per_file, 1), 10, np.uint8))).tobytes()
            directory = partition_dir(BASE, date, model)
            directory.mkdir(parents=True, exist_ok=True)
            name = f"part-{date.replace('-', '')}T000000Z-bench000-{seq:06d}.parquet"
            pq.write_table(table, directory / name, compression="zstd", row_group_size=per_file)
            csv.write(lines)
    tmp_csv.replace(IDS_CSV)
    data_bytes = sum(p.stat().st_size for p in BASE.glob("*/*/*.parquet"))
    meta = {
        "params": params,
        "counts": counts,
        "dataset_mb": round(data_bytes / 2**20, 1),
        "csv_mb": round(IDS_CSV.stat().st_size / 2**20, 1),
        "build_s": round(time.monotonic() - started, 1),
    }
    marker.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_load_done(root: Path) -> None:
    """In a fresh process: time ``load_done`` and its memory; print one JSON line."""
    rss_after_imports = _rss_mb()
    peak_after_imports = _peak_mb()
    started = time.perf_counter()
    done = load_done(root)
    elapsed = time.perf_counter() - started
    peak = _peak_mb()
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 3),
                "ids": len(done),
                "nbytes": done.nbytes,
                "bytes_per_id": round(done.nbytes / max(1, len(done)), 2),
                "rss_after_imports_mb": round(rss_after_imports, 1),
                "peak_after_imports_mb": round(peak_after_imports, 1),
                "peak_mb": round(peak, 1),
                "peak_growth_mb": round(peak - rss_after_imports, 1),
                "peak_growth_bytes_per_id": round(
                    (peak - rss_after_imports) * 2**20 / max(1, len(done)), 1
                ),
                "rss_after_mb": round(_rss_mb(), 1),
                "runs": len(done._runs),
            }
        )
    )


def measure_load_done(root: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.resume", "--child-load-done", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_start(url: str, out: Path, new: int) -> dict[str, Any]:
    """Launch a resuming run; seconds until the server's first request; its summary."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(BASE, out, copy_function=os.link)  # files are immutable: links suffice
    (out / "_bench.json").unlink(missing_ok=True)
    reset_server(url)
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    cmd = [
        sys.executable,
        "-m",
        "harvester",
        "run",
        "--ids",
        str(IDS_CSV),
        "--out",
        str(out),
        "--base-url",
        url,
        "--rate",
        "50000",
        "--json",
        "--no-progress",
    ]
    log = out.parent / "resume-run.stderr"
    with log.open("wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        first = all_new = None
        deadline = started + 300
        while time.monotonic() < deadline and proc.poll() is None:
            requests = server_stats(url)["requests"]
            if first is None and requests > 0:
                first = time.monotonic() - started
            if requests >= new:
                all_new = time.monotonic() - started
                break
            time.sleep(POLL_SECONDS)
        try:
            stdout, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"harvester run exited {proc.returncode}; see {log}")
    summary = json.loads(stdout)
    server = server_stats(url)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "first_request_s": None if first is None else round(first, 3),
        "new_ids_requested_s": None if all_new is None else round(all_new, 3),
        "elapsed_s": summary["elapsed_s"],
        "wall_s": round(time.monotonic() - started, 2),
        "peak_rss_mb": summary["peak_rss_mb"],
        "server_requests": server["requests"],
        "summary": {k: v for k, v in summary.items() if k not in ("run_id", "out")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-load-done", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load_done is not None:
        child_load_done(args.child_load_done)
        return

    meta = build(args.rows, args.files, args.new)
    print(
        f"dataset: {args.rows} rows in {args.files} files, {meta['dataset_mb']} MiB "
        f"{meta['counts']}; ids CSV {meta['csv_mb']} MiB (built in {meta['build_s']} s)"
    )
    loads: list[dict[str, Any]] = []
    for i in range(args.repeats):
        load = measure_load_done(BASE)
        loads.append(load)
        print(
            f"load_done {i + 1}: {load['seconds']} s for {load['ids']} ids in "
            f"{load['runs']} runs, {load['bytes_per_id']} B/id held, peak RSS "
            f"+{load['peak_growth_mb']} MiB ({load['peak_growth_bytes_per_id']} B/id), "
            f"RSS after {load['rss_after_mb']} MiB"
        )
    starts = []
    with simulator("instant") as url:
        for i in range(args.repeats):
            start = measure_start(url, SCRATCH / "resume-out", args.new)
            starts.append(start)
            s = start["summary"]
            print(
                f"resume {i + 1}: first request after {start['first_request_s']} s, "
                f"{args.new} requests after {start['new_ids_requested_s']} s, run "
                f"{start['elapsed_s']} s (wall {start['wall_s']} s), peak RSS "
                f"{start['peak_rss_mb']} MiB, server saw {start['server_requests']} requests "
                f"(expected {args.new}); already_done {s['already_done']}, completed "
                f"{s['completed']}, failed {s['failed']}, invalid {s['invalid']}"
            )
    firsts = [s["first_request_s"] for s in starts if s["first_request_s"] is not None]
    result = {
        "rows": args.rows,
        "files": args.files,
        "new_ids": args.new,
        "dataset": meta,
        "load_done": {
            "median_s": median([x["seconds"] for x in loads]),
            "median_peak_growth_mb": median([x["peak_growth_mb"] for x in loads]),
            "median_peak_growth_bytes_per_id": median(
                [x["peak_growth_bytes_per_id"] for x in loads]
            ),
            "bytes_per_id_held": loads[0]["bytes_per_id"],
            "runs": loads,
        },
        "resume_run": {
            "median_first_request_s": median(firsts) if firsts else None,
            "median_elapsed_s": median([x["elapsed_s"] for x in starts]),
            "median_peak_rss_mb": median([x["peak_rss_mb"] for x in starts]),
            "median_server_requests": median([x["server_requests"] for x in starts]),
            "runs": starts,
        },
    }
    path = save("resume", result)
    r = result["resume_run"]
    ld = result["load_done"]
    print(
        f"median load_done {ld['median_s']} s, peak RSS +{ld['median_peak_growth_mb']} MiB "
        f"({ld['median_peak_growth_bytes_per_id']} B/id; {ld['bytes_per_id_held']} B/id held); "
        f"resume: first request after {r['median_first_request_s']} s, run "
        f"{r['median_elapsed_s']} s, peak RSS {r['median_peak_rss_mb']} MiB, "
        f"server requests {r['median_server_requests']} (expected {args.new}) -> {path}"
    )


if __name__ == "__main__":
    main()
