"""The scheduler on virtual time: when each id is polled again, and that waiting holds no slot.

The client is a script (what each poll of each id answers), the sink a list; the loop's clock
is virtual (tests/clocks.py), so a Retry-After of 180 s is exact and costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import pytest

from harvester.client import CompletionsClient
from harvester.errors import (
    BadResponseError,
    ExitCode,
    ServerError,
    ThrottledError,
    TransientError,
    TransportError,
    UnreachableError,
)
from harvester.ids import Batch, classify
from harvester.idset import DoneSet, IdSet
from harvester.metrics import RETRIES_USED_UP, RunStats
from harvester.model import Completion, Kind
from harvester.pacer import Pacer
from harvester.scheduler import ADMIT_PER_STEP, Policy, Scheduler
from harvester.sink import ParquetSink

from .clocks import virtual_time
from .conftest import completion, make_ids

POLICY = Policy(
    poll_interval=4.0,
    max_poll_interval=30.0,
    max_wait=600.0,
    max_retries=3,
    backoff_base=0.5,
    backoff_max=30.0,
)
Answer = Kind | TransientError


class LinelessAnswers:
    """``poll_answer`` from a fake client's ``poll``, with no JSON line: the sink stores such
    a row from its strings."""

    async def poll(self, conversation_id: str) -> tuple[Kind, Completion | None]:
        raise NotImplementedError

    async def poll_answer(
        self, conversation_id: str
    ) -> tuple[Kind, Completion | None, bytes | None]:
        kind, doc = await self.poll(conversation_id)
        return kind, doc, None


class ScriptedClient(LinelessAnswers):
    """Answers each id's polls in turn from its script; records when each poll came."""

    endpoint = "http://127.0.0.1:1/ai/completions"  # named in the unreachable line

    def __init__(self, script: dict[str, list[Answer]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.polls: dict[str, list[float]] = {k: [] for k in script}
        self.in_flight = 0
        self.peak_in_flight = 0

    async def poll(self, conversation_id: str) -> tuple[Kind, Completion | None]:
        loop = asyncio.get_running_loop()
        self.polls[conversation_id].append(loop.time())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # a quick answer
        finally:
            self.in_flight -= 1
        answer = self.script[conversation_id].pop(0)
        if isinstance(answer, TransientError):
            raise answer
        return answer, completion() if answer is Kind.COMPLETED else None


class ListSink:
    """Keeps rows in memory (the scheduler only calls add and, under pressure, flush)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Kind, int]] = []

    def add(
        self,
        conversation_id: str,
        kind: Kind,
        doc: Completion | None,
        polls: int,
        body: bytes | None = None,
    ) -> None:
        self.rows.append((conversation_id, kind, polls))

    def overfull(self) -> bool:
        return False

    async def make_room(self) -> None:
        return None


async def batches_of(ids: list[str]) -> AsyncIterator[Batch]:
    yield classify(ids, list(range(1, len(ids) + 1)))


async def run(
    script: dict[str, list[Answer]], *, concurrency: int = 4, rate: float = 1000.0
) -> tuple[ScriptedClient, ListSink, RunStats]:
    client, sink, stats, _ = await run_with(script, concurrency=concurrency, rate=rate)
    return client, sink, stats


async def run_with(
    script: dict[str, list[Answer]],
    *,
    policy: Policy = POLICY,
    concurrency: int = 4,
    rate: float = 1000.0,
) -> tuple[ScriptedClient, ListSink, RunStats, Scheduler]:
    """Run the script to its end; the scheduler is returned too, for ``fatal``."""
    client, sink, stats = ScriptedClient(script), ListSink(), RunStats()
    scheduler = Scheduler(
        client=cast(CompletionsClient, client),
        pacer=Pacer(rate),
        sink=cast(ParquetSink, sink),
        stats=stats,
        policy=policy,
        concurrency=concurrency,
        max_in_play=1000,
    )
    assert not scheduler.input_read()
    await scheduler.run(batches_of(list(script)), IdSet(), DoneSet())
    return client, sink, stats, scheduler


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in itertools.pairwise(times)]


@pytest.fixture(autouse=True)
def fixed_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jitter at its middle (1.0x) so that re-poll times are exact, and no id drawn as one of
    the learning schedule's probes (``polling.PROBE_SHARE`` of ids, polled on their own
    random spacing): these tests are about the rule a run starts with."""
    monkeypatch.setattr(random, "uniform", lambda a, b: (a + b) / 2)
    monkeypatch.setattr(random, "random", lambda: 0.5)


@virtual_time
async def test_retrieving_ids_are_polled_at_growing_intervals() -> None:
    """4 s, then 1.5x a poll: 4, 6, 9 s between polls, then the answer is stored once."""
    [cid] = make_ids(1)
    polls: list[Answer] = [Kind.RETRIEVING, Kind.RETRIEVING, Kind.RETRIEVING, Kind.COMPLETED]
    client, sink, _ = await run({cid: polls})
    assert gaps(client.polls[cid]) == [4.01, 6.01, 9.01]
    assert sink.rows == [(cid, Kind.COMPLETED, 4)]


@virtual_time
async def test_a_retry_after_belongs_to_the_id_that_got_it() -> None:
    """One id gets 429 "retry in 180 s": it is asked again 180 s later, not before; the
    others, answered at once, are not held back by it, and no slot is held meanwhile."""
    slow, *others = make_ids(30)
    script: dict[str, list[Answer]] = {slow: [ThrottledError(429, 180.0), Kind.COMPLETED]}
    script.update({cid: [Kind.COMPLETED] for cid in others})
    client, sink, stats = await run(script, concurrency=2)
    [first, second] = client.polls[slow]
    assert second - first == pytest.approx(180.0 + 0.01, abs=0.02)
    assert max(times[0] for cid, times in client.polls.items() if cid != slow) < 5.0
    assert len(sink.rows) == 30
    assert stats.throttled_429 == 1
    assert client.peak_in_flight <= 2


@virtual_time
async def test_a_503_without_retry_after_waits_a_second() -> None:
    """No Retry-After: the id waits the default second, and the 503 is counted apart."""
    [cid] = make_ids(1)
    client, _, stats = await run({cid: [ThrottledError(503, None), Kind.FAILED]})
    assert gaps(client.polls[cid]) == [1.01]
    assert (stats.throttled_503, stats.throttled_429) == (1, 0)


@virtual_time
async def test_transient_errors_back_off_then_the_id_is_left_unresolved() -> None:
    """Backoff 0.5 s doubling (jitter at its middle: 0.75x the ceiling); after max_retries
    the id has no row and counts as unresolved."""
    [cid] = make_ids(1)
    errors: list[Answer] = [TransportError("timeout", "t") for _ in range(POLICY.max_retries + 1)]
    client, sink, stats = await run({cid: errors})
    assert gaps(client.polls[cid]) == [0.39, 0.76, 1.51]
    assert sink.rows == []
    assert (stats.unresolved, stats.retries) == (1, POLICY.max_retries)


@virtual_time
async def test_a_due_re_poll_goes_before_every_fresh_id() -> None:
    """One worker at 10 requests a second and 100 fresh ids: the first id, retrieving, is
    asked again when due (4 s later, plus a request's wait), not after the other 99 (~10 s)."""
    first, *others = make_ids(100)
    script: dict[str, list[Answer]] = {first: [Kind.RETRIEVING, Kind.COMPLETED]}
    script.update({cid: [Kind.COMPLETED] for cid in others})
    client, sink, _ = await run(script, concurrency=1, rate=10.0)
    [asked, again] = client.polls[first]
    assert again - asked == pytest.approx(4.0, abs=0.25)
    assert max(times[0] for times in client.polls.values()) > 9.0  # the fresh ones took ~10 s
    assert len(sink.rows) == 100


def test_policy_spacing_and_backoff_bounds() -> None:
    """Re-poll spacing grows 1.5x to its cap; backoff stays within [ceiling/2, ceiling]."""
    rng_free = Policy(**{**vars_of(POLICY), "max_poll_interval": 10.0})
    assert [round(rng_free.next_poll(n), 3) for n in (1, 2, 3, 4)] == [4.0, 6.0, 9.0, 10.0]
    assert [rng_free.backoff(n) for n in (1, 2, 3, 10)] == [0.375, 0.75, 1.5, 22.5]


def vars_of(policy: Policy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in Policy.__dataclass_fields__}


# -- nothing answers: fail fast (--unreachable-after) -----------------------------------------

REFUSED = TransportError("connect_error", "connection refused")
# Retries far apart (backoff up to 100 s), many of them: only the deadline can end the run soon.
PATIENT = Policy(**{**vars_of(POLICY), "max_retries": 50, "backoff_max": 100.0})


def refused(count: int = 60) -> list[Answer]:
    return [REFUSED for _ in range(count)]


@virtual_time
async def test_nothing_answering_stops_the_run_at_the_deadline_from_the_first_failure() -> None:
    """Every request refused: the run stops with UnreachableError 30 s after the first failed
    request, by a timer (no request is in flight then: the id is out a backoff), naming the
    URL and the cause; not after all 50 retries."""
    [cid] = make_ids(1)
    policy = replace(PATIENT, unreachable_after=30.0)
    loop = asyncio.get_running_loop()
    client, sink, _, scheduler = await run_with({cid: refused()}, policy=policy)
    first_failure = client.polls[cid][0] + 0.01  # the scripted answer takes 0.01 s
    assert isinstance(scheduler.fatal, UnreachableError)
    assert loop.time() == pytest.approx(first_failure + 30.0, abs=0.01)
    # Asked at backoffs 0.375, 0.75, 1.5, ... 24 s: the last poll is long before the deadline.
    assert all(abs(t - (first_failure + 30.0)) > 0.5 for t in client.polls[cid])
    assert str(scheduler.fatal) == (
        f"nothing answers at {client.endpoint} for 30 s: connection refused; check --base-url"
    )
    assert scheduler.fatal.exit_code is ExitCode.UNREACHABLE
    assert sink.rows == []
    assert len(client.polls[cid]) < 10


@virtual_time
async def test_the_latest_cause_is_named() -> None:
    """Refused, then timing out: the line says what failed last."""
    [cid] = make_ids(1)
    timeouts: list[Answer] = [TransportError("timeout", "connect timeout") for _ in range(60)]
    policy = replace(PATIENT, unreachable_after=5.0)
    _, _, _, scheduler = await run_with({cid: [REFUSED, *timeouts]}, policy=policy)
    assert isinstance(scheduler.fatal, UnreachableError)
    assert ": connect timeout; check --base-url" in str(scheduler.fatal)


@pytest.mark.parametrize(
    "first",
    [
        ServerError(500),  # any HTTP status is an answer: the server is there
        ThrottledError(429, 1.0),
        BadResponseError("bad_json", "body is not valid JSON"),
        Kind.RETRIEVING,
    ],
    ids=["500", "429", "bad_json", "retrieving"],
)
@virtual_time
async def test_once_the_server_answered_an_outage_is_ridden_out(first: Answer) -> None:
    """One answer of any kind, then refused for good: no deadline, the id keeps its retries
    and ends unresolved (exit 1 as before), long after the 30 s a dead URL would get."""
    [cid] = make_ids(1)
    policy = replace(PATIENT, unreachable_after=30.0, max_retries=8)
    loop = asyncio.get_running_loop()
    _, sink, stats, scheduler = await run_with({cid: [first, *refused()]}, policy=policy)
    assert scheduler.fatal is None
    assert (stats.unresolved, sink.rows) == (1, [])
    assert loop.time() > 60.0
    assert stats.errors["connect_error"] >= policy.max_retries


@virtual_time
async def test_another_id_answering_before_the_deadline_disarms_it() -> None:
    """Refused for one id, then another id gets an answer 10 s later: no stop at 30 s."""
    dead, alive = make_ids(2)
    policy = replace(PATIENT, unreachable_after=30.0, max_retries=8)
    late: list[Answer] = [REFUSED, REFUSED, REFUSED, REFUSED, REFUSED, Kind.COMPLETED]
    _, sink, stats, scheduler = await run_with({dead: refused(), alive: late}, policy=policy)
    assert scheduler.fatal is None
    assert [row[:2] for row in sink.rows] == [(alive, Kind.COMPLETED)]
    assert stats.unresolved == 1


@virtual_time
async def test_without_a_deadline_refused_ids_use_up_their_retries() -> None:
    """The policy's default (no deadline, as a Scheduler built without one): exit 1's path."""
    [cid] = make_ids(1)
    client, _, stats, scheduler = await run_with({cid: refused()}, policy=POLICY)
    assert scheduler.fatal is None
    assert stats.unresolved_reasons == {f"{RETRIES_USED_UP}:connect_error": 1}
    assert len(client.polls[cid]) == POLICY.max_retries + 1


@virtual_time
async def test_input_read_once_the_feeder_is_done() -> None:
    """``input_read()`` turns true when the whole input has been taken in."""
    ids = make_ids(5)
    _, _, stats, scheduler = await run_with({cid: [Kind.COMPLETED] for cid in ids})
    assert scheduler.input_read()
    assert stats.unique_ids == 5


@virtual_time
async def test_the_feeder_admits_a_bounded_number_of_ids_per_loop_turn() -> None:
    """With rooms free for a whole batch, the feeder still hands the loop back every
    ``ADMIT_PER_STEP`` ids: admitting thousands in one step held the loop for milliseconds."""
    ids = make_ids(5 * ADMIT_PER_STEP + 7)
    client, sink = ScriptedClient({cid: [Kind.COMPLETED] for cid in ids}), ListSink()
    scheduler = Scheduler(
        client=cast(CompletionsClient, client),
        pacer=Pacer(1e6),
        sink=cast(ParquetSink, sink),
        stats=RunStats(),
        policy=POLICY,
        concurrency=1,
        max_in_play=len(ids),
    )
    seen: list[int] = []

    async def watch() -> None:
        for _ in range(100_000):  # bounded: the feeder is done long before
            seen.append(scheduler.in_play)
            if scheduler.input_read():
                return
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await scheduler.run(batches_of(ids), IdSet(), DoneSet())
    await watcher
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= ADMIT_PER_STEP
    assert sum(s for s in steps if s > 0) >= len(ids) - ADMIT_PER_STEP  # it saw them come in
    assert len(sink.rows) == len(ids)
