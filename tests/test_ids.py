"""Tests of id normalisation, id keys and the streaming CSV reader."""

from __future__ import annotations

import csv
import io
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.errors import InputError
from harvester.ids import (
    MAX_INVALID_CHARS,
    Batch,
    IdReader,
    classify,
    invalid_key,
    invalid_value,
    normalise,
    uuid_key,
)

CANONICAL_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
U1 = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
U2 = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
U3 = "00000000-0000-0000-0000-000000000000"


def read_all(path: Path, *, id_column: str = "id", batch_size: int = 4096) -> list[Batch]:
    """Every batch an ``IdReader`` yields for ``path``."""
    return list(IdReader(path, id_column=id_column, batch_size=batch_size).open())


def flat(batches: list[Batch]) -> tuple[list[str], list[bool], list[int]]:
    """Ids, validity and line numbers of all batches, concatenated."""
    ids = [value for batch in batches for value in batch.ids]
    valid = [flag for batch in batches for flag in batch.valid]
    lines = [line for batch in batches for line in batch.lines]
    return ids, valid, lines


def raw(batch: Batch) -> list[bytes]:
    """Each 16-byte key exactly (``tolist`` would strip trailing NUL bytes)."""
    data = batch.keys.tobytes()
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def write(tmp_path: Path, data: str | bytes, name: str = "ids.csv") -> Path:
    """Write ``data`` (text as UTF-8, without newline translation) and return the path."""
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# -- normalise --------------------------------------------------------------------------------


def test_normalise_canonical_passes_unchanged() -> None:
    """A canonical lowercase hyphenated uuid is returned as it is."""
    assert normalise(U1) == U1


@pytest.mark.parametrize(
    "spelling",
    [
        U1.upper(),
        "{" + U1 + "}",
        "{" + U1.upper() + "}",
        "urn:uuid:" + U1,
        "URN:UUID:" + U1.upper(),
        U1.replace("-", ""),
        U1.replace("-", "").upper(),
        "  " + U1 + "\t",
        "\r\n" + U1.upper() + " \n",
        " {" + U1 + "} ",
    ],
)
def test_normalise_lenient_spellings_become_canonical(spelling: str) -> None:
    """Case, braces, the urn prefix, missing hyphens and surrounding space all normalise."""
    assert normalise(spelling) == U1


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "garbage",
        "id",
        U1[:-1],  # 35 chars
        U1 + "0",  # 37 chars
        U1[:-1] + "g",  # non-hex
        "{" + U1,  # opening brace without a closing one
        U1 + "}",  # closing brace without an opening one
        "{" + U1 + "}}",
        "3f2504e-04f89-11d3-9a0c-0305e82c3301",  # hyphen in the wrong place
        U1.replace("-", "") + "0",
        "urn:uuid:",
        "uuid:" + U1,
        U1 + " " + U2,
        U1.replace("-", "_"),
    ],
)
def test_normalise_rejects_non_uuids(raw: str) -> None:
    """Garbage, wrong lengths, non-hex digits and unbalanced braces are not uuids."""
    assert normalise(raw) is None


_SPACE = st.sampled_from(["", " ", "  ", "\t", "\n", "\r\n", " \t "])


@given(
    u=st.uuids(),
    hyphens=st.booleans(),
    braces=st.booleans(),
    urn=st.booleans(),
    upper=st.lists(st.booleans(), min_size=36, max_size=36),
    before=_SPACE,
    after=_SPACE,
)
def test_normalise_every_accepted_spelling_gives_canonical(
    u: uuid.UUID,
    hyphens: bool,
    braces: bool,
    urn: bool,
    upper: list[bool],
    before: str,
    after: str,
) -> None:
    """Any mix of case, hyphens, braces, urn prefix and outer space gives ``str(u)``."""
    text = "".join(c.upper() if up else c for c, up in zip(str(u), upper, strict=True))
    if not hyphens:
        text = text.replace("-", "")
    if braces:
        text = "{" + text + "}"
    if urn:
        text = "urn:uuid:" + text
    assert normalise(before + text + after) == str(u)


_NEAR_UUID = st.text(alphabet="0123456789abcdefABCDEFgG-{}urnid: \t", max_size=50)


@given(raw=st.one_of(st.text(max_size=60), _NEAR_UUID))
def test_normalise_never_raises_and_returns_canonical_or_none(raw: str) -> None:
    """For any text the result is None or a canonical uuid that round-trips through uuid."""
    result = normalise(raw)
    if result is not None:
        assert CANONICAL_RE.fullmatch(result)
        assert str(uuid.UUID(result)) == result


