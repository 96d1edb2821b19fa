"""--shard K/N and --workers N: parsing, a stable exact partition of ids, and merged runs."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from harvester.cli import build_parser, main
from harvester.errors import ExitCode, UsageError
from harvester.errors import worst_code as worst
from harvester.ids import classify, invalid_key
from harvester.idset import KEY_DTYPE, Keys, as_keys
from harvester.runner import harvest
from harvester.settings import RunSettings
from harvester.shard import WHOLE, Shard, key_hash
from harvester.sim import Simulator
from harvester.workers import child_argv

from .conftest import TOKEN, ThreadedSimulator, fast_settings, make_ids, read_rows, write_csv

M64 = (1 << 64) - 1


def _reference_mix(x: int) -> int:
    """splitmix64's finaliser in plain Python integers, independent of numpy."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def reference_hash(key: bytes) -> int:
    """The documented hash of a 16-byte key: two little-endian halves through splitmix64."""
    low, high = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    return _reference_mix(_reference_mix((low + 0x9E3779B97F4A7C15) & M64) ^ high)


def random_keys(count: int, seed: int) -> Keys:
    """``count`` random 16-byte keys."""
    raw = np.random.default_rng(seed).bytes(16 * count)
    return np.frombuffer(raw, dtype=KEY_DTYPE).copy()


def uuid_keys(values: list[str]) -> Keys:
    """The keys harvester computes for canonical uuids (their 16 bytes)."""
    return as_keys([uuid.UUID(value).bytes for value in values])


def assert_partition(keys: Keys, shards: list[Shard]) -> list[int]:
    """The shards' masks are disjoint and cover every key; return the size of each."""
    masks = np.array([shard.mask(keys) for shard in shards]).reshape(len(shards), len(keys))
    assert (masks.sum(axis=0) == 1).all()
    return [int(n) for n in masks.sum(axis=1)]


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0/1", Shard(0, 1)),
        ("3/4", Shard(3, 4)),
        (" 2 / 8 ", Shard(2, 8)),
        ("007/10", Shard(7, 10)),
    ],
)
def test_parse_accepts_k_over_n(spec: str, expected: Shard) -> None:
    """K/N parses with optional spaces and leading zeros, and prints back canonically."""
    assert Shard.parse(spec) == expected
    assert str(Shard.parse(spec)) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    "spec", ["", "4/4", "5/4", "-1/4", "1/0", "0/0", "a/b", "1", "1/2/3", "1.0/2", "1/-2", "½/2"]
)
def test_parse_rejects_bad_specs(spec: str) -> None:
    """A spec that is not K/N with 0 <= K < N is a UsageError."""
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(spec)


@pytest.mark.parametrize("spec", ["4/4", "x", "1/0", "-1/2"])
def test_bad_shard_on_the_command_line_exits_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    """The CLI rejects a bad --shard before doing anything: exit 2, one argparse error line."""
    with pytest.raises(SystemExit) as info:
        main(["run", "--ids", str(tmp_path / "ids.csv"), "--out", str(tmp_path), "--shard", spec])
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1
    assert errors[0] == err[-1]
    assert errors[0].startswith("harvester run: error: argument --shard:")
    assert not (tmp_path / "_harvester").exists()


def test_a_shard_count_beyond_the_64_bit_hash_is_a_usage_error() -> None:
    """N must fit the 64-bit hash: 0/2**64 is refused when parsed (exit 2), rather than
    accepted and then crashing the run with an OverflowError when the first batch is masked."""
    with pytest.raises(UsageError):
        Shard.parse(f"0/{2**64}")


def test_whole_is_the_default_and_takes_everything() -> None:
    """The default shard is 0/1 and its mask is all true."""
    assert WHOLE == Shard() == Shard(0, 1)
    assert WHOLE.everything
    assert WHOLE.mask(random_keys(100, 1)).all()
    assert build_parser().parse_args(["run", "--ids", "i", "--out", "o"]).shard == WHOLE


# -- the partition ----------------------------------------------------------------------------


def test_four_shards_partition_random_keys_evenly() -> None:
    """Shards K/4 are disjoint, cover every key, and each holds n/4 within 10%."""
    keys = random_keys(40_000, seed=7)
    sizes = assert_partition(keys, [Shard(k, 4) for k in range(4)])
    assert all(abs(size - 10_000) < 1_000 for size in sizes), sizes


@pytest.mark.parametrize("varying", ["low bytes", "high bytes"])
def test_time_ordered_keys_spread_evenly(varying: str) -> None:
    """Keys that differ only in their first or last bytes (sequential, time-ordered uuids)
    still split evenly."""
    numbers = np.arange(40_000, dtype=">u8").tobytes()
    chunks = [numbers[i : i + 8] for i in range(0, len(numbers), 8)]
    base = bytes.fromhex("0192f0c47b1a7cde")
    raw = [base + c if varying == "low bytes" else c + base for c in chunks]
    sizes = assert_partition(as_keys(raw), [Shard(k, 4) for k in range(4)])
    assert all(abs(size - 10_000) < 1_000 for size in sizes), sizes


