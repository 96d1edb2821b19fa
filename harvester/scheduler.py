"""The id lifecycle: which id is polled when, by whom, and what happens with the answer.

Ids wait in one of two places: the ready queue (due now) or a loop timer (due later: next
poll of a ``retrieving`` id, or a backoff after a transient error). Only the C workers make
requests, so the concurrency cap is the number of workers, and an id that is waiting holds
no slot. The feeder keeps at most ``max_in_play`` ids between input and outcome. The ready
queue serves ids that are due again before fresh ones (each kind in the order it became due),
so a re-poll never waits behind thousands of first polls; when to re-poll is ``PollSchedule``'s
(``polling.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .client import CompletionsClient
from .errors import FatalError, ThrottledError, TransientError, TransportError, UnreachableError
from .ids import Batch
from .idset import DoneSet, IdSet
from .intake import sort_out
from .metrics import MAX_WAIT_REACHED, RETRIES_USED_UP, STOPPED, RunStats
from .model import Headline, Kind
from .pacer import Pacer
from .polling import NO_EXPECTATION, ExpectedReady, PollSchedule
from .prepared import Prepared
from .settings import RunSettings
from .shard import WHOLE, Shard
from .sink import ParquetSink
from .throttle import DEFAULT_RETRY_AFTER, Answer

_ANSWER_OF = {429: Answer.THROTTLED_429, 503: Answer.THROTTLED_503}
# Ready-queue priorities: stop sentinels, then ids due again, then ids never polled.
_STOP, _DUE, _FRESH = -1, 0, 1
# The feeder yields to the loop after admitting this many ids in one go. While it awaits a
# batch's intake, finished ids free their rooms; admitting hundreds at once took milliseconds
# itself and woke as many workers into the next loop turn. At C=1000 that made the loop's lag
# p50 75-85 ms, p99 116-160 ms; yielding every 8 ids: 0-3 ms and 3-5 ms, at the same
# requests/s (every 128: p99 30 ms; every 2 costs ~5% of the rate). benchmarks.throughput.
ADMIT_PER_STEP = 8


@dataclass(frozen=True, slots=True)
class Policy:
    """Timing rules of one run: poll spacing, retry backoff and the give-up deadline."""

    poll_interval: float
    max_poll_interval: float
    max_wait: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    # Seconds after the first failed request at which, if nothing has answered yet, the run
    # stops (UnreachableError); inf: never.
    unreachable_after: float = math.inf
    # Where the first plan of re-polls comes from (``--expected-ready``); none: the rule.
    expected_ready: ExpectedReady = NO_EXPECTATION

    @classmethod
    def of(cls, settings: RunSettings) -> Policy:
        """The policy a run's settings ask for (the defaults live in ``RunSettings``)."""
        return cls(
            poll_interval=settings.poll_interval,
            max_poll_interval=settings.max_poll_interval,
            max_wait=settings.max_wait,
            max_retries=settings.max_retries,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            unreachable_after=settings.unreachable_after,
            expected_ready=settings.expected_ready,
        )

    def schedule(self, *, learn: bool = True) -> PollSchedule:
        """The run's re-poll schedule: learned from its ready times, this rule until then."""
        return PollSchedule(
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            max_wait=self.max_wait,
            fallback=self.next_poll,
            learn=learn,
            expected=self.expected_ready,
        )

    def next_poll(self, polls: int) -> float:
        """Seconds until the next poll of an id still retrieving, growing 1.5x a poll (the
        schedule before the run has learned, and past the ages it has seen)."""
        base = min(self.poll_interval * 1.5 ** max(polls - 1, 0), self.max_poll_interval)
        return base * random.uniform(0.9, 1.1)  # jitter keeps ids from polling in lockstep

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th transient error (exponential, jittered)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


