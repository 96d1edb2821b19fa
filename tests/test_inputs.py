"""``--ids`` compressed (gzip, zstd by suffix) and in object storage, still streamed."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from harvester.cli import main
from harvester.errors import ExitCode, InputError
from harvester.ids import IdReader, codec_of
from harvester.runner import harvest

from .conftest import TOKEN, ThreadedSimulator, fast_settings, make_ids, read_rows
from .moto_s3 import S3, s3, s3_endpoint

__all__ = ["s3", "s3_endpoint"]  # fixtures


def compressed(path: Path, text: str) -> Path:
    """``text`` written to ``path`` with the codec its suffix names (or plain)."""
    codec = codec_of(path)
    if codec is None:
        path.write_text(text, encoding="utf-8")
    elif codec == "gzip":  # as gzip(1) writes it
        path.write_bytes(gzip.compress(text.encode()))
    else:
        with pa.OSFile(str(path), "wb") as raw, pa.CompressedOutputStream(raw, codec) as out:
            out.write(text.encode())
    return path


def read_all(location: Path | str) -> tuple[list[str], int]:
    """Every id the reader yields, and its line count."""
    reader = IdReader(location, batch_size=100)
    values = [v for batch in reader.open() for v in batch.ids]
    return values, reader.count_lines()


@pytest.mark.parametrize("name", ["ids.csv", "ids.csv.gz", "ids.csv.zst", "IDS.CSV.ZST"])
@pytest.mark.parametrize("header", [True, False])
def test_compressed_inputs_read_like_plain_ones(name: str, header: bool, tmp_path: Path) -> None:
    """gzip and zstd (by suffix, any case) give the same ids and line count as plain text,
    with a header or one id per line, a BOM and a last line without its newline."""
    ids = make_ids(1234, seed=61)
    text = ("\ufeffid,x\n" + "".join(f"{i},é\n" for i in ids)) if header else "\n".join(ids)
    values, lines = read_all(compressed(tmp_path / name, text))
    assert values == ids
    assert lines == len(ids)


def test_gzip_is_a_stream_not_a_whole_read(tmp_path: Path) -> None:
    """A 200k-id gzip yields its first batch after reading a small part of the file (the
    codec streams; nothing decompresses the whole input up front)."""
    ids = make_ids(200_000, seed=62)
    path = tmp_path / "ids.csv.gz"
    path.write_bytes(gzip.compress(("id\n" + "\n".join(ids)).encode(), compresslevel=1))
    reader = IdReader(path, batch_size=10)
    batches = reader.open()
    assert next(batches).ids == ids[:10]
    reader.close()


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("bad.csv.gz", b"not gzip at all" * 10, "cannot read"),
        ("empty.csv.zst", b"", "cannot read|empty"),
        ("missing.csv.gz", None, "no such file"),
    ],
)
def test_a_broken_compressed_input_is_one_input_error(
    name: str, data: bytes | None, why: str, tmp_path: Path
) -> None:
    """A corrupt or empty compressed file, or a missing one, is an InputError (exit 2)."""
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(InputError, match=why):
        IdReader(path).open()


def test_a_zstd_input_in_s3_harvests_every_id(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--ids s3://bucket/ids.csv.zst is streamed from the bucket into a local DIR: one row
    per id, and the ETA's line count is right."""
    ids = make_ids(700, seed=63)
    local = compressed(tmp_path / "ids.csv.zst", "id\n" + "\n".join(ids) + "\n")
    s3.client().put_object(Bucket=s3.bucket, Key="in/ids.csv.zst", Body=local.read_bytes())
    uri = f"s3://{s3.bucket}/in/ids.csv.zst"
    values, lines = read_all(uri)
    assert (values, lines) == (ids, len(ids))
    out = tmp_path / "out"
    with ThreadedSimulator() as sim:
        result = asyncio.run(harvest(fast_settings(uri, out, sim.base_url)))
    assert result.exit_code == ExitCode.OK
    assert sorted(read_rows(out).column("id").to_pylist()) == sorted(ids)


def test_a_missing_s3_input_is_exit_2_with_one_line(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --ids object that does not exist exits 2, names it, and writes nothing."""
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)
    uri = f"s3://{s3.bucket}/nope/ids.csv.gz"
    code = main(["run", "--ids", uri, "--out", str(tmp_path / "out"), "--no-progress"])
    # (the in-process S3 server logs its requests to the same stderr: not harvester's lines)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("harvester")]
    assert code == ExitCode.USAGE
    assert len(err) == 1, err
    assert "no such file" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_gzip_truncated_midway_stops_with_an_input_error(tmp_path: Path) -> None:
    """A .gz cut in the middle reads its first ids, then fails with an InputError naming
    the file (no bare pyarrow error), never a silent end of input."""
    ids = make_ids(50_000, seed=64)
    data = gzip.compress(("\n".join(ids)).encode(), compresslevel=1)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    batches = IdReader(path, batch_size=1000).open()
    seen = 0

    def read_to_the_end() -> None:
        nonlocal seen
        for batch in batches:
            seen += len(batch.ids)

    with pytest.raises(InputError, match=r"cut\.csv\.gz"):
        read_to_the_end()
    assert 0 < seen < len(ids)