@pytest.mark.parametrize("parent", [Shard(0, 1), Shard(1, 3), Shard(4, 5)])
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_split_pieces_stay_inside_the_parent_and_cover_it(parent: Shard, workers: int) -> None:
    """``split(w)`` gives w shards, each inside the parent, disjoint, whose union is it."""
    keys = random_keys(20_000, seed=workers)
    pieces = parent.split(workers)
    assert len(pieces) == workers
    inside = parent.mask(keys)
    masks = [piece.mask(keys) for piece in pieces]
    assert all(not (mask & ~inside).any() for mask in masks)
    assert (np.sum(masks, axis=0) == inside).all()


def test_hash_is_pinned() -> None:
    """Known key -> hash values: a change would move ids between shards of existing DIRs."""
    pinned = {
        "00000000-0000-0000-0000-000000000000": 0x48218226FF3CD4BF,
        "ffffffff-ffff-ffff-ffff-ffffffffffff": 0x4650BC0EB3312E23,
        "123e4567-e89b-12d3-a456-426614174000": 0xA11AB454D17659D3,
        "0192f0c4-7b1a-7cde-8f00-000000000001": 0xD871855CFA2EACD2,
    }
    hashes = key_hash(uuid_keys(list(pinned))).tolist()
    assert hashes == list(pinned.values())
    assert [reference_hash(uuid.UUID(u).bytes) for u in pinned] == list(pinned.values())
    assert int(key_hash(as_keys([invalid_key("not-a-uuid")]))[0]) == 0x96E8D886BB49281D
    assert [Shard(k, 4).mask(uuid_keys(list(pinned))).tolist() for k in range(4)] == [
        [False, False, False, False],
        [False, False, False, False],
        [False, False, False, True],
        [True, True, True, False],
    ]


def test_a_uuid_lands_in_the_same_shard_whatever_its_spelling() -> None:
    """Upper case, braces and urn forms of one uuid have one key, hence one shard."""
    value = "123e4567-e89b-12d3-a456-426614174000"
    spellings = [
        value,
        value.upper(),
        "{" + value + "}",
        "urn:uuid:" + value,
        value.replace("-", ""),
    ]
    keys = classify(spellings, list(range(len(spellings)))).keys
    assert len(set(key_hash(keys).tolist())) == 1


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=16, max_size=16), max_size=200),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=1, max_value=5),
)
def test_any_key_set_is_partitioned_exactly(raw: list[bytes], count: int, workers: int) -> None:
    """For any keys, N and w: shards K/N partition them, split(w) partitions each shard,
    and the numpy hash equals the plain-integer reference."""
    keys = as_keys(raw)
    assert key_hash(keys).tolist() == [reference_hash(key) for key in raw]
    shards = [Shard(k, count) for k in range(count)]
    assert sum(assert_partition(keys, shards)) == len(raw)
    for shard in shards:
        inside = shard.mask(keys)
        pieces = [piece.mask(keys) for piece in shard.split(workers)]
        assert (np.sum(pieces, axis=0).astype(bool) == inside).all()
        assert (np.sum(pieces, axis=0) <= 1).all()


# -- runs -------------------------------------------------------------------------------------


async def test_four_shard_runs_into_one_dir_cover_the_input_exactly_once(tmp_path: Path) -> None:
    """Four concurrent runs with shards K/4 into one DIR write every id once, each only ids
    of its own shard (invalid values included), and their counts add up to the input."""
    ids = make_ids(800, seed=31)
    junk = ["not-a-uuid", "also junk", "x" * 50, "1234"]
    values = [*ids, *junk, ids[0].upper(), ids[1]]  # two duplicates
    path = write_csv(tmp_path / "ids.csv", values)
    out = tmp_path / "out"
    async with Simulator(token=TOKEN, profile="instant", seed=8) as sim:
        results = await asyncio.gather(
            *(harvest(fast_settings(path, out, sim.base_url, shard=Shard(k, 4))) for k in range(4))
        )
    assert [r.exit_code for r in results] == [ExitCode.OK] * 4
    assert sum(r.summary["unique_ids"] for r in results) == len(ids) + len(junk)
    assert sum(r.summary["duplicates"] for r in results) == 2
    assert [r.summary["shard"] for r in results] == ["0/4", "1/4", "2/4", "3/4"]
    assert all(r.summary["unique_ids"] > 100 for r in results)
    rows = read_rows(out)
    counts = Counter(rows.column("id").to_pylist())
    assert set(counts) == {*ids, *junk}
    assert set(counts.values()) == {1}
    for result in results:
        shard = Shard.parse(result.summary["shard"])
        mine = written_by(out, result.summary["run_id"])
        assert len(mine) == result.summary["rows_written"]
        assert shard.mask(classify(mine, list(range(len(mine)))).keys).all()


