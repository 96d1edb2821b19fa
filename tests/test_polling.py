"""The learned re-poll schedule: its life table, its plan, and a scheduler that follows it.

The plan is checked on hazards given outright; the learning on virtual time (tests/clocks.py),
against a client whose ids become ready a set number of seconds after their first poll, as the
simulator's do. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import numpy as np
import pytest

from harvester.client import CompletionsClient
from harvester.errors import UsageError
from harvester.ids import Batch, classify
from harvester.idset import DoneSet, IdSet
from harvester.metrics import RunStats
from harvester.model import Completion, Kind
from harvester.pacer import Pacer
from harvester.polling import (
    DOCUMENTED_READY,
    NO_EXPECTATION,
    ExpectedReady,
    PollSchedule,
    ReadyTimes,
    plan_polls,
)
from harvester.scheduler import Policy, Scheduler
from harvester.sink import ParquetSink

from .clocks import virtual_time
from .conftest import completion, make_ids
from .test_scheduler import POLICY, LinelessAnswers, ListSink


@pytest.fixture(autouse=True)
def fixed_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jitter at its middle so that poll times are exact."""
    monkeypatch.setattr(random, "uniform", lambda a, b: (a + b) / 2)


# -- the life table ---------------------------------------------------------------------------


def test_ready_times_count_ids_at_risk_and_found_ready_per_bin() -> None:
    """100 ids seen not ready up to 5 s, 40 of them found ready between 5 and 7 s, the rest
    still not at 7 s: 40% became ready in bins 5-6; still-retrieving ids count as at risk, so
    the first fast ones do not pass for all of them."""
    times = ReadyTimes(1.0, 10, span=4)
    for _ in range(100):
        times.not_ready(0.0, 5.0)
    for _ in range(40):
        times.ready(5.0, 7.0)
    for _ in range(60):
        times.not_ready(5.0, 7.0)
    times.fit()
    assert times.exposure[:5].tolist() == [100.0] * 5
    assert times.hazard[:5].max() < 1e-3
    survived = (1 - times.hazard[5]) * (1 - times.hazard[6])
    assert 1 - survived == pytest.approx(0.4, abs=0.01)
    assert times.found == 40
    times.decay(0.5)
    assert (times.found, times.survived[0]) == (20.0, 50.0)


def test_overlapping_intervals_are_resolved_to_where_they_meet() -> None:
    """Ids ready at 7.7 s seen at shifted polls, (4, 8], (5, 9], (6, 10], (7.5, 11.5], each
    one also not ready up to its interval: the fit puts nearly all of them in [7.5, 8)."""
    times = ReadyTimes(0.5, 40, span=20)
    for after in (4.0, 5.0, 6.0, 7.5):
        for _ in range(25):
            times.not_ready(0.0, after)
            times.ready(after, after + 4.0)
    times.fit(iterations=200)
    alive = np.concatenate(([1.0], np.cumprod(1.0 - times.hazard)))
    assert alive[15] - alive[16] > 0.8  # ready in bin 15, [7.5, 8)


def test_intervals_too_wide_to_tell_are_not_kept() -> None:
    times = ReadyTimes(1.0, 100, span=10)
    times.ready(0.0, 50.0)
    assert times.found_in.sum() == 0.0
    assert times.found == 1.0


# -- the plan ---------------------------------------------------------------------------------


def two_clusters(width: float, bins: int) -> np.ndarray:
    """Half the ids ready in [7.5, 8) s, the other half in [14.5, 15) s."""
    hazard = np.zeros(bins)
    hazard[int(7.5 / width)] = 0.5
    hazard[int(14.5 / width)] = 1.0
    return hazard


def test_the_plan_polls_at_the_end_of_each_spell_of_readiness() -> None:
    """Two clusters: from the first poll, the next at 8 s (just after the first cluster), then
    15 s; no poll is closer than 4 s or further than 30 s apart."""
    width = 0.5
    plan = plan_polls(two_clusters(width, 60), width, lo=8, hi=60, lag_cost=1 / 2)
    assert plan[0] * width == 8.0
    assert plan[16] * width == 15.0
    gaps = plan[:-8] - np.arange(len(plan) - 8)
    assert gaps.min() >= 8
    assert gaps.max() <= 60


