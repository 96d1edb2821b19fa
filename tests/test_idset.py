"""Tests of the compact id set: first-occurrence masks, membership, size, against a set oracle."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.idset import KEY_DTYPE, DoneSet, IdSet, as_keys


def key(n: int) -> bytes:
    """A 16-byte key from a small integer (big-endian, so mostly leading zeros)."""
    return n.to_bytes(16, "big")


def test_as_keys_packs_16_byte_keys() -> None:
    """``as_keys`` gives an S16 array, and an empty list gives an empty S16 array."""
    keys = as_keys([key(1), key(2)])
    assert keys.dtype == KEY_DTYPE
    assert keys.tolist() == [key(1), key(2)]
    empty = as_keys([])
    assert empty.dtype == KEY_DTYPE
    assert len(empty) == 0


def test_empty_set() -> None:
    """A new set is empty, holds no memory and contains nothing."""
    ids = IdSet()
    assert len(ids) == 0
    assert ids.nbytes == 0
    assert ids.contains(as_keys([key(1)])).tolist() == [False]
    assert ids.contains(as_keys([])).tolist() == []


def test_add_new_empty_batch() -> None:
    """Adding an empty batch returns an empty mask and changes nothing."""
    ids = IdSet()
    assert ids.add_new(as_keys([])).tolist() == []
    assert len(ids) == 0


def test_add_new_marks_first_occurrence_within_batch() -> None:
    """Within one batch only the first of repeated keys is new."""
    ids = IdSet()
    mask = ids.add_new(as_keys([key(3), key(1), key(3), key(2), key(1), key(3)]))
    assert mask.tolist() == [True, True, False, True, False, False]
    assert len(ids) == 3


def test_add_new_against_earlier_batches() -> None:
    """Keys added by an earlier batch are not new in a later one."""
    ids = IdSet()
    ids.add_new(as_keys([key(1), key(2)]))
    mask = ids.add_new(as_keys([key(2), key(3), key(1), key(3), key(4)]))
    assert mask.tolist() == [False, True, False, False, True]
    assert len(ids) == 4


def test_contains_after_adds() -> None:
    """``contains`` reports exactly the added keys, whatever their position in the runs."""
    ids = IdSet()
    for start in range(0, 40, 4):
        ids.add_new(as_keys([key(n) for n in range(start, start + 4)]))
    probe = as_keys([key(n) for n in range(50)])
    assert ids.contains(probe).tolist() == [n < 40 for n in range(50)]


def test_add_new_allows_repeats_and_known_keys() -> None:
    """``add_new`` adds new keys and ignores repeats and keys already present."""
    ids = IdSet()
    ids.add_new(as_keys([key(1), key(1)]))
    ids.add_new(as_keys([key(1), key(2)]))
    assert len(ids) == 2
    assert ids.contains(as_keys([key(1), key(2), key(3)])).tolist() == [True, True, False]


def test_keys_with_nul_bytes_and_trailing_zeros_are_distinct() -> None:
    """Keys differing only in NUL bytes, trailing zeros or the all-zero key stay distinct."""
    tricky = [
        bytes(16),
        b"\x01" + bytes(15),
        bytes(15) + b"\x01",
        b"\x00\x01" + bytes(14),
        b"a" + bytes(15),
        b"a\x00b" + bytes(13),
        b"a" * 16,
        b"\xff" * 16,
        b"\x80" + bytes(15),
        b"\x7f" + bytes(15),
    ]
    ids = IdSet()
    assert ids.add_new(as_keys(tricky)).all()
    assert len(ids) == len(tricky)
    assert ids.contains(as_keys(tricky)).all()
    assert not ids.add_new(as_keys(list(reversed(tricky)))).any()
    assert not ids.contains(as_keys([b"b" + bytes(15), b"\x00" * 15 + b"\x02"])).any()


def test_nbytes_is_24_per_key() -> None:
    """A key costs 24 bytes (itself and its uint64 head), with no copies kept after merges."""
    ids = IdSet()
    rng = random.Random(7)
    for _ in range(50):
        ids.add_new(as_keys([rng.randbytes(16) for _ in range(100)]))
    assert len(ids) == 5000
    assert ids.nbytes == 24 * len(ids)  # 16-byte key + 8-byte uint64 head


def test_many_batches_against_set_oracle() -> None:
    """200 batches of 1000 random keys with ~30% repeats agree with a Python set throughout."""
    rng = np.random.default_rng(2024)
    ids = IdSet()
    oracle: set[bytes] = set()
    seen: list[bytes] = []
    for _ in range(200):
        fresh = [bytes(row) for row in rng.integers(0, 256, size=(700, 16), dtype=np.uint8)]
        if seen:
            picks = rng.integers(0, len(seen), size=300)
            repeats = [seen[int(i)] for i in picks]
        else:
            repeats = fresh[:300]
        batch = fresh + repeats
        order = rng.permutation(len(batch))
        batch = [batch[int(i)] for i in order]
        expected = []
        for value in batch:
            expected.append(value not in oracle)
            oracle.add(value)
        mask = ids.add_new(as_keys(batch))
        assert mask.tolist() == expected
        assert len(ids) == len(oracle)
        seen.extend(fresh)
    assert ids.nbytes == 24 * len(oracle)
    probe = list(rng.choice(np.array(seen, dtype=object), 500)) + [
        bytes(row) for row in rng.integers(0, 256, size=(500, 16), dtype=np.uint8)
    ]
    assert ids.contains(as_keys(probe)).tolist() == [p in oracle for p in probe]


_SMALL_KEY = st.builds(
    lambda a, b: bytes([a]) + bytes(14) + bytes([b]),
    st.integers(0, 3),
    st.sampled_from([0, 1, 255]),
)


@settings(max_examples=200)
@given(batches=st.lists(st.lists(_SMALL_KEY, max_size=20), max_size=20))
def test_add_new_matches_set_oracle_with_collisions(batches: list[list[bytes]]) -> None:
    """Over few possible keys (many collisions), masks, length and membership match a set."""
    ids = IdSet()
    oracle: set[bytes] = set()
    for batch in batches:
        expected = []
        for value in batch:
            expected.append(value not in oracle)
            oracle.add(value)
        assert ids.add_new(as_keys(batch)).tolist() == expected
        assert len(ids) == len(oracle)
        assert ids.nbytes == 24 * len(oracle)
    universe = [bytes([a]) + bytes(14) + bytes([b]) for a in range(4) for b in (0, 1, 255)]
    assert ids.contains(as_keys(universe)).tolist() == [u in oracle for u in universe]


def test_done_set_meet_tells_first_sightings_from_repeats() -> None:
    """mark_met(): done keys are found, each counted fresh once across batches; others are not."""
    rng = random.Random(3)
    done_keys = [rng.randbytes(16) for _ in range(2000)]
    # Keys sharing their first 8 bytes, to walk the exact path too.
    done_keys += [b"\x07" * 8 + rng.randbytes(8) for _ in range(50)]
    done = DoneSet.from_array(as_keys(done_keys))
    others = [rng.randbytes(16) for _ in range(500)]
    stream = done_keys[:1500] + others + done_keys[1000:] + done_keys[:10]
    rng.shuffle(stream)
    fresh_total = 0
    done_total = 0
    for start in range(0, len(stream), 333):
        batch = stream[start : start + 333]
        is_done, first = done.mark_met(as_keys(batch))
        assert [k in set(done_keys) for k in batch] == is_done.tolist()
        assert not (first & ~is_done).any()
        fresh_total += int(first.sum())
        done_total += int(is_done.sum())
    assert fresh_total == len(set(done_keys))
    assert done_total == len(stream) - len(others)
    assert done.nbytes == 25 * len(done)


def test_joined_copies_both_runs_in_order_whatever_their_layout() -> None:
    """The word-wise copy behind every merge keeps each key's 16 bytes exactly, for empty,
    one-key and strided (non-contiguous) inputs alike."""
    from harvester.idset import KEY_DTYPE, _joined

    keys = np.array([bytes([i]) * 16 for i in range(1, 9)], dtype=KEY_DTYPE)
    empty = np.empty(0, dtype=KEY_DTYPE)
    for first, second in (
        (keys, empty),
        (empty, keys),
        (keys[:1], keys[1:]),
        (keys[::2], keys[1::3]),
    ):
        joined = _joined(first, second)
        assert joined.dtype == KEY_DTYPE
        assert joined.tolist() == first.tolist() + second.tolist()
