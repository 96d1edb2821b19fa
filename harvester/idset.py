"""An exact set of 16-byte keys at about 16 bytes a key, for millions of ids.

A Python ``set`` of ``str`` costs ~120 bytes an id; here keys live in sorted numpy runs
(merged as in a log-structured merge tree) and membership is a vectorised binary search,
so both input dedup and resume stay compact and fast however long the input is.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

KEY_DTYPE = np.dtype("S16")

Keys = npt.NDArray[np.bytes_]
Mask = npt.NDArray[np.bool_]


def as_keys(raw: list[bytes]) -> Keys:
    """Pack a list of 16-byte keys into the array form every method takes."""
    return np.array(raw, dtype=KEY_DTYPE) if raw else np.empty(0, dtype=KEY_DTYPE)


class IdSet:
    """Exact membership over 16-byte keys, added in batches."""

    __slots__ = ("_runs", "_size")

    def __init__(self) -> None:
        self._runs: list[Keys] = []
        self._size = 0

    @classmethod
    def from_array(cls, keys: Keys) -> IdSet:
        """A set built in one sort, in place, from ``keys`` (which it takes over and reorders).

        The fast path for loading 10M done ids: one sort instead of a membership test and a
        merge per batch; the only copy is made when there are repeats to drop.
        """
        built = cls()
        keys.sort()
        if len(keys) > 1:
            repeats = keys[1:] == keys[:-1]
            if repeats.any():
                keys = np.concatenate((keys[:1], keys[1:][~repeats]))
        built._push(keys)
        return built

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Memory held by the keys themselves."""
        return sum(run.nbytes for run in self._runs)

    def contains(self, keys: Keys) -> Mask:
        """Which of ``keys`` are in the set."""
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, keys)
            np.minimum(idx, len(run) - 1, out=idx)
            found |= run[idx] == keys
        return found

    def add_new(self, keys: Keys) -> Mask:
        """Add ``keys``; return which were new (the first of repeats within the batch only)."""
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        uniq, first = np.unique(keys, return_index=True)
        absent = ~self.contains(uniq)
        new[first[absent]] = True
        self._push(uniq[absent])
        return new

    def update(self, keys: Keys) -> None:
        """Add ``keys`` (repeats and known keys allowed)."""
        self.add_new(keys)

    def _push(self, sorted_run: Keys) -> None:
        if not len(sorted_run):
            return
        self._runs.append(sorted_run)
        self._size += len(sorted_run)
        # Merge while the newest run is at least half the one before it, so runs grow
        # geometrically: O(log n) runs to search and each key is re-sorted O(log n) times.
        while len(self._runs) > 1 and 2 * len(self._runs[-1]) >= len(self._runs[-2]):
            last = self._runs.pop()
            merged = np.concatenate((self._runs.pop(), last))
            merged.sort(kind="stable")
            self._runs.append(merged)