@given(u=st.uuids())
def test_normalise_is_idempotent(u: uuid.UUID) -> None:
    """Normalising a canonical value again changes nothing."""
    once = normalise(str(u).upper())
    assert once is not None
    assert normalise(once) == once


# -- keys -------------------------------------------------------------------------------------


@given(u=st.uuids())
def test_uuid_key_is_the_uuid_bytes(u: uuid.UUID) -> None:
    """``uuid_key`` is the 16 raw bytes of the uuid."""
    assert uuid_key(str(u)) == u.bytes


def test_uuid_key_of_nil_uuid_is_zeros() -> None:
    """The nil uuid's key is sixteen zero bytes, also once packed by ``classify``."""
    assert uuid_key(U3) == bytes(16)
    assert raw(classify([U3], [1])) == [bytes(16)]


@given(u=st.uuids())
def test_invalid_key_differs_from_uuid_keys(u: uuid.UUID) -> None:
    """The key of an invalid value is never the key of a uuid, even of its own spelling."""
    for spelling in (str(u), str(u).upper(), u.hex, str(u) + "x"):
        assert invalid_key(spelling) != u.bytes
        assert invalid_key(spelling) != uuid_key(str(u))


def test_invalid_key_is_stable_and_16_bytes() -> None:
    """The same value always gives the same 16-byte key; different values differ."""
    assert invalid_key("garbage") == invalid_key("garbage")
    assert len(invalid_key("garbage")) == 16
    assert invalid_key("garbage") != invalid_key("garbage ")
    assert invalid_key("") != invalid_key("\x00")


def test_invalid_value_trims_and_clips() -> None:
    """An invalid row stores the trimmed value, clipped to ``MAX_INVALID_CHARS``."""
    assert invalid_value("  junk \n") == "junk"
    assert invalid_value("x" * 5000) == "x" * MAX_INVALID_CHARS


def test_classify_marks_validity_and_keys() -> None:
    """``classify`` canonicalises uuids, keeps invalid values, and keys both kinds."""
    batch = classify([U1.upper(), " nope "], [1, 2])
    assert batch.ids == [U1, "nope"]
    assert batch.valid == [True, False]
    assert raw(batch) == [uuid_key(U1), invalid_key("nope")]
    assert batch.lines == [1, 2]


# -- IdReader: reading ------------------------------------------------------------------------


def test_reader_header_with_other_columns(tmp_path: Path) -> None:
    """The ``id`` column is found among others and read in order."""
    path = write(tmp_path, f"name,id,score\na,{U1},1\nb,{U2},2\n")
    ids, valid, lines = flat(read_all(path))
    assert ids == [U1, U2]
    assert valid == [True, True]
    assert lines == [2, 3]


@pytest.mark.parametrize(
    ("header", "option"),
    [
        ("conversation_id", "conversation_id"),
        ("Conversation_ID", "conversation_id"),
        ("cid", "CID"),
    ],
)
def test_reader_id_column_option_is_case_insensitive(
    tmp_path: Path, header: str, option: str
) -> None:
    """``--id-column`` names another column, matched without regard to case."""
    path = write(tmp_path, f"id,{header}\nnot-this,{U1}\n")
    ids, valid, _ = flat(read_all(path, id_column=option))
    assert ids == [U1]
    assert valid == [True]


def test_reader_header_name_is_trimmed(tmp_path: Path) -> None:
    """Spaces around a header name do not hide the column."""
    path = write(tmp_path, f"x, id \n1,{U1}\n")
    assert flat(read_all(path))[0] == [U1]


def test_reader_headerless_one_id_per_line(tmp_path: Path) -> None:
    """A file with no header and one id per line is read from its first line."""
    path = write(tmp_path, f"{U1}\n{U2.upper()}\nnope\n")
    ids, valid, lines = flat(read_all(path))
    assert ids == [U1, U2, "nope"]
    assert valid == [True, True, False]
    assert lines == [1, 2, 3]


def test_reader_headerless_after_leading_blank_lines(tmp_path: Path) -> None:
    """In a headerless file that starts with blank lines, the first id has its real line."""
    path = write(tmp_path, f"\n\n{U1}\n{U2}\n")
    ids, _, lines = flat(read_all(path))
    assert ids == [U1, U2]
    assert lines == [3, 4]


