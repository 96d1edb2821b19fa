"""The id lifecycle: which id is polled when, by whom, and what happens with the answer.

Ids wait in one of two places: the ready queue (due now) or a loop timer (due later: next
poll of a ``retrieving`` id, or a backoff after a transient error). Only the C workers make
requests, so the concurrency cap is the number of workers, and an id that is waiting holds
no slot. The feeder keeps at most ``max_in_play`` ids between input and outcome.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .client import Completion, CompletionsClient, Kind
from .errors import FatalError, ThrottledError, TransientError
from .ids import Batch
from .idset import DoneSet, IdSet
from .metrics import RunStats
from .shard import WHOLE, Shard
from .sink import ParquetSink
from .throttle import Pacer

DEFAULT_THROTTLE_WAIT = 1.0  # a 429/503 without Retry-After still pauses the client a while


@dataclass(frozen=True, slots=True)
class Policy:
    """Timing rules of one run: poll spacing, retry backoff and the give-up deadline."""

    poll_interval: float = 4.0
    max_poll_interval: float = 30.0
    max_wait: float = 600.0
    max_retries: int = 10
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def next_poll(self, polls: int) -> float:
        """Seconds until the next poll of an id still retrieving, growing 1.5x a poll."""
        base = min(self.poll_interval * 1.5 ** max(polls - 1, 0), self.max_poll_interval)
        return base * random.uniform(0.9, 1.1)  # jitter keeps ids from polling in lockstep

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th transient error (exponential, jittered)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


class _Entry:
    """One id in play; ``deadline`` is set by its first poll."""

    __slots__ = ("deadline", "failures", "id", "polls")

    def __init__(self, conversation_id: str) -> None:
        self.id = conversation_id
        self.polls = 0
        self.failures = 0
        self.deadline = 0.0


class Scheduler:
    """Feeds ids from the input, polls them with C workers, and records every outcome."""

    def __init__(
        self,
        *,
        client: CompletionsClient,
        pacer: Pacer,
        sink: ParquetSink,
        stats: RunStats,
        policy: Policy,
        concurrency: int,
        max_in_play: int,
        shard: Shard = WHOLE,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._sink = sink
        self._stats = stats
        self._policy = policy
        self._concurrency = concurrency
        self._shard = shard
        self._room = asyncio.Semaphore(max_in_play)
        self._ready: asyncio.Queue[_Entry | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._in_play = 0
        self._feeding = True
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # workers inside a request
        self.fatal: FatalError | None = None

    @property
    def in_play(self) -> int:
        """Ids taken from the input and not yet terminal."""
        return self._in_play

    async def run(self, batches: AsyncIterator[Batch], seen: IdSet, done: DoneSet) -> None:
        """Harvest every new id of ``batches``; returns when all are terminal or stopped."""
        workers = self._workers = [
            asyncio.create_task(self._work()) for _ in range(self._concurrency)
        ]
        feeder = asyncio.create_task(self._feed_all(batches, seen, done))
        try:
            # Idle workers are cancelled by stop(); only real failures are raised here.
            for outcome in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(outcome, Exception):
                    raise outcome
            if feeder.done() and not feeder.cancelled() and feeder.exception():
                raise feeder.exception()  # type: ignore[misc]
        finally:
            for task in (feeder, *workers):
                task.cancel()
            await asyncio.gather(feeder, *workers, return_exceptions=True)

    def stop(self) -> None:
        """Issue no more polls; workers finish the request they have in flight, then return."""
        if self._stopping:
            return
        self._stopping = True
        self._feeding = False
        for _ in range(self._concurrency):
            self._ready.put_nowait(None)
        # Workers not in a request (waiting for an id, or out a Retry-After pause that may
        # last minutes) stop now; those in a request finish it, within the grace period.
        for task in self._workers:
            if task not in self._busy:
                task.cancel()

    def _abort(self, exc: FatalError) -> None:
        """401/402/403 or TLS: nothing can succeed any more; stop now, not after in-flight ones."""
        if self.fatal is None:
            self.fatal = exc
        self.stop()
        current = asyncio.current_task()
        for task in self._workers:
            if task is not current:
                task.cancel()

    async def _feed_all(self, batches: AsyncIterator[Batch], seen: IdSet, done: DoneSet) -> None:
        try:
            await self._feed(batches, seen, done)
        except BaseException:
            self.stop()  # the input failed mid-way: let the workers return, then re-raise
            raise
        self._feeding = False
        self._maybe_finish()

    async def _feed(self, batches: AsyncIterator[Batch], seen: IdSet, done: DoneSet) -> None:
        stats = self._stats
        async for batch in batches:
            if not self._shard.everything:
                batch = batch.select(self._shard.mask(batch.keys))
            # Done ids are marked in the done set itself; only the others enter ``seen``.
            is_done, first_done = done.meet(batch.keys)
            others = (~is_done).nonzero()[0]
            fresh = others[seen.add_new(batch.keys[others])]
            already = int(first_done.sum())
            stats.already_done += already
            stats.unique_ids += already + len(fresh)
            stats.duplicates += len(batch.keys) - already - len(fresh)
            await self._take(batch, fresh.tolist())
            if self._stopping:
                return  # read no further: ids not read are simply not part of this run

    async def _take(self, batch: Batch, todo: list[int]) -> None:
        """Admit the batch's new ids; those never admitted (a stop, an abort) are unresolved."""
        taken = 0
        try:
            for i in todo:
                if self._stopping:
                    return
                if batch.valid[i]:
                    await self._room.acquire()
                    self._admit(batch.ids[i])
                    taken += 1
                else:
                    self._note(batch.ids[i], "invalid", None, 0)
                    taken += 1
                    await self._backpressure()
        finally:
            # Counted already as unique ids, so they must land somewhere in the summary.
            self._stats.unresolved += len(todo) - taken

    def _admit(self, conversation_id: str) -> None:
        """Put an id in play (its room is already taken)."""
        self._in_play += 1
        self._ready.put_nowait(_Entry(conversation_id))

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while (entry := await self._ready.get()) is not None:
            if self._stopping:
                return
            await self._pacer.acquire()
            if self._stopping:
                return
            self._busy.add(me)
            try:
                await self._poll(entry)
            finally:
                self._busy.discard(me)

    async def _poll(self, entry: _Entry) -> None:
        stats = self._stats
        now = self._loop.time()
        if not entry.polls:
            entry.deadline = now + self._policy.max_wait
        entry.polls += 1
        stats.requests += 1
        stats.in_flight += 1
        throttled = False
        try:
            kind, doc = await self._client.poll(entry.id)
        except ThrottledError as exc:
            throttled = True
            self._on_throttled(entry, exc)
            return
        except TransientError as exc:
            self._on_transient(entry, exc)
            return
        except FatalError as exc:
            self._abort(exc)
            return
        finally:
            stats.in_flight -= 1
            stats.latency.record(self._client.last_latency)
            stats.timeline.record(now, self._pacer.rate, throttled=throttled)
            if not throttled:
                self._pacer.answered()
        await self._settle(entry, kind, doc)

    def _on_throttled(self, entry: _Entry, exc: ThrottledError) -> None:
        """429/503: the whole client waits and slows down; the id is not to blame."""
        self._stats.throttled += 1
        self._stats.errors[exc.kind] += 1
        wait = DEFAULT_THROTTLE_WAIT if exc.retry_after is None else exc.retry_after
        self._pacer.throttled(wait)
        self._retry_later(entry, 0.0)

    def _on_transient(self, entry: _Entry, exc: TransientError) -> None:
        """Back off and retry, up to ``max_retries`` for this id; then leave it unresolved."""
        self._stats.errors[exc.kind] += 1
        entry.failures += 1
        if entry.failures > self._policy.max_retries:
            self._give_up(entry)
        else:
            self._stats.retries += 1
            self._retry_later(entry, self._policy.backoff(entry.failures))

    async def _settle(self, entry: _Entry, kind: Kind, doc: Completion | None) -> None:
        if kind is Kind.RETRIEVING:
            self._retry_later(entry, self._policy.next_poll(entry.polls))
            return
        # Noted and released before any wait: a cancel during back-pressure cannot count the
        # id twice (as done here and as unresolved in play).
        self._note(entry.id, kind.value, doc, entry.polls)
        self._release()
        await self._backpressure()

    def _retry_later(self, entry: _Entry, delay: float) -> None:
        """Poll ``entry`` again after ``delay``, but never past its deadline."""
        now = self._loop.time()
        if now >= entry.deadline:
            self._give_up(entry)
            return
        due = min(now + delay, entry.deadline)
        if due <= now:
            self._ready.put_nowait(entry)
        else:
            self._loop.call_at(due, self._ready.put_nowait, entry)

    def _give_up(self, entry: _Entry) -> None:
        """No row: the id is counted unresolved and the next run polls it again."""
        self._stats.unresolved += 1
        self._release()

    def _release(self) -> None:
        self._in_play -= 1
        self._room.release()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._feeding and self._in_play == 0 and not self._stopping:
            self.stop()

    def _note(self, conversation_id: str, status: str, doc: Completion | None, polls: int) -> None:
        """Count a terminal outcome and buffer its row (committed by the sink's next flush)."""
        stats = self._stats
        if status == "completed":
            stats.completed += 1
        elif status == "failed":
            stats.failed += 1
        else:
            stats.invalid += 1
        self._sink.add(conversation_id, status, doc, polls)

    async def _backpressure(self) -> None:
        if self._sink.overfull():
            await self._sink.flush(only_if_full=True)  # memory stays bounded
