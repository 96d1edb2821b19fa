"""The baseline of ``benchmarks.throughput``: the least a client can do and still poll every id.

One aiohttp session, C workers pulling ids from one iterator, ``GET ?id=`` built from
``params``, ``orjson.loads`` of each body; no limiter, no retries, no output. It runs on
uvloop when installed, like the harvester, so the ratio compares the clients, not the loops.

    python -m benchmarks.minimal_loop --ids IDS.csv --url http://127.0.0.1:8081 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from collections.abc import Iterator

import aiohttp
import orjson


async def _worker(session: aiohttp.ClientSession, url: str, ids: Iterator[str]) -> int:
    count = 0
    for conversation_id in ids:
        async with session.get(url, params={"id": conversation_id}) as resp:
            orjson.loads(await resp.read())
        count += 1
    return count


async def poll_all(url: str, ids: list[str], concurrency: int) -> int:
    """Poll every id once with ``concurrency`` workers; return how many were answered."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        shared = iter(ids)
        counts = await asyncio.gather(*(_worker(session, url, shared) for _ in range(concurrency)))
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--url", required=True, help="the endpoint, e.g. .../ai/completions")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with open(args.ids, newline="") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)]
    started = time.perf_counter()
    try:
        import uvloop

        answered = uvloop.run(poll_all(args.url, ids, args.concurrency))
    except ImportError:  # pragma: no cover
        answered = asyncio.run(poll_all(args.url, ids, args.concurrency))
    elapsed = time.perf_counter() - started
    sys.stdout.write(orjson.dumps({"answered": answered, "elapsed_s": elapsed}).decode() + "\n")


if __name__ == "__main__":
    main()
