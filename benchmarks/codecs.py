"""Which Parquet codec for the dataset: bytes on disk per row and MB/s encoded, by page size.

Rows are the simulator's realistic Completions (``sim/content.py``), so the text compresses
as real conversation pages do. Each codec encodes the same table ``--repeats`` times in one
thread; the figure is the median. MB/s is of the table's uncompressed Arrow bytes.

    python -m benchmarks.codecs --rows 2000 --repeats 3      # -> results/codecs.json
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from harvester.dataset import FILE_SCHEMA
from harvester.sim.content import build_completion
from harvester.storage import DICTIONARY_COLUMNS, PARQUET_OPTIONS

from ._common import save

# (codec, level, dictionary-encode every column?): each with dictionaries only where values
# repeat, as the dataset writes, and zstd-1 also with pyarrow's default of every column.
CANDIDATES = (
    ("zstd", 1, True),
    ("none", None),
    ("snappy", None),
    ("lz4", None),
    ("zstd", 1),
    ("zstd", 3),
    ("zstd", 6),
    ("gzip", 6),
    ("brotli", 1),
)


def table(rows: int, html_bytes: int) -> pa.Table:
    """``rows`` realistic completed rows in the dataset's file schema."""
    rng = random.Random(11)
    docs = []
    for i in range(rows):
        doc: dict[str, Any] = build_completion(
            rng.randbytes(32),
            model="chatgpt",
            fanouts=(2, 5),
            seed=11,
            html_bytes=html_bytes,
            targeted_share=0.3,
        )
        doc.update(id=f"{i:08d}-0000-4000-8000-000000000000", status="completed", polls=2)
        doc.update(harvested_at=1_780_000_000_000_000 + i, extra=None)
        docs.append(doc)
    return pa.Table.from_pylist(docs, schema=FILE_SCHEMA)


def measure(
    data: pa.Table, codec: str, level: int | None, repeats: int, *, every_dictionary: bool = False
) -> dict[str, Any]:
    """Median encode time and the encoded size of ``data`` with one codec."""
    times, size = [], 0
    for _ in range(repeats):
        sink = io.BytesIO()
        started = time.perf_counter()
        pq.write_table(
            data,
            sink,
            compression=codec,
            compression_level=level,
            row_group_size=data.num_rows,
            use_dictionary=True if every_dictionary else list(DICTIONARY_COLUMNS),
        )
        times.append(time.perf_counter() - started)
        size = sink.tell()
    seconds = statistics.median(times)
    name = codec if level is None else f"{codec}-{level}"
    chosen = (codec, level) == (
        PARQUET_OPTIONS["compression"],
        PARQUET_OPTIONS["compression_level"],
    )
    return {
        "codec": name + (" (every column a dictionary)" if every_dictionary else ""),
        "chosen": chosen and not every_dictionary,
        "bytes_per_row": round(size / data.num_rows),
        "ratio": round(data.nbytes / size, 2),
        "encode_mb_per_s": round(data.nbytes / seconds / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any] = {"rows": args.rows, "pages": {}}
    for html_bytes in (5_000, 200_000):
        rows = args.rows if html_bytes < 100_000 else max(50, args.rows // 20)
        data = table(rows, html_bytes)
        print(f"html ~{html_bytes} bytes: {rows} rows, {data.nbytes / rows:.0f} Arrow bytes/row")
        found = []
        for codec, level, *every in CANDIDATES:
            figures = measure(data, codec, level, args.repeats, every_dictionary=bool(every))
            found.append(figures)
            print(
                f"  {figures['codec']:38s} {figures['bytes_per_row']:8d} bytes/row  "
                f"x{figures['ratio']:5.2f}  {figures['encode_mb_per_s']:7.1f} MB/s"
                + ("  <- the dataset's" if figures["chosen"] else "")
            )
        result["pages"][str(html_bytes)] = {"rows": rows, "codecs": found}
    print(f"-> {save('codecs', result)}")


if __name__ == "__main__":
    main()