class _Entry:
    """One id in play; ``deadline`` is set by its first poll, ``last`` names its last
    answer (``retrieving`` or an error label), which says why if the id is given up.
    Ages are seconds since the first poll was sent: ``sent`` the current poll's, ``waiting``
    that of the latest poll answered ``retrieving`` (None before one is)."""

    __slots__ = (
        "deadline",
        "failures",
        "first",
        "id",
        "last",
        "polls",
        "probe",
        "sent",
        "waiting",
    )

    def __init__(self, conversation_id: str, *, probe: bool = False) -> None:
        self.id = conversation_id
        self.polls = 0
        self.failures = 0
        self.deadline = 0.0
        self.last = "retrieving"
        self.first = 0.0
        self.sent = 0.0
        self.waiting: float | None = None
        self.probe = probe  # polled densely so that the schedule keeps learning


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
        schedule: PollSchedule | None = None,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._sink = sink
        self._stats = stats
        self._policy = policy
        self.schedule = policy.schedule() if schedule is None else schedule
        self._concurrency = concurrency
        self._shard = shard
        self._slots = asyncio.Semaphore(max_in_play)  # one per id in play
        # (priority, order, entry): due ids before fresh ones, each in the order they came.
        self._ready: asyncio.PriorityQueue[tuple[int, int, _Entry | None]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._fresh_waiting = 0  # ids in the ready queue never polled yet
        self._loop = asyncio.get_running_loop()
        self._in_play = 0
        self._feeding = True
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # workers inside a request
        # Until the server first answers (any HTTP status), failed connections arm a timer
        # that stops the run: a wrong URL fails in seconds, not after every id's retries.
        self._answered = False
        self._unreachable: asyncio.TimerHandle | None = None
        self._last_failure: TransportError | None = None
        self._input_read = False
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

    def input_read(self) -> bool:
        """True once the feeder has read the whole input: ``unique_ids`` is then exact."""
        return self._input_read

    def stop(self) -> None:
        """Issue no more polls; workers finish the request they have in flight, then return."""
        if self._stopping:
            return
        self._stopping = True
        self._feeding = False
        if self._unreachable is not None:
            self._unreachable.cancel()
            self._unreachable = None
        for _ in range(self._concurrency):
            self._ready.put_nowait((_STOP, next(self._order), None))
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
        self._input_read = not self._stopping
        self._feeding = False
        self._maybe_finish()

    async def _feed(self, batches: AsyncIterator[Batch], seen: IdSet, done: DoneSet) -> None:
        stats = self._stats
        async for batch in batches:
            # In a worker thread: merging the seen set's sorted runs takes ~0.1 s a million
            # ids, in numpy code that releases the GIL. Only the feeder touches both sets,
            # and it awaits each batch, so no two threads ever use them at once.
            intake = await asyncio.to_thread(
                sort_out, batch, shard=self._shard, seen=seen, done=done
            )
            stats.already_done += intake.already_done
            stats.unique_ids += intake.already_done + len(intake.fresh)
            stats.duplicates += intake.duplicates
            await self._take(intake.batch, intake.fresh)
            if self._stopping:
                return  # read no further: ids not read are simply not part of this run

    async def _take(self, batch: Batch, todo: list[int]) -> None:
        """Admit the batch's new ids; those never admitted (a stop, an abort) are unresolved."""
        taken = 0
        try:
            for n, i in enumerate(todo, 1):
                if n % ADMIT_PER_STEP == 0:
                    await asyncio.sleep(0)
                if self._stopping:
                    return
                if batch.valid[i]:
                    await self._slots.acquire()
                    self._admit(batch.ids[i])
                    taken += 1
                else:
                    self._record(batch.ids[i], Kind.INVALID, None, 0)
                    taken += 1
                    await self._backpressure()
        finally:
            # Counted already as unique ids, so they must land somewhere in the summary.
            self._stats.count_unresolved(STOPPED, len(todo) - taken)

    def _admit(self, conversation_id: str) -> None:
        """Put an id in play (its room is already taken)."""
        self._in_play += 1
        entry = _Entry(conversation_id, probe=self.schedule.is_probe())
        self._fresh_waiting += 1
        self._ready.put_nowait((_FRESH, next(self._order), entry))

    def _due(self, entry: _Entry) -> None:
        """Queue an id due again (ahead of every fresh one)."""
        self._ready.put_nowait((_DUE, next(self._order), entry))

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while (entry := (await self._ready.get())[2]) is not None:
            if not entry.polls:
                self._fresh_waiting -= 1
            if self._stopping:
                return
            probe = await self._pacer.acquire()
            if self._stopping:
                self._pacer.record(Answer.NONE, probe=probe)
                return
            self._busy.add(me)
            try:
                await self._poll(entry, probe)
            finally:
                self._busy.discard(me)

    async def _poll(self, entry: _Entry, probe: int) -> None:
        stats = self._stats
        loop = self._loop
        now = loop.time()
        if not entry.polls:
            entry.deadline = now + self._policy.max_wait
            entry.first = now
        entry.sent = now - entry.first
        entry.polls += 1
        stats.requests += 1
        stats.in_flight += 1
        answer, retry_after = Answer.NONE, None
        try:
            kind, doc, line = await self._client.poll_answer(entry.id)
            answer = Answer.ACCEPTED
        except ThrottledError as exc:
            answer, retry_after = _ANSWER_OF.get(exc.status, Answer.THROTTLED_429), exc.retry_after
            self._on_throttled(entry, exc)
            return
        except TransientError as exc:
            # Nothing came back (refused, dropped, timed out): no word on the server's load;
            # anything else is an answer, if a bad one, and not a throttle.
            answer = Answer.NONE if isinstance(exc, TransportError) else Answer.ACCEPTED
            if isinstance(exc, TransportError) and not self._answered:
                self._arm_unreachable(exc)
            self._on_transient(entry, exc)
            return
        except FatalError as exc:
            self._abort(exc)
            return
        finally:
            if answer is not Answer.NONE and not self._answered:
                self._on_first_answer()
            stats.in_flight -= 1
            stats.latency.record(loop.time() - now)
            stats.timeline.record(now, self._pacer.rate, answer)
            self._pacer.record(answer, retry_after, probe=probe)
        await self._settle(entry, kind, doc, line)

    def _arm_unreachable(self, exc: TransportError) -> None:
        """The first failed request before any answer starts the clock (a loop timer, so it
        fires even when every id is waiting out a backoff); later failures leave it be."""
        self._last_failure = exc  # the line names the latest cause
        if self._unreachable is not None or math.isinf(self._policy.unreachable_after):
            return
        self._unreachable = self._loop.call_later(
            self._policy.unreachable_after, self._give_up_unreachable
        )

    def _on_first_answer(self) -> None:
        """The server answered (any status): from now on outages are ridden out."""
        self._answered = True
        if self._unreachable is not None:
            self._unreachable.cancel()
            self._unreachable = None

    def _give_up_unreachable(self) -> None:
        self._unreachable = None
        if self._answered or self._stopping:
            return
        url, seconds = self._client.endpoint, f"{self._policy.unreachable_after:g}"
        cause = self._last_failure
        self._abort(
            UnreachableError(f"nothing answers at {url} for {seconds} s: {cause}; check --base-url")
        )

    def _on_throttled(self, entry: _Entry, exc: ThrottledError) -> None:
        """429/503: this id waits out its Retry-After on a timer, holding no slot; the pacer
        weighs the share of these to decide whether everyone slows down."""
        self._stats.count_throttled(exc.status)
        self._stats.errors[exc.label] += 1
        entry.last = exc.label
        wait = DEFAULT_RETRY_AFTER if exc.retry_after is None else exc.retry_after
        self._retry_later(entry, wait)

    def _on_transient(self, entry: _Entry, exc: TransientError) -> None:
        """Back off and retry, up to ``max_retries`` for this id; then leave it unresolved."""
        self._stats.errors[exc.label] += 1
        entry.failures += 1
        entry.last = exc.label
        if entry.failures > self._policy.max_retries:
            self._give_up(entry, f"{RETRIES_USED_UP}:{exc.label}")
        else:
            self._stats.retries += 1
            self._retry_later(entry, self._policy.backoff(entry.failures))

    async def _settle(
        self, entry: _Entry, kind: Kind, doc: Headline | Prepared | None, line: bytes | None
    ) -> None:
        schedule = self.schedule
        if kind is Kind.RETRIEVING:
            entry.last = "retrieving"
            schedule.not_ready(entry.sent if entry.waiting is None else entry.waiting, entry.sent)
            entry.waiting = entry.sent
            age = self._loop.time() - entry.first
            # The rate is the limit when the fresh ids waiting take longer than a poll
            # interval to send (and more than a round of the workers): a re-poll due before
            # then would put off a first poll. A cohort the rate sends in a second is not.
            backlog = max(self._concurrency, self._pacer.rate * self._policy.poll_interval)
            busy = self._fresh_waiting > backlog
            delay = schedule.next_poll(entry.polls, age, probe=entry.probe, busy=busy)
            self._retry_later(entry, delay)
            return
        if entry.waiting is not None and kind is not Kind.INVALID:  # ready between two polls
            schedule.found_ready(entry.waiting, entry.sent)
        # Noted and released before any wait: a cancel during back-pressure cannot count the
        # id twice (as done here and as unresolved in play).
        self._record(entry.id, kind, doc, entry.polls, line)
        self._release()
        await self._backpressure()

    def _retry_later(self, entry: _Entry, delay: float) -> None:
        """Poll ``entry`` again after ``delay``, but never past its deadline."""
        now = self._loop.time()
        if now >= entry.deadline:
            self._give_up(entry, f"{MAX_WAIT_REACHED}:{entry.last}")
            return
        due = min(now + delay, entry.deadline)
        if due <= now:
            self._due(entry)
        else:
            self._loop.call_at(due, self._due, entry)

    def _give_up(self, entry: _Entry, reason: str) -> None:
        """No row: the id is counted unresolved (and why) and the next run polls it again."""
        self._stats.count_unresolved(reason)
        self._release()

    def _release(self) -> None:
        self._in_play -= 1
        self._slots.release()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._feeding and self._in_play == 0 and not self._stopping:
            self.stop()

    def _record(
        self,
        conversation_id: str,
        kind: Kind,
        doc: Headline | Prepared | None,
        polls: int,
        line: bytes | None = None,
    ) -> None:
        """Count a terminal outcome and buffer its row (committed by the sink's next flush)."""
        self._stats.count_outcome(kind)
        self._sink.add(conversation_id, kind, doc, polls, line)

    async def _backpressure(self) -> None:
        if self._sink.overfull():
            await self._sink.make_room()  # memory stays bounded
