"""Deterministic sharding of ids: ``--shard K/N`` takes the ids whose stable hash is K mod N.

N processes, Kubernetes Indexed Job pods or Airflow mapped tasks split one CSV this way with
no coordination. The hash is plain 64-bit arithmetic on the id's 16-byte key (splitmix64), so
it is the same on every machine, Python and numpy version, and spreads time-ordered uuids
(v1, v7) as evenly as random ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import UsageError
from .idset import Keys, Mask

MAX_SHARDS = 1 << 20  # far more processes than anyone runs; and well inside the 64-bit hash
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def key_hash(keys: Keys) -> npt.NDArray[np.uint64]:
    """A stable 64-bit hash of each 16-byte key."""
    halves = np.frombuffer(keys.tobytes(), dtype="<u8").reshape(-1, 2)
    return _mix(_mix(halves[:, 0] + _GOLDEN) ^ halves[:, 1])


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based); ``Shard(0, 1)`` is everything."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise UsageError(
                f"--shard {self.index}/{self.count}: K must be in 0..N-1 and N in 1..{MAX_SHARDS} "
                "(e.g. 0/4)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` as given on the command line."""
        match = _SPEC.fullmatch(text)
        if match is None:
            raise UsageError(f"--shard takes K/N such as 0/4 (got {text!r})")
        return cls(int(match[1]), int(match[2]))

    @property
    def everything(self) -> bool:
        """True when this shard is the whole input."""
        return self.count == 1

    def split(self, workers: int) -> list[Shard]:
        """This shard cut into ``workers`` shards whose union is exactly this one."""
        # h % (N*W) == K + N*w implies h % N == K, so the pieces stay inside this shard.
        return [Shard(self.index + self.count * w, self.count * workers) for w in range(workers)]

    def mask(self, keys: Keys) -> Mask:
        """Which of ``keys`` belong to this shard."""
        if self.everything:
            return np.ones(len(keys), dtype=bool)
        picked: Mask = key_hash(keys) % np.uint64(self.count) == np.uint64(self.index)
        return picked

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()  # the default: every id