def test_a_dearer_lag_polls_more_often_where_nothing_is_known() -> None:
    """A flat hazard: the spacing shrinks as lag gets dearer, within the bounds."""
    hazard = np.full(400, 0.01)
    cheap = plan_polls(hazard, 0.5, lo=8, hi=60, lag_cost=1 / 80)
    dear = plan_polls(hazard, 0.5, lo=8, hi=60, lag_cost=1 / 2)
    dearest = plan_polls(hazard, 0.5, lo=8, hi=60, lag_cost=100.0)
    assert cheap[0] > dear[0] > dearest[0] == 8  # as often as allowed
    assert cheap[0] == 60  # a cheap lag: as seldom as allowed


def learned(delays: list[float], max_poll_interval: float = 30.0) -> PollSchedule:
    """A schedule that has seen ``delays`` (seconds to ready), each id polled every 0.5 s."""
    schedule = replace(POLICY, max_poll_interval=max_poll_interval).schedule()
    for delay in delays:
        last = (delay // 0.5) * 0.5
        schedule.not_ready(0.0, last)
        schedule.found_ready(last, last + 0.5)
    schedule.replan()
    return schedule


def test_the_schedule_keeps_to_the_policy_until_it_has_learned() -> None:
    """No plan before WARMUP ids are found ready: the policy's 4, 6, 9 s."""
    schedule = learned([7.7] * 5)
    schedule.replan()
    assert [schedule.next_poll(n, 0.0) for n in (1, 2, 3)] == [4.0, 6.0, 9.0]


def test_a_learned_schedule_polls_where_ids_become_ready() -> None:
    """After 200 ids ready at 7.5-8 s or 14.5-15 s: polls at 8 and 15 s (2% jitter at its
    middle: 1% late); past what was seen, the policy's rule again."""
    rng = random.Random(1)
    delays = [rng.uniform(7.5, 7.95) if i % 2 else rng.uniform(14.5, 14.95) for i in range(200)]
    schedule = learned(delays)
    assert schedule.next_poll(1, 0.0) == pytest.approx(8.0 * 1.01)
    assert schedule.next_poll(2, 8.05) == pytest.approx((15.0 - 8.05) * 1.01)
    assert schedule.horizon == pytest.approx(15.0)
    assert schedule.next_poll(3, 15.1) == POLICY.next_poll(3)


def test_while_fresh_ids_wait_polls_are_spent_more_sparingly() -> None:
    """Busy (fresh ids waiting for a first poll): the first cluster is not worth a poll of
    its own any more; the one poll at 15 s finds both."""
    rng = random.Random(1)
    delays = [rng.uniform(7.5, 7.95) if i % 2 else rng.uniform(14.5, 14.95) for i in range(200)]
    schedule = learned(delays)
    assert schedule.next_poll(1, 0.0, busy=True) == pytest.approx(15.0 * 1.01)
    assert schedule.next_poll(1, 0.0) == pytest.approx(8.0 * 1.01)


def test_probes_are_polled_every_one_to_two_intervals() -> None:
    schedule = learned([7.7] * 100)
    assert schedule.next_poll(1, 0.0, probe=True) == 4.0 * 1.5  # jitter at its middle
    assert not replace(POLICY, max_poll_interval=4.0).schedule().is_probe()


@pytest.mark.parametrize(
    ("delays", "first"),
    [
        ([0.3] * 100, (4.0, 4.1)),  # ready in a second: as soon as allowed
        ([290.0 + i * 0.1 for i in range(100)], (25.0, 30.6)),  # minutes: far apart at first
    ],
    ids=["1s", "5min"],
)
def test_distributions_unlike_the_simulators_stay_within_bounds(
    delays: list[float], first: tuple[float, float]
) -> None:
    """Whatever the ready times, every spacing stays within [poll_interval, max_poll_interval]."""
    schedule = learned(delays)
    assert first[0] <= schedule.next_poll(1, 0.0) <= first[1]
    for age in np.arange(0.0, schedule.horizon, 0.25):
        assert 4.0 <= schedule.next_poll(2, float(age)) <= 30.0 * 1.02


def test_a_fixed_interval_learns_nothing() -> None:
    """--poll-interval 4 --max-poll-interval 4: every re-poll 4 s later, whatever was seen."""
    schedule = learned([7.7] * 100, max_poll_interval=4.0)
    assert not schedule.learning
    assert schedule.horizon == 0.0
    assert schedule.next_poll(5, 12.3) == 4.0


# -- the scheduler learning on virtual time ---------------------------------------------------


class ReadyLater(LinelessAnswers):
    """Each id answers ``retrieving`` until its delay after its first poll, then completes."""

    endpoint = "http://127.0.0.1:1/ai/completions"

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.first: dict[str, float] = {}
        self.polls: dict[str, list[float]] = {k: [] for k in delays}
        self.lags: dict[str, float] = {}

    async def poll(self, conversation_id: str) -> tuple[Kind, Completion | None]:
        now = asyncio.get_running_loop().time()
        self.polls[conversation_id].append(now)
        ready_at = self.first.setdefault(conversation_id, now) + self.delays[conversation_id]
        await asyncio.sleep(0.01)
        if now < ready_at:
            return Kind.RETRIEVING, None
        self.lags[conversation_id] = now - ready_at
        return Kind.COMPLETED, completion()


async def harvest(
    delays: dict[str, float], policy: Policy, *, in_play: int = 40, rate: float = 1000.0
) -> tuple[ReadyLater, Scheduler]:
    client = ReadyLater(delays)
    scheduler = Scheduler(
        client=cast(CompletionsClient, client),
        pacer=Pacer(rate),
        sink=cast(ParquetSink, ListSink()),
        stats=RunStats(),
        policy=policy,
        concurrency=8,
        max_in_play=in_play,  # 40: ids enter as others finish, later ones meet a learned plan
    )

    async def batches() -> AsyncIterator[Batch]:
        ids = list(delays)
        yield classify(ids, list(range(1, len(ids) + 1)))

    await scheduler.run(batches(), IdSet(), DoneSet())
    return client, scheduler


@virtual_time
async def test_later_ids_are_found_sooner_with_fewer_polls_than_every_4s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1000 ids, half ready 7.5-8 s after their first poll, half 14.5-15 s: once learned, the
    last 300 need under 2.8 polls on average (probes included) and are found within a second
    of ready (median), where a fixed 4 s spends 3-5 polls and finds them ~2 s late."""
    monkeypatch.undo()
    random.seed(5)  # probes and their phases (the autouse jitter fixture is undone here)
    rng = random.Random(2)
    ids = make_ids(1000)
    delays = {
        cid: rng.uniform(7.5, 7.95) if i % 2 else rng.uniform(14.5, 14.95)
        for i, cid in enumerate(ids)
    }
    client, scheduler = await harvest(delays, POLICY)
    assert scheduler.schedule.plans > 0
    late = ids[700:]
    assert set(client.lags) == set(ids)
    assert statistics.mean(len(client.polls[cid]) for cid in late) < 2.8
    assert statistics.median(client.lags[cid] for cid in late) < 1.0
    fixed, _ = await harvest(delays, replace(POLICY, max_poll_interval=4.0))
    assert sum(len(fixed.polls[c]) for c in late) > 1.3 * sum(len(client.polls[c]) for c in late)
    median_lag = statistics.median(client.lags[c] for c in late)
    assert statistics.median(fixed.lags[c] for c in late) > 1.5 * median_lag


# -- the expected ready ranges a run starts from -----------------------------------------------


def test_expected_ready_reads_ranges_points_and_none() -> None:
    """The option's text: ranges and single ages, in seconds, or none; shown as it reads."""
    assert ExpectedReady.parse("7-8, 14 ,1.5-2").ranges == ((7.0, 8.0), (14.0, 14.0), (1.5, 2.0))
    assert ExpectedReady.parse(" None ").ranges == ()
    assert str(DOCUMENTED_READY) == "7-8,14-15,18-51,30-40"
    assert ExpectedReady.parse(str(DOCUMENTED_READY)) == DOCUMENTED_READY
    assert str(NO_EXPECTATION) == "none"
    assert DOCUMENTED_READY.scaled(0.5).ranges[0] == (3.5, 4.0)


@pytest.mark.parametrize("text", ["", "8-7", "a-b", "7-8,", "-3", "1e9999-1e99999", "7..8"])
def test_expected_ready_refuses_what_is_not_ranges_of_seconds(text: str) -> None:
    """Each refusal says what ranges look like (the CLI and config name the setting)."""
    with pytest.raises(UsageError, match="range"):
        ExpectedReady.parse(text)


def test_expected_ready_ages_spread_evenly_over_each_range() -> None:
    """The same count in each range, none outside it."""
    ages = ExpectedReady(((7.0, 8.0), (20.0, 20.0))).ages(8)
    assert len(ages) == 8
    assert all(7.0 < a < 8.0 for a in ages[:4])
    assert list(ages[4:]) == [20.0] * 4


def test_the_documented_ranges_plan_the_first_polls_just_after_each() -> None:
    """Before any id is seen, a schedule seeded with the public timings polls an id again
    just after 8 s and then just after 15 s (the gemini and chatgpt ranges), not at 4, 10 s."""
    schedule = replace(POLICY, expected_ready=DOCUMENTED_READY).schedule()
    assert schedule.plans == 1
    first = schedule.next_poll(1, 0.0)
    assert 8.0 <= first <= 8.5
    second = first + schedule.next_poll(2, first)
    assert 15.0 <= second <= 15.6
    assert schedule.horizon > 30.0


def test_no_expectation_or_a_fixed_interval_keeps_to_the_rule() -> None:
    """``none``: 4 s growing 1.5x until learned; a fixed interval ignores the ranges."""
    assert POLICY.schedule().next_poll(1, 0.0) == 4.0
    fixed = replace(POLICY, max_poll_interval=4.0, expected_ready=DOCUMENTED_READY).schedule()
    assert fixed.plans == 0
    assert fixed.next_poll(3, 8.1) == 4.0


@virtual_time
async def test_a_cohort_is_found_with_fewer_polls_and_no_later_than_every_4s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """400 ids all in play at once, ready 7-8 s or 14-15 s after their first poll: with the
    ranges expected, nothing has to be learned first; against a fixed 4 s the cohort needs
    under 0.7x the polls and its median id is found no later."""
    monkeypatch.undo()
    random.seed(6)
    rng = random.Random(3)
    ids = make_ids(400)
    delays = {
        cid: rng.uniform(7.0, 7.95) if i % 2 else rng.uniform(14.0, 14.95)
        for i, cid in enumerate(ids)
    }
    expected = replace(POLICY, expected_ready=ExpectedReady(((7.0, 8.0), (14.0, 15.0))))
    client, _ = await harvest(delays, expected, in_play=400)
    fixed, _ = await harvest(delays, replace(POLICY, max_poll_interval=4.0), in_play=400)
    assert set(client.lags) == set(fixed.lags) == set(ids)
    polls = sum(len(p) for p in client.polls.values())
    assert polls < 0.7 * sum(len(p) for p in fixed.polls.values())
    assert statistics.median(client.lags.values()) <= statistics.median(fixed.lags.values())


@virtual_time
async def test_re_polls_wait_longer_only_while_the_rate_holds_first_polls_back() -> None:
    """The same 200 ids, all in play: at 1000/s their first polls take 0.2 s, so an id is asked
    again just after the first range (8 s); at 10/s they take 20 s, longer than a poll
    interval, and the first range is not worth a re-poll that puts off a first poll."""
    ids = make_ids(200)
    delays = dict.fromkeys(ids, 14.5)
    policy = replace(POLICY, expected_ready=ExpectedReady(((7.0, 8.0), (14.0, 15.0))))
    fast, _ = await harvest(delays, policy, in_play=200)
    assert 8.0 <= fast.polls[ids[0]][1] - fast.polls[ids[0]][0] <= 8.6
    slow, _ = await harvest(delays, policy, in_play=200, rate=10.0)
    assert slow.polls[ids[0]][1] - slow.polls[ids[0]][0] >= 15.0
    assert len(slow.polls[ids[0]]) == 2