def written_by(out: Path, run_id: str) -> list[str]:
    """Ids in the committed files of one run (file names carry the run id)."""
    ids: list[str] = []
    for path in out.glob(f"harvest_date=*/model_key=*/part-{run_id}-*.parquet"):
        ids.extend(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def test_workers_give_one_merged_summary_and_exactly_once_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 2`` runs two children and prints one merged JSON summary whose unique_ids
    is the input's; the rows are exactly once and each worker saved its own report."""
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)
    ids = make_ids(600, seed=32)
    path = write_csv(tmp_path / "ids.csv", [*ids, ids[5]])
    out = tmp_path / "out"
    with ThreadedSimulator(profile="instant", seed=9) as sim:
        code = main(
            [
                "run", "--ids", str(path), "--out", str(out), "--base-url", sim.base_url,
                "--rate", "2000", "--workers", "2", "--json", "--no-progress",
                "--flush-interval", "0.2",
            ]
        )  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == ExitCode.OK
    assert stdout.count("\n") == 1
    summary = orjson.loads(stdout)
    assert summary["exit_code"] == ExitCode.OK
    assert summary["workers"] == 2
    assert summary["unique_ids"] == len(ids)
    assert summary["completed"] + summary["failed"] == len(ids)
    assert summary["duplicates"] == 1
    assert summary["rows_written"] == len(ids)
    assert len(summary["worker_run_ids"]) == 2
    assert None not in summary["worker_run_ids"]
    counts = Counter(read_rows(out).column("id").to_pylist())
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    reports = {p.stem for p in (out / "_harvester" / "runs").glob("*.json")}
    assert reports >= {summary["run_id"], *summary["worker_run_ids"]}


# -- the parent's helpers ---------------------------------------------------------------------


def test_child_argv_drops_workers_and_appends_each_childs_share() -> None:
    """Both ``--workers N`` and ``--workers=N`` are removed, and the child's shard, 1/N of the
    rate, concurrency and ids in play, and the JSON/no-progress/worker-stats flags win."""
    settings = RunSettings(
        ids_path=Path("ids.csv"),
        out_dir=Path("out"),
        token="t",
        rate=100.0,
        concurrency=10,
        max_in_play=7,
    )
    argv = [
        "run", "--ids", "ids.csv", "--workers", "3", "--out", "out", "--rate", "100",
        "--workers=3", "--concurrency", "10", "--shard", "1/2",
    ]  # fmt: skip
    child = child_argv(argv, Shard(4, 6), settings, 3)
    assert "--workers" not in child
    assert not any(arg.startswith("--workers") for arg in child)
    assert child[: child.index("--shard")] == [
        "run", "--ids", "ids.csv", "--out", "out", "--rate", "100", "--concurrency", "10",
    ]  # fmt: skip
    args = build_parser().parse_args(child)
    assert args.workers == 1
    assert args.shard == Shard(4, 6)
    assert args.rate == pytest.approx(100 / 3)
    assert args.concurrency == 4
    assert args.max_in_play == 3
    assert (args.json, args.no_progress, args.worker_stats) == (True, True, True)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([ExitCode.OK, ExitCode.OK], ExitCode.OK),
        ([ExitCode.OK, ExitCode.UNRESOLVED], ExitCode.UNRESOLVED),
        ([ExitCode.UNRESOLVED, ExitCode.INTERRUPTED], ExitCode.INTERRUPTED),
        ([ExitCode.INTERRUPTED, ExitCode.USAGE, ExitCode.OK], ExitCode.USAGE),
        ([ExitCode.USAGE, ExitCode.OUTPUT], ExitCode.OUTPUT),
        ([ExitCode.OUTPUT, ExitCode.REFUSED, ExitCode.UNRESOLVED], ExitCode.REFUSED),
        ([ExitCode.REFUSED], ExitCode.REFUSED),
    ],
)
def test_worst_exit_code_precedence(codes: list[int], expected: int) -> None:
    """3 (auth) > 4 (output) > 2 (usage) > 130 (interrupted) > 1 (unresolved) > 0."""
    assert worst(codes) == expected
    assert worst(list(reversed(codes))) == expected


def test_a_worker_killed_by_a_signal_is_never_success() -> None:
    """A child that died of a signal (asyncio reports -9 for SIGKILL, e.g. the OOM killer)
    wrote no summary and may have left ids undone: the merged exit code must not be 0."""
    assert worst([ExitCode.OK, -signal.SIGKILL]) != ExitCode.OK
    assert worst([ExitCode.OK, -signal.SIGSEGV]) != ExitCode.OK
