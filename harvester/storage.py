"""Where the dataset lives: a local directory or an object store, behind one small interface.

``--out`` (and ``--ids``) take a local path or a URI. ``parse_location`` tells them apart and
refuses a scheme nothing here can open (exit 2, never a local folder named ``s3:``);
``open_store`` gives the ``Store`` of a dataset root. A ``Store`` does the few things the
dataset, the sink, the leases and compaction need: list the committed files, commit one file
atomically, keep small metadata objects, delete, and (on S3) create an object only if absent.

- ``LocalStore``: a directory; a file is written under a hidden temporary name, fsynced and
  renamed, so it is complete whenever it is visible.
- ``ObjectStore``: any pyarrow filesystem (``gs://``, ``az://`` where pyarrow has them);
  ``S3Store``: ``s3://bucket/prefix``, listed and read through ``pyarrow.fs.S3FileSystem``,
  written with one ``PutObject`` per file through boto3 (a PUT is atomic: an object is final
  when it appears, and no multipart upload is ever started, so a crash leaves nothing behind),
  and the only store with conditional writes (``If-None-Match: *`` / ``If-Match``) for leases.
"""

from __future__ import annotations

import contextlib
import email.utils
import itertools
import os
import re
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import OutputError, UsageError
from .model import TARGETING_FIELDS

META_DIR = "_harvester"
# A committed data file, relative to the root: readers take these and nothing else.
DATA_FILE = re.compile(r"harvest_date=[^/]+/model_key=[^/]+/part-[^/]+\.parquet")
_OLD_LAYOUT = re.compile(r"harvest_date=[^/]+/model=[^/]+/")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)", re.DOTALL)
_PYARROW_SCHEMES = {"gs": "GcsFileSystem", "gcs": "GcsFileSystem", "abfs": "AzureFileSystem",
                    "abfss": "AzureFileSystem", "az": "AzureFileSystem"}  # fmt: skip
S3_INSTALL = "pip install 'harvester[s3]'"


def known_schemes() -> set[str]:
    """URI schemes this installation can open: s3, file, what pyarrow was built with, and
    any fsspec protocol when fsspec is installed."""
    schemes = {"s3", "file"}
    schemes.update(name for name, cls in _PYARROW_SCHEMES.items() if hasattr(pafs, cls))
    try:
        import fsspec
    except ImportError:
        return schemes
    return schemes | set(fsspec.available_protocols())


def parse_location(text: str | Path, what: str = "--out") -> str | Path:
    """A local path as a ``Path``, a URI as its text; a scheme nothing can open is a usage
    error (exit 2), and ``s3:/x`` (a URI a ``Path`` has squashed) is refused, not a folder."""
    raw = str(text)
    match = _SCHEME.fullmatch(raw)
    if match is None:
        return Path(text)
    scheme, rest = match[1].lower(), match[2]
    if not rest.startswith("//"):
        raise UsageError(
            f"{what} {raw}: looks like a URI without '//' (write {scheme}://...); "
            f"for a local path with ':' in its name write ./{raw}"
        )
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(raw).path))
    if scheme not in known_schemes():
        raise UsageError(
            f"{what} {raw}: unknown scheme {scheme!r}; give a local path or s3://bucket/prefix"
            " (gs:// and az:// where pyarrow has them, other schemes with fsspec installed)"
        )
    return raw


