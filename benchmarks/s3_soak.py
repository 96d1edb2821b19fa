"""A 100k-id harvest into S3 (moto's server, in its own process) with two kill -9s, a resume,
then ``harvester compact``: rows, duplicates, missing ids, objects, files before and after.

    python -m benchmarks.s3_soak --ids 100000 --kills 2

The ids are read from the bucket as ``ids.csv.zst`` (a compressed remote input). Each kill
lands once the run has committed a few more objects; the next attempt waits out the killed
run's lease (``--lease-ttl 5``) and resumes. Writes results/s3_soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pyarrow as pa

from harvester.dataset import committed_files, open_dataset

from ._common import SCRATCH, TOKEN, free_port, ids_file, save, simulator

BUCKET = "soak"
OUT = f"s3://{BUCKET}/completions"


@contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in a child process; yields the AWS environment that reaches it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "soak",
        "AWS_SECRET_ACCESS_KEY": "soak", "AWS_REGION": "us-east-1",
    }  # fmt: skip
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


def keys(prefix: str) -> list[str]:
    """Every key under ``prefix``."""
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def upload_ids(count: int) -> tuple[str, list[str]]:
    """The id file, zstd-compressed, put in the bucket; its URI and the ids."""
    plain = ids_file(count)
    ids = [line for line in plain.read_text().splitlines()[1:] if line]
    packed = SCRATCH / f"{plain.stem}.csv.zst"
    with pa.OSFile(str(packed), "wb") as raw, pa.CompressedOutputStream(raw, "zstd") as out:
        out.write(plain.read_bytes())
    boto3.client("s3").put_object(Bucket=BUCKET, Key="input/ids.csv.zst", Body=packed.read_bytes())
    return f"s3://{BUCKET}/input/ids.csv.zst", ids


def run_cmd(ids: str, url: str) -> list[str]:
    """The one command every attempt runs, as a user would rerun it."""
    return [
        sys.executable, "-m", "harvester", "run", "--ids", ids, "--out", OUT,
        "--base-url", url, "--rate", "3000", "--concurrency", "128", "--max-in-play", "5000",
        "--poll-interval", "0.04", "--max-poll-interval", "0.3", "--max-wait", "60",
        "--flush-interval", "1", "--lease-ttl", "5", "--no-progress", "--json",
    ]  # fmt: skip


def data_objects() -> list[str]:
    """Committed data objects."""
    return [k for k in keys("completions/") if k.rsplit("/", 1)[-1].startswith("part-")]


def check(ids: list[str]) -> dict[str, int]:
    """Rows, duplicates and missing ids as a reader of the prefix sees them."""
    got = Counter(str(i) for i in open_dataset(OUT).to_table(columns=["id"])["id"].to_pylist())
    return {
        "rows": sum(got.values()),
        "unique_ids": len(got),
        "duplicates": sum(n - 1 for n in got.values() if n > 1),
        "missing": len(set(ids) - set(got)),
        "unexpected": len(set(got) - set(ids)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "MASSIVE_API_TOKEN": TOKEN}
    attempts: list[dict[str, Any]] = []
    started = time.monotonic()
    with moto_server(), simulator("realistic", 0.05) as url:
        env.update(os.environ)
        env["MASSIVE_API_TOKEN"] = TOKEN
        uri, ids = upload_ids(args.ids)
        command = run_cmd(uri, url)
        for kill in range(args.kills):
            before = len(data_objects())
            wanted = before + rng.randint(60, 250)  # mid-run: a whole run commits ~700
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 600
            while len(data_objects()) < wanted and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            attempts.append(
                {"kill": kill + 1, "objects_before": before, "after": len(data_objects())}
            )
            print(f"kill -9 {kill + 1}: {len(data_objects())} data objects", file=sys.stderr)
        for _ in range(5):  # exit 1 (an id past --max-wait) is finished by a rerun
            done = subprocess.run(command, env=env, capture_output=True, timeout=1800, check=False)
            summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
            attempts.append(
                {
                    "exit_code": done.returncode,
                    "already_done": summary["already_done"],
                    "files_written": summary["files_written"],
                }
            )
            if done.returncode == 0:
                break
        harvest_s = time.monotonic() - started
        harvested = check(ids)
        objects = data_objects()
        every_object = len(keys(""))
        files_before = len(committed_files(OUT))
        compacted = subprocess.run(
            [sys.executable, "-m", "harvester", "compact", OUT, "--json"],
            env=env, capture_output=True, timeout=1800, check=True,
        )  # fmt: skip
        after = check(ids)
        result = {
            "ids": args.ids,
            "kills": args.kills,
            "attempts": attempts,
            "harvest_s": round(harvest_s, 1),
            "before_compaction": harvested,
            "data_objects_written": len(objects),
            "all_objects_before_compaction": every_object,  # data, reports, the input
            "all_objects_after_compaction": len(keys("")),
            "compaction": {
                "files_before": files_before,
                "files_after": len(committed_files(OUT)),
                "report": compacted.stdout.decode().strip(),
            },
            "after_compaction": after,
        }
    print(result)
    print(save("s3_soak", result))


if __name__ == "__main__":
    main()
