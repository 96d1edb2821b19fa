"""Hostile input files: parsed as documented, or invalid rows; --strict stops at the first."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.cli import main
from harvester.errors import ExitCode, InputError
from harvester.ids import IdReader
from harvester.runner import harvest

from .conftest import TOKEN, ThreadedSimulator, fast_settings, make_ids, read_rows

CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def hostile_file(path: Path, ids: list[str]) -> tuple[int, int]:
    """Every trick at once; returns (unique valid ids, unique invalid values) it holds."""
    rng = random.Random(5)
    spellings: list[Callable[[str], str]] = [
        lambda u: u,
        lambda u: u.upper(),
        lambda u: "{" + u + "}",
        lambda u: "urn:uuid:" + u,
        lambda u: u.replace("-", ""),
        lambda u: f"  {u}\t",
        lambda u: f'"{u}"',
    ]
    lines = [b"\xef\xbb\xbfname,id,extra"]  # BOM, and the id is not the first column
    for i, u in enumerate(ids):
        value = rng.choice(spellings)(u)
        lines.append(f'"row {i}, quoted",{value},x,y,z'.encode())
        if i % 10 == 0:
            lines.append(f"dup,{u.upper()}".encode())  # 10% duplicates in another spelling
        if i % 25 == 0:
            lines.append(b"")  # blank lines
    lines.append(b"long," + b"a" * 200_000)  # a very long line
    lines.append(b"latin1," + "caf\xe9".encode("latin-1"))  # not UTF-8
    # Binary garbage, minus the bytes that CSV gives a meaning to (line ends, comma, quote).
    garbage = bytes(b for b in (rng.randrange(1, 256) for _ in range(300)) if b not in b'\r\n,"')
    lines.append(b"garbage," + garbage)
    lines.append(b"short")  # no id column on this row: skipped
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")  # CRLF
    return len(ids), 3


def test_hostile_csv_is_parsed_as_documented(tmp_path: Path) -> None:
    """BOM, CRLF, quotes, extra columns, blanks, odd spellings and junk: ids found, junk invalid."""
    ids = make_ids(300)
    path = tmp_path / "hostile.csv"
    hostile_file(path, ids)
    batches = list(IdReader(path).open())
    valid = {i for b in batches for i, ok in zip(b.ids, b.valid, strict=True) if ok}
    invalid = [i for b in batches for i, ok in zip(b.ids, b.valid, strict=True) if not ok]
    assert valid == set(ids)
    assert len(invalid) == 3
    assert all(len(value) <= 1024 for value in invalid)


async def test_hostile_csv_harvest_counts(tmp_path: Path) -> None:
    """The whole run: each unique id once, duplicates counted, junk as invalid rows."""
    from harvester.sim import Simulator

    ids = make_ids(200)
    path = tmp_path / "hostile.csv"
    hostile_file(path, ids)
    async with Simulator(token=TOKEN, profile="instant") as sim:
        result = await harvest(fast_settings(path, tmp_path / "out", sim.base_url))
    s = result.summary
    assert result.exit_code == ExitCode.OK
    assert s["unique_ids"] == 203
    assert s["invalid"] == 3
    assert s["duplicates"] == 20
    assert read_rows(tmp_path / "out").num_rows == 203


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [(b"not-a-uuid", "not a uuid"), (b"caf\xe9", "not valid UTF-8")],
)
def test_strict_stops_at_the_first_bad_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    bad_line: bytes,
    reason: str,
) -> None:
    """--strict: exit 2 and one line naming the file, the line number and the reason."""
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)
    ids = make_ids(5)
    path = tmp_path / "ids.csv"
    path.write_bytes(
        b"id\n" + "\n".join(ids[:3]).encode() + b"\n" + bad_line + b"\n" + ids[3].encode()
    )
    with ThreadedSimulator() as sim:
        code = main(
            ["run", "--ids", str(path), "--out", str(tmp_path / "out"), "--base-url",
             sim.base_url, "--strict", "--no-progress"]
        )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("harvester: error:")
    assert f"{path}:5: {reason}" in err[-1]
    assert len([line for line in err if "Traceback" in line]) == 0


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4000), header=st.sampled_from([b"id\n", b"", b"\xef\xbb\xbfid\r\n"]))
def test_reader_never_crashes_on_arbitrary_bytes(
    tmp_path: Path, data: bytes, header: bytes
) -> None:
    """Any bytes: an InputError at open, or batches whose valid values are canonical uuids."""
    path = tmp_path / "fuzz.csv"
    path.write_bytes(header + data)
    try:
        batches = list(IdReader(path).open())
    except InputError:
        return
    for batch in batches:
        assert len(batch.ids) == len(batch.valid) == len(batch.keys) == len(batch.lines)
        for value, ok, key in zip(
            batch.ids, batch.valid, batch.keys.tobytes().__iter__(), strict=False
        ):
            del key
            if ok:
                assert CANONICAL.fullmatch(value)
            else:
                assert len(value) <= 1024


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.uuids(), min_size=1, max_size=50), st.randoms())
def test_reader_finds_every_uuid_in_any_spelling(
    tmp_path: Path, uuids: list[uuid.UUID], rnd: random.Random
) -> None:
    """Whatever accepted spelling and quoting each id has, the reader yields its canonical form."""
    forms: list[Callable[[uuid.UUID], str]] = [
        str,
        lambda u: str(u).upper(),
        lambda u: u.hex,
        lambda u: u.urn,
        lambda u: "{" + str(u) + "}",
    ]
    lines = ["id"] + [
        f'"{rnd.choice(forms)(u)}"' if rnd.random() < 0.3 else rnd.choice(forms)(u) for u in uuids
    ]
    path = tmp_path / "ids.csv"
    path.write_text("\r\n".join(lines), encoding="utf-8")
    found = [i for b in IdReader(path).open() for i, ok in zip(b.ids, b.valid, strict=True) if ok]
    assert found == [str(u) for u in uuids]
