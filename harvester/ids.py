"""Reading conversation ids: normalisation to canonical uuids and a streaming CSV reader.

The reader never holds the file: it yields batches of a few thousand values, each with the
16-byte key that the compact ``IdSet`` stores. Values that are not uuids are kept (clipped)
so that they become ``invalid`` rows instead of vanishing. The file may be local or in object
storage (``s3://...``), and gzip- or zstd-compressed by its suffix (``.gz``, ``.zst``):
decompressed as it streams, by pyarrow's own codecs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import pyarrow as pa

from .errors import InputError
from .idset import Keys, Mask, as_keys
from .storage import open_input

if TYPE_CHECKING:
    from _csv import Reader

# Canonical form: what the API issues and what the dataset stores.
CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Forms people paste: any case, with or without hyphens, in braces or as a urn.
_LENIENT = re.compile(
    r"(?:urn:uuid:)?(\{)?([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?"
    r"([0-9a-f]{12})(?(1)\})",
    re.IGNORECASE,
)
MAX_INVALID_CHARS = 1024  # an invalid value is stored (and deduplicated) by its first 1024 chars
_SNIFF_BYTES = 64 * 1024
_FIELD_LIMIT = 16 * 1024 * 1024
# Compressed inputs, by suffix, and the pyarrow codec that reads them.
CODECS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def codec_of(location: str | Path) -> str | None:
    """The codec an input is compressed with, by its suffix (None: plain text)."""
    name = str(location).rsplit("/", 1)[-1].lower()
    return next((codec for suffix, codec in CODECS.items() if name.endswith(suffix)), None)


def open_binary(location: str | Path) -> tuple[pa.NativeFile, int]:
    """A stream of the input's bytes, decompressed, and its size as stored (for messages)."""
    raw, size = open_input(location)
    codec = codec_of(location)
    if codec is None:
        return raw, size
    return pa.CompressedInputStream(raw, codec), size


def normalise(raw: str) -> str | None:
    """Canonical lowercase hyphenated uuid for ``raw``, or None when it is not a uuid."""
    value = raw.strip()
    if CANONICAL.fullmatch(value):
        return value
    match = _LENIENT.fullmatch(value)
    if match is None:
        return None
    a, b, c, d, e = (part.lower() for part in match.groups()[1:])
    return f"{a}-{b}-{c}-{d}-{e}"


def uuid_key(canonical: str) -> bytes:
    """The 16 raw bytes of a canonical uuid: its key in an ``IdSet``."""
    return bytes.fromhex(canonical.replace("-", ""))


def invalid_value(raw: str) -> str:
    """What an invalid row stores as its id: the trimmed value, clipped."""
    return raw.strip()[:MAX_INVALID_CHARS]


def invalid_key(stored: str) -> bytes:
    """Key of an invalid value; a keyed hash so it cannot collide with a uuid's bytes."""
    data = stored.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16, person=b"harvester-inval").digest()


@dataclass(slots=True)
class Batch:
    """A run of input values: ``ids[i]`` is canonical when ``valid[i]``, else the clipped raw."""

    ids: list[str]
    valid: list[bool]
    keys: Keys
    lines: list[int]

    def select(self, mask: Mask) -> Batch:
        """The values where ``mask`` is true, in order."""
        picked = mask.nonzero()[0].tolist()
        return Batch(
            [self.ids[i] for i in picked],
            [self.valid[i] for i in picked],
            self.keys[mask],
            [self.lines[i] for i in picked],
        )


def classify(values: list[str], lines: list[int]) -> Batch:
    """Normalise a run of raw values and compute their keys."""
    ids: list[str] = []
    valid: list[bool] = []
    keys: list[bytes] = []
    for raw in values:
        canonical = normalise(raw)
        if canonical is None:
            stored = invalid_value(raw)
            ids.append(stored)
            valid.append(False)
            keys.append(invalid_key(stored))
        else:
            ids.append(canonical)
            valid.append(True)
            keys.append(uuid_key(canonical))
    return Batch(ids, valid, as_keys(keys), lines)