class Store(ABC):
    """A dataset root: the operations the dataset, sink, leases and compaction need.

    Paths handed out (``committed_files``) are in ``filesystem`` terms, as pyarrow takes them;
    ``rel`` arguments are ``/``-separated paths relative to the root.
    """

    url: str  # as shown in messages and the summary
    base: str  # the root in ``filesystem`` terms
    # Called before every commit; a lease that can expire sets it to refuse commits once it
    # may have been taken over (see lease.py).
    fence: Callable[[], None] | None = None

    @property
    @abstractmethod
    def filesystem(self) -> pafs.FileSystem | None:
        """What pyarrow reads the files with (None: the local disk, paths as they are)."""

    def path(self, rel: str) -> str:
        """``rel`` in filesystem terms."""
        return f"{self.base}/{rel}" if rel else self.base

    def relative(self, path: str) -> str:
        """The inverse of ``path``."""
        return path[len(self.base) + 1 :]

    @abstractmethod
    def list_files(self, rel: str = "") -> list[tuple[str, int]]:
        """Every file under ``rel`` (recursively) as (filesystem path, size); [] if none."""

    def committed_files(self) -> list[str]:
        """The committed data files, sorted: a stray README, CSV or temporary never counts."""
        return sorted(p for p, _ in self.list_files() if DATA_FILE.fullmatch(self.relative(p)))

    def has_old_layout(self) -> bool:
        """True when the root holds ``model=`` partitions of harvester 0.x."""
        return any(_OLD_LAYOUT.match(self.relative(p)) for p, _ in self.list_files())

    @abstractmethod
    def commit(self, rel: str, table: Tables) -> int:
        """Write ``table`` (or tables, a row group each) as the Parquet file ``rel``, visible
        only once complete; its rows."""

    @abstractmethod
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Replace the small object ``rel`` atomically (reports, manifests)."""

    @abstractmethod
    def get_bytes(self, rel: str) -> bytes | None:
        """The object ``rel``, or None when there is none."""

    @abstractmethod
    def delete(self, rels: Iterable[str]) -> None:
        """Remove these objects; one already gone is no error."""

    @abstractmethod
    def list_names(self, rel: str) -> list[str]:
        """Names of the objects directly under ``rel`` ([] if none)."""

    @abstractmethod
    def commit_file(self, rel: str, local: Path) -> None:
        """Commit the finished local file ``local`` as ``rel`` (consuming it), visible only
        once complete: for files too big to build in memory (compaction)."""

    def open_input(self, rel: str) -> pa.NativeFile:
        """A stream reading ``rel``."""
        fs = self.filesystem or pafs.LocalFileSystem()
        return fs.open_input_stream(self.path(rel), compression=None)

    def check_fence(self) -> None:
        """Refuse to commit when the lease that allows it may be lost."""
        if self.fence is not None:
            self.fence()


# How every data file is encoded, chosen by ``benchmarks/codecs.py`` (the README's Performance
# section has the figures): zstd level 1 stores realistic pages in a ninth of their size (level 3
# saves 3% more at 0.85x the speed; lz4 is 1.6x faster but 1.7x larger), and dictionary
# encoding only for columns whose values repeat: tried on every column, it made encoding up
# to 1.25x slower for no smaller file.
DICTIONARY_COLUMNS = ("status", "model", *TARGETING_FIELDS)
# Min/max statistics only where a reader can skip row groups by them (ids, status, model,
# targeting, polls, time): computed over the page-sized text columns, they took a quarter of
# the encoding time of 200 KB pages and no reader uses them.
STATISTICS_COLUMNS = ("id", *DICTIONARY_COLUMNS, "polls", "harvested_at")
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": list(DICTIONARY_COLUMNS),
    "write_statistics": list(STATISTICS_COLUMNS),
}


# One table, or tables of one schema (at least one) written a row group each, as they come:
# the sink hands its flush over this way, so only one row group is in Arrow at a time.
Tables: TypeAlias = pa.Table | Iterable[pa.Table]


def write_parquet(table: Tables, where: Any) -> int:
    """``table`` as one Parquet file (one row group a table), encoded as every data file
    is; the rows written."""
    if isinstance(table, pa.Table):
        pq.write_table(table, where, row_group_size=max(1, table.num_rows), **PARQUET_OPTIONS)
        return int(table.num_rows)
    pieces: Iterator[pa.Table] = iter(table)
    first = next(pieces)
    rows = 0
    with pq.ParquetWriter(where, first.schema, **PARQUET_OPTIONS) as writer:
        for piece in itertools.chain([first], pieces):
            writer.write_table(piece, row_group_size=max(1, piece.num_rows))
            rows += piece.num_rows
    return rows


def encode_parquet(table: Tables) -> tuple[pa.Buffer, int]:
    """The bytes of ``table`` as one Parquet file (``write_parquet``), and its rows."""
    sink = pa.BufferOutputStream()
    rows = write_parquet(table, sink)
    return sink.getvalue(), rows


class LocalStore(Store):
    """A local directory; files are fsynced and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        self.base = str(root)

    @property
    def filesystem(self) -> None:
        return None

    def list_files(self, rel: str = "") -> list[tuple[str, int]]:
        top = self.root / rel if rel else self.root
        found: list[tuple[str, int]] = []
        for directory, _, names in os.walk(top):
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):  # removed meanwhile
                    found.append((path, os.stat(path).st_size))
        return found

    def committed_files(self) -> list[str]:
        # A glob rather than a walk: it never descends into _harvester/ or hidden folders.
        pattern = "harvest_date=*/model_key=*/part-*.parquet"
        return sorted(str(p) for p in self.root.glob(pattern))

    def has_old_layout(self) -> bool:
        return (
            self.root.is_dir() and next(self.root.glob("harvest_date=*/model=*"), None) is not None
        )

    def commit(self, rel: str, table: Tables) -> int:
        """Hidden temporary, fsync, rename (and fsync the folders a new partition made)."""
        final = self.root / rel
        directory = final.parent
        tmp = directory / f".{final.name}.tmp"
        try:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)  # other shards may make it too
            if created:  # a new partition folder must survive a power cut with its file
                fsync_dir(directory.parent)
                fsync_dir(directory.parent.parent)
            with tmp.open("wb") as handle:
                rows = write_parquet(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            fsync_dir(directory)
        except (OSError, pa.ArrowException) as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {final}: {exc}") from exc
        return rows

    def put_bytes(self, rel: str, data: bytes) -> None:
        final = self.root / rel
        tmp = final.parent / f".{final.name}.tmp"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(final)

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def list_names(self, rel: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.root / rel) if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def commit_file(self, rel: str, local: Path) -> None:
        """``local`` must be in the same folder as ``rel`` (a rename, never a copy)."""
        final = self.root / rel
        try:
            with local.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(local, final)
            fsync_dir(final.parent)
        except OSError as exc:
            local.unlink(missing_ok=True)
            raise OutputError(f"cannot write {final}: {exc}") from exc

    def delete(self, rels: Iterable[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)


class ObjectStore(Store):
    """An object store reached through a pyarrow filesystem: every write is one object."""

    def __init__(self, url: str, fs: pafs.FileSystem, base: str) -> None:
        self.url = url
        self._fs = fs
        self.base = base.strip("/")

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    def list_files(self, rel: str = "") -> list[tuple[str, int]]:
        selector = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        try:
            infos = self._fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{self.url}: cannot list it ({exc})") from exc
        return [(i.path, i.size or 0) for i in infos if i.type == pafs.FileType.File]

    def commit(self, rel: str, table: Tables) -> int:
        self.check_fence()
        data, rows = encode_parquet(table)
        self.put_bytes(rel, data.to_pybytes())
        return rows

    def put_bytes(self, rel: str, data: bytes) -> None:
        # Encoded in memory first and written in one call: an exception never closes (and so
        # never completes) a stream holding part of a file.
        try:
            stream = self._fs.open_output_stream(self.path(rel))
            stream.write(data)
            stream.close()
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot write {self.url}/{rel}: {exc}") from exc

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            with self._fs.open_input_stream(self.path(rel), compression=None) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {self.url}/{rel}: {exc}") from exc

    def delete(self, rels: Iterable[str]) -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_file(self.path(rel))

    def list_names(self, rel: str) -> list[str]:
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        infos = self._fs.get_file_info(selector)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def commit_file(self, rel: str, local: Path) -> None:
        self.check_fence()
        try:
            with local.open("rb") as src, self._fs.open_output_stream(self.path(rel)) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot write {self.url}/{rel}: {exc}") from exc
        finally:
            local.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Stamp:
    """An object's entity tag and age by the server's own clock (no client clock involved)."""

    etag: str
    age_s: float
    body: bytes


class S3Store(ObjectStore):
    """``s3://bucket/prefix``: pyarrow lists and reads, boto3 writes (one PutObject a file)
    and does what pyarrow cannot: conditional writes, and deletes in batches."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.bucket = parts.netloc
        if not self.bucket:
            raise UsageError(f"{url}: no bucket; write s3://bucket/prefix")
        self.prefix = parts.path.strip("/")
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise UsageError(f"{url}: writing to S3 needs boto3 ({S3_INSTALL})") from None
        fs, endpoint, region = s3_filesystem()
        super().__init__(url, fs, f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket)
        config = botocore.config.Config(retries={"max_attempts": 5, "mode": "standard"})
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=region, config=config
        )

    def key(self, rel: str) -> str:
        """The object key of ``rel``."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, what: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        import botocore.exceptions

        try:
            return call(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise _Conflict from exc
            if code in ("NoSuchKey", "404") or status == 404:
                raise FileNotFoundError(kwargs.get("Key", "")) from exc
            raise OutputError(f"{self.url}: cannot {what} ({exc})") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise OutputError(f"{self.url}: cannot {what} ({exc})") from exc

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._call(f"write {rel}", self.client.put_object, Key=self.key(rel), Body=data)

    def commit_file(self, rel: str, local: Path) -> None:
        """One PutObject streamed from the file (up to 5 GB): never a multipart upload."""
        self.check_fence()
        try:
            with local.open("rb") as body:
                self._call(f"write {rel}", self.client.put_object, Key=self.key(rel), Body=body)
        finally:
            local.unlink(missing_ok=True)

    def get_bytes(self, rel: str) -> bytes | None:
        stamp = self.stamp(rel)
        return None if stamp is None else stamp.body

    def delete(self, rels: Iterable[str]) -> None:
        keys = [{"Key": self.key(rel)} for rel in rels]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a request
            answer = self._call(
                "delete objects",
                self.client.delete_objects,
                Delete={"Objects": keys[start : start + 1000], "Quiet": True},
            )
            if answer.get("Errors"):
                raise OutputError(f"{self.url}: cannot delete {answer['Errors'][0]}")

    # -- conditional writes (leases) -------------------------------------------------------

    def create(self, rel: str, data: bytes) -> str | None:
        """Write ``rel`` only if no object has that key (``If-None-Match: *``): its ETag, or
        None when one exists already."""
        try:
            answer = self._call(
                f"create {rel}", self.client.put_object, Key=self.key(rel), Body=data,
                IfNoneMatch="*",
            )  # fmt: skip
        except _Conflict:
            return None
        return str(answer["ETag"])

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``rel`` only if it is still the version ``etag`` (``If-Match``): the new
        ETag, or None when someone else changed or removed it."""
        try:
            answer = self._call(
                f"renew {rel}", self.client.put_object, Key=self.key(rel), Body=data,
                IfMatch=etag,
            )  # fmt: skip
        except (_Conflict, FileNotFoundError):
            return None
        return str(answer["ETag"])

    def remove(self, rel: str, etag: str) -> None:
        """Delete ``rel`` only if it is still the version ``etag``."""
        with contextlib.suppress(_Conflict, FileNotFoundError):
            self._call(f"delete {rel}", self.client.delete_object, Key=self.key(rel), IfMatch=etag)

    def stamp(self, rel: str) -> Stamp | None:
        """``rel``'s body, ETag and age by the server's clock (its Date less LastModified)."""
        try:
            answer = self._call(f"read {rel}", self.client.get_object, Key=self.key(rel))
        except FileNotFoundError:
            return None
        body = answer["Body"].read()
        date = answer["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(date) if date else answer["LastModified"]
        age = (now - answer["LastModified"]).total_seconds()
        return Stamp(str(answer["ETag"]), max(0.0, age), body)

    def list_names(self, rel: str) -> list[str]:
        """Names of the objects directly under ``rel``."""
        prefix = self.key(rel).rstrip("/") + "/"
        names: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            for page in pages:
                names.extend(item["Key"][len(prefix) :] for item in page.get("Contents", []))
        except Exception as exc:
            raise OutputError(f"{self.url}: cannot list {rel} ({exc})") from exc
        return [name for name in names if "/" not in name]


class _Conflict(Exception):
    """A conditional write lost: the object exists, or is not the version expected."""


def s3_filesystem() -> tuple[pafs.S3FileSystem, str | None, str | None]:
    """pyarrow's S3 filesystem from the AWS environment, with the endpoint and region used."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options: dict[str, Any] = {"region": region} if region else {}
    if endpoint:
        # pyarrow's S3FileSystem() does not read AWS_ENDPOINT_URL itself (checked with
        # pyarrow 26): passed explicitly so that pyarrow and boto3 talk to the same server.
        split = urllib.parse.urlsplit(endpoint)
        options.update(endpoint_override=split.netloc or endpoint, scheme=split.scheme or "https")
    # Credentials and AWS_PROFILE: both clients use the AWS default chain (environment,
    # shared config and credentials files, web identity, instance metadata).
    return pafs.S3FileSystem(**options), endpoint, region


def open_store(root: str | Path | Store) -> Store:
    """The store of a dataset root given as a path, a URI or a store already open."""
    if isinstance(root, Store):
        return root
    location = parse_location(root)
    if isinstance(location, Path):
        return LocalStore(location)
    if location.lower().startswith("s3://"):
        return S3Store(location)
    try:
        fs, base = _other_filesystem(location)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise UsageError(f"--out {location}: cannot open it ({exc})") from exc
    return ObjectStore(location, fs, base)


def _other_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for a non-S3 URI: pyarrow's own, else fsspec's."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in _PYARROW_SCHEMES:
        fs, base = pafs.FileSystem.from_uri(uri)
        return fs, base
    import fsspec

    protocol_fs = fsspec.filesystem(scheme)
    return pafs.PyFileSystem(pafs.FSSpecHandler(protocol_fs)), protocol_fs._strip_protocol(uri)


def open_input(location: str | Path) -> tuple[pa.NativeFile, int]:
    """A stream of ``location`` (a path or a URI) and its size in bytes as stored."""
    place = parse_location(location, "--ids")
    if isinstance(place, Path):
        fs: pafs.FileSystem = pafs.LocalFileSystem()
        path = str(place.absolute())
    elif place.lower().startswith("s3://"):
        fs, path = s3_filesystem()[0], place.split("://", 1)[1]
    else:
        fs, path = _other_filesystem(place)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(path)
    # compression=None: pyarrow would guess a codec from the suffix; ids.py picks it itself.
    return fs.open_input_stream(path, compression=None), int(info.size or 0)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