@pytest.mark.parametrize("header", [True, False])
def test_reader_skips_utf8_bom(tmp_path: Path, header: bool) -> None:
    """A UTF-8 byte order mark neither hides the header nor spoils the first id."""
    text = ("id\n" if header else "") + f"{U1}\n{U2}\n"
    path = write(tmp_path, b"\xef\xbb\xbf" + text.encode())
    ids, valid, _ = flat(read_all(path))
    assert ids == [U1, U2]
    assert valid == [True, True]


def test_reader_crlf_line_endings(tmp_path: Path) -> None:
    """CRLF files read the same as LF files, with the same line numbers."""
    path = write(tmp_path, f"id,x\r\n{U1},a\r\n\r\n{U2},b\r\n")
    ids, valid, lines = flat(read_all(path))
    assert ids == [U1, U2]
    assert valid == [True, True]
    assert lines == [2, 4]


def test_reader_quoted_fields(tmp_path: Path) -> None:
    """Quoted ids, quoted commas and doubled quotes in other columns are parsed as CSV."""
    path = write(
        tmp_path,
        f'"note","id"\n"a, b","{U1}"\n"say ""hi"""," {U2.upper()} "\n"x,y","not, a uuid"\n',
    )
    ids, valid, lines = flat(read_all(path))
    assert ids == [U1, U2, "not, a uuid"]
    assert valid == [True, True, False]
    assert lines == [2, 3, 4]


def test_reader_blank_lines_and_empty_ids_are_skipped(tmp_path: Path) -> None:
    """Blank lines, empty id cells and short rows yield nothing; line numbers stay true."""
    path = write(tmp_path, f"x,id\n\n1,{U1}\n2,\n3\n   \n4,  \n5,{U2}\n\n")
    ids, _, lines = flat(read_all(path))
    assert ids == [U1, U2]
    assert lines == [3, 8]


def test_reader_flags_invalid_values_clipped(tmp_path: Path) -> None:
    """Invalid values stay as rows (valid=False), trimmed and clipped to the limit."""
    long_value = "z" * (MAX_INVALID_CHARS + 500)
    path = write(tmp_path, f"id\n  junk  \n{long_value}\n{U1}\n")
    batches = read_all(path)
    ids, valid, lines = flat(batches)
    assert ids == ["junk", "z" * MAX_INVALID_CHARS, U1]
    assert valid == [False, False, True]
    assert lines == [2, 3, 4]
    keys = [key for batch in batches for key in raw(batch)]
    assert keys == [invalid_key("junk"), invalid_key("z" * MAX_INVALID_CHARS), uuid_key(U1)]


def test_reader_batches_of_batch_size(tmp_path: Path) -> None:
    """Values come in batches of exactly ``batch_size``, the last one shorter."""
    values = [str(uuid.UUID(int=i)) for i in range(1, 24)]
    path = write(tmp_path, "id\n" + "\n".join(values) + "\n")
    batches = read_all(path, batch_size=5)
    assert [len(batch.ids) for batch in batches] == [5, 5, 5, 5, 3]
    assert [len(batch.keys) for batch in batches] == [5, 5, 5, 5, 3]
    ids, _, lines = flat(batches)
    assert ids == values
    assert lines == list(range(2, 25))


def test_reader_exact_multiple_of_batch_size(tmp_path: Path) -> None:
    """No empty trailing batch when the count is a multiple of ``batch_size``."""
    values = [str(uuid.UUID(int=i)) for i in range(1, 7)]
    path = write(tmp_path, "\n".join(values))
    assert [len(batch.ids) for batch in read_all(path, batch_size=3)] == [3, 3]


def test_reader_size_and_line_count(tmp_path: Path) -> None:
    """``size_bytes`` is set by ``open`` and ``count_lines`` bounds the number of ids."""
    path = write(tmp_path, f"id\n{U1}\n{U2}\n")
    reader = IdReader(path)
    list(reader.open())
    assert reader.size_bytes == path.stat().st_size
    assert reader.count_lines() >= 2


# -- IdReader: errors -------------------------------------------------------------------------


def test_reader_missing_file(tmp_path: Path) -> None:
    """A missing file is an ``InputError`` that names it."""
    path = tmp_path / "absent.csv"
    with pytest.raises(InputError, match="no such file") as info:
        IdReader(path).open()
    assert str(path) in str(info.value)