class IdReader:
    """Streams ids from a CSV with a header naming the id column, or one id per line."""

    def __init__(
        self,
        path: Path | str,
        *,
        id_column: str = "id",
        batch_size: int = 4096,
        strict: bool = False,
    ) -> None:
        self.path = path
        self.id_column = id_column
        self.batch_size = batch_size
        self.strict = strict  # stop at the first value that is not a uuid
        self.has_header = True  # known once open() has read the first row
        self._handle: TextIO | None = None
        self.size_bytes = 0

    def open(self) -> Iterator[Batch]:
        """Check the file and return an iterator of batches; raises ``InputError`` with a reason."""
        self.size_bytes = self._check_file()
        csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
        raw, _ = self._open_binary()
        handle = self._handle = io.TextIOWrapper(
            raw,  # a pyarrow stream is a binary file object
            encoding="utf-8-sig",
            errors="replace",
            newline="",
        )
        rows = csv.reader(handle)
        try:
            column, first = self._locate_column(rows)
        except csv.Error as exc:
            handle.close()
            raise InputError(f"{self.path}:{rows.line_num}: not valid CSV ({exc})") from exc
        except BaseException:
            handle.close()
            raise
        return self._batches(handle, rows, column, first)

    def close(self) -> None:
        """Close the file; needed only when the batches are abandoned before they start."""
        if self._handle is not None:
            self._handle.close()

    def count_lines(self) -> int:
        """Cheap upper bound on the number of ids (lines, less the header), for the ETA."""
        count, last = 0, b"\n"
        handle, _ = self._open_binary()
        with handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
                last = chunk[-1:]
        count += last != b"\n"  # a last line without its newline
        return max(count - self.has_header, 0)

    def _open_binary(self) -> tuple[pa.NativeFile, int]:
        try:
            return open_binary(self.path)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, not a CSV file") from None
        except PermissionError as exc:
            raise InputError(f"{self.path}: cannot read it ({exc.strerror})") from exc
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self.path}: cannot read it ({exc})") from exc

    def _check_file(self) -> int:
        handle, size = self._open_binary()
        try:
            with handle:
                head = handle.read(_SNIFF_BYTES)
        except (OSError, pa.ArrowException) as exc:
            # A truncated or corrupt .gz/.zst fails here, before any request.
            raise InputError(f"{self.path}: cannot read it ({exc})") from exc
        if not head.strip():
            raise InputError(f"{self.path}: the file is empty; give a CSV of ids")
        if b"\x00" in head:
            raise InputError(f"{self.path}: looks binary (NUL bytes); give a CSV of ids")
        return size

    def _locate_column(self, rows: Reader) -> tuple[int, tuple[str, int] | None]:
        """Index of the id column, and the first value and its line for a headerless file."""
        first = next((row for row in rows if any(cell.strip() for cell in row)), None)
        if first is None:
            raise InputError(f"{self.path}: the file has no rows")
        wanted = self.id_column.strip().lower()
        names = [cell.strip().strip("\ufeff").lower() for cell in first]
        if wanted in names:
            return names.index(wanted), None
        if len(first) == 1 and normalise(first[0]) is not None:
            self.has_header = False
            return 0, (first[0], rows.line_num)  # headerless: one id per line
        shown = ", ".join(repr(cell) for cell in first[:5])
        raise InputError(
            f"{self.path}: no {self.id_column!r} column in the header ({shown}); "
            "name the column with --id-column, or give one id per line"
        )

    def _batches(
        self, handle: TextIO, reader: Reader, column: int, first: tuple[str, int] | None
    ) -> Iterator[Batch]:
        values: list[str] = []
        lines: list[int] = []
        try:
            if first is not None:
                values.append(first[0])
                lines.append(first[1])
            while (value := self._next_value(reader, column)) is not None:
                values.append(value)
                lines.append(reader.line_num)
                if len(values) >= self.batch_size:
                    yield self._classify(values, lines)
                    values, lines = [], []
            if values:
                yield self._classify(values, lines)
        finally:
            handle.close()

    def _next_value(self, reader: Reader, column: int) -> str | None:
        """The next id value (None at the end); blank lines and rows without one are skipped."""
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return None
            except (OSError, pa.ArrowException) as exc:  # a .gz/.zst corrupt past its start
                raise InputError(f"{self.path}:{reader.line_num}: cannot read on ({exc})") from exc
            except csv.Error as exc:
                # A line the csv module cannot take (say, a field over 16 MiB) becomes an
                # invalid row naming the line, and reading goes on; --strict stops here.
                reason = f"not valid CSV ({exc})"
                if self.strict:
                    raise InputError(f"{self.path}:{reader.line_num}: {reason}") from exc
                return f"line {reader.line_num}: {reason}"
            if column < len(row) and row[column].strip():
                return row[column]

    def _classify(self, values: list[str], lines: list[int]) -> Batch:
        batch = classify(values, lines)
        if self.strict and not all(batch.valid):
            bad = batch.valid.index(False)
            value = values[bad].strip()
            reason = "not valid UTF-8" if "\ufffd" in value else "not a uuid"
            shown = value if len(value) <= 60 else value[:57] + "..."
            raise InputError(f"{self.path}:{lines[bad]}: {reason}: {shown!r}")
        return batch
