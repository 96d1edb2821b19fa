"""Which ids of an input batch this run must harvest: its shard, not done yet, not seen yet.

A plain function over the batch and two compact sets (``idset.py``), kept apart from the
scheduler so the dedup and resume rules can be read and tested without a running loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ids import Batch
from .idset import DoneSet, IdSet
from .shard import Shard


@dataclass(frozen=True, slots=True)
class Intake:
    """One batch sorted out: ``batch.ids[i] for i in fresh`` are this run's new ids."""

    batch: Batch
    fresh: list[int]
    already_done: int  # distinct ids the dataset already holds, met for the first time
    duplicates: int  # repeats of an id met earlier (in this batch or before)


def sort_out(batch: Batch, *, shard: Shard, seen: IdSet, done: DoneSet) -> Intake:
    """Keep the shard's ids; count the done ones once; add the rest to ``seen``, once each."""
    if not shard.everything:
        batch = batch.select(shard.mask(batch.keys))
    # Done ids are marked in the done set itself; only the others enter ``seen``.
    is_done, first_done = done.mark_met(batch.keys)
    others = (~is_done).nonzero()[0]
    fresh = others[seen.add_new(batch.keys[others])]
    already = int(first_done.sum())
    return Intake(batch, fresh.tolist(), already, len(batch.keys) - already - len(fresh))