def test_reader_directory(tmp_path: Path) -> None:
    """A directory is an ``InputError`` saying so."""
    with pytest.raises(InputError, match="is a directory"):
        IdReader(tmp_path).open()


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n  \n"])
def test_reader_empty_or_whitespace_file(tmp_path: Path, data: bytes) -> None:
    """An empty or whitespace-only file is an ``InputError`` calling it empty."""
    with pytest.raises(InputError, match="empty"):
        IdReader(write(tmp_path, data)).open()


def test_reader_bom_only_file(tmp_path: Path) -> None:
    """A file holding only a byte order mark is an ``InputError``, not an empty run."""
    with pytest.raises(InputError, match="no rows"):
        IdReader(write(tmp_path, b"\xef\xbb\xbf\n\n")).open()


def test_reader_binary_file(tmp_path: Path) -> None:
    """A file with NUL bytes is an ``InputError`` calling it binary."""
    path = write(tmp_path, b"PK\x03\x04\x00\x00\x08\x00" + bytes(range(256)))
    with pytest.raises(InputError, match="binary"):
        IdReader(path).open()


def test_reader_header_without_id_column(tmp_path: Path) -> None:
    """A header lacking the column says which column and how to name another one."""
    path = write(tmp_path, f"name,uuid\na,{U1}\n")
    with pytest.raises(InputError) as info:
        IdReader(path).open()
    message = str(info.value)
    assert "'id'" in message
    assert "--id-column" in message
    assert "'name'" in message
    assert "'uuid'" in message


def test_reader_wrong_id_column_option(tmp_path: Path) -> None:
    """A ``--id-column`` absent from the header is named in the error."""
    path = write(tmp_path, f"id\n{U1}\n")
    with pytest.raises(InputError, match="'conversation'"):
        IdReader(path, id_column="conversation").open()


def test_reader_oversized_first_field(tmp_path: Path) -> None:
    """A first line with a field past the CSV limit (say, a huge JSON file) is an InputError."""
    path = write(tmp_path, b"x" * (17 * 1024 * 1024) + b"\n")
    with pytest.raises(InputError, match="CSV"):
        IdReader(path).open()


def test_reader_oversized_later_field(tmp_path: Path) -> None:
    """A field past the CSV limit becomes an invalid value naming its line; reading goes on."""
    body = f"id\n{U1}\n".encode() + b"y" * (17 * 1024 * 1024) + f"\n{U2}\n".encode()
    path = write(tmp_path, body)
    batches = list(IdReader(path).open())
    ids = [i for b in batches for i in b.ids]
    valid = [v for b in batches for v in b.valid]
    assert ids[0] == U1
    assert ids[2] == U2
    assert ids[1].startswith("line 3: not valid CSV")
    assert valid == [True, False, True]


def test_reader_oversized_later_field_strict(tmp_path: Path) -> None:
    """With --strict the same line stops the read with an InputError naming it."""
    path = write(tmp_path, f"id\n{U1}\n".encode() + b"y" * (17 * 1024 * 1024) + b"\n")
    with pytest.raises(InputError, match=r":3: not valid CSV"):
        list(IdReader(path, strict=True).open())


def test_reader_headerless_junk_first_line(tmp_path: Path) -> None:
    """One column whose first value is not a uuid is treated as a header without ``id``."""
    path = write(tmp_path, f"junk\n{U1}\n")
    with pytest.raises(InputError, match="--id-column"):
        IdReader(path).open()


# -- IdReader: property -----------------------------------------------------------------------

_JUNK = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r\n"),
    max_size=40,
).filter(lambda s: bool(s.strip()) and normalise(s) is None)
_VALUE = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: u.hex.upper()), _JUNK)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_VALUE, min_size=1, max_size=40), batch_size=st.integers(1, 7))
def test_reader_round_trips_csv_in_order(
    tmp_path: Path, values: list[str], batch_size: int
) -> None:
    """Uuids and junk written as CSV come back in order, with the right validity and lines."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["other", "id"])
    for n, value in enumerate(values):
        writer.writerow([str(n), value])
    path = write(tmp_path, buffer.getvalue(), name="prop.csv")
    ids, valid, lines = flat(read_all(path, batch_size=batch_size))
    assert lines == list(range(2, len(values) + 2))
    expected = [normalise(v) or invalid_value(v) for v in values]
    assert ids == expected
    assert valid == [normalise(v) is not None for v in values]
