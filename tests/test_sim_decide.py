"""Tests of the simulator's parts: the pure decision, the fault matrix and its draws, the
throttling scenarios (first-poll throttle, saturation, capacity) and the per-second stats."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import formatdate
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harvester.sim import (
    PROFILES,
    STATS_KEY,
    Profile,
    SimulatorStats,
    expected_completion,
    make_app,
    plan_for,
    serve,
)
from harvester.sim.decide import (
    HTML,
    JSON,
    TEXT,
    Answer,
    CapacityBucket,
    Poll,
    Send,
    Setup,
    check_auth,
    check_id,
    check_saturation,
    decide,
    needs_fault,
)
from harvester.sim.faults import TABLE_FAULTS, DrawnFault, Fault, FaultDraws
from harvester.sim.plans import IdPlan
from harvester.sim.stats import TIMELINE_KEYS, Timeline

from .clocks import FakeClock
from .conftest import make_ids

Client = TestClient[web.Request, web.Application]

TOKEN = "sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
PATH = "/ai/completions"
INSTANT = PROFILES["instant"]
QUIET = dataclasses.replace(PROFILES["realistic"].without_faults(), latency_median_s=0.0)


def a_plan(profile: Profile = INSTANT, *, fails: bool = False, seed: int = 0) -> IdPlan:
    """The plan of the first reproducible id that fails (or completes) under ``profile``."""
    for id_ in make_ids(5000, seed=1):
        plan = plan_for(id_, seed=seed, profile=profile)
        if plan.fails == fails:
            return plan
    raise AssertionError("no such id within 5000 tries")


@asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[Client]:
    """Serve ``app`` on a loopback port and yield a client for it."""
    async with TestClient(TestServer(app)) as client:
        yield client


async def get(
    client: Client, id_: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """GET /ai/completions and return status, body and headers."""
    async with client.get(
        PATH, params={"id": id_}, headers=AUTH if headers is None else headers
    ) as r:
        return r.status, await r.read(), dict(r.headers)


# -- the pure decision ------------------------------------------------------------------------


async def test_the_server_sends_what_decide_decides() -> None:
    """Over HTTP, status, content type and body are those of the pure decision's Answer."""
    clock = FakeClock()
    setup = Setup(QUIET)
    plan = a_plan(QUIET)
    ready_at = plan.ready_delay_s
    polls = [
        (0.0, AUTH, Poll(plan=plan, now=0.0, ready_at=ready_at)),
        (ready_at, AUTH, Poll(plan=plan, now=ready_at, ready_at=ready_at)),
        (
            ready_at,
            {**AUTH, "Accept": "text/html"},
            Poll(plan, ready_at, ready_at, wants_html=True),
        ),
    ]
    async with running(make_app(profile=QUIET, clock=clock)) as client:
        for now, headers, poll in polls:
            clock.now = now
            async with client.get(PATH, params={"id": plan.id}, headers=headers) as response:
                served = (response.status, response.content_type, await response.read())
            answer = decide(poll, None, setup)
            assert served == (answer.status, answer.content_type, answer.body)


def test_decide_follows_the_plan_without_a_server() -> None:
    """Before the ready time 202 retrieving; after it the 200 Completion, or 202 failed."""
    setup = Setup(profile=INSTANT, seed=0)
    plan = a_plan()
    retrieving = decide(Poll(plan=plan, now=1.0, ready_at=2.0), None, setup)
    assert (retrieving.status, retrieving.body, retrieving.send) == (
        202,
        b'{"status":"retrieving"}',
        Send.WHOLE,
    )
    done = decide(Poll(plan=plan, now=2.0, ready_at=2.0), None, setup)
    assert (done.status, done.content_type) == (200, JSON)
    assert done.body == orjson.dumps(expected_completion(plan.id, seed=0, profile=INSTANT))
    html = decide(Poll(plan=plan, now=2.0, ready_at=2.0, wants_html=True), None, setup)
    assert (html.status, html.content_type) == (200, HTML)
    assert html.body.decode().startswith("<!DOCTYPE html>")
    failed = decide(Poll(plan=a_plan(fails=True), now=9.0, ready_at=2.0), None, setup)
    assert (failed.status, failed.body) == (202, b'{"status":"failed"}')


@pytest.mark.parametrize(
    ("fault", "status", "content_type", "body"),
    [
        (DrawnFault(Fault.ERROR_500), 500, TEXT, b"Unknown error occurred"),
        (DrawnFault(Fault.ERROR_502), 502, TEXT, b"Bad gateway"),
        (DrawnFault(Fault.ERROR_504), 504, TEXT, b"Request(s) timed out"),
        (DrawnFault(Fault.UNKNOWN_CODE, status=418), 418, TEXT, b"Not here"),
        (DrawnFault(Fault.UNKNOWN_STATUS), 202, JSON, b'{"status": "queued"}'),
        (DrawnFault(Fault.HTML_BODY), 200, HTML, b"<html><body>rendered</body></html>"),
    ],
)
def test_faults_that_replace_the_answer(
    fault: DrawnFault, status: int, content_type: str, body: bytes
) -> None:
    """Error and bad-body faults answer the same whatever the id's state."""
    for now in (0.0, 5.0):  # retrieving, then completed: the fault wins either way
        answer = decide(Poll(plan=a_plan(), now=now, ready_at=1.0), fault, Setup(INSTANT))
        assert (answer.status, answer.content_type, answer.body) == (status, content_type, body)


def test_faults_that_change_how_the_answer_is_sent() -> None:
    """Truncate cuts only a 200 JSON body; cut, drip and stall keep the body and change delivery."""
    setup = Setup(dataclasses.replace(INSTANT, stall_s=120.0), time_scale=0.01)
    ready = Poll(plan=a_plan(), now=5.0, ready_at=1.0)
    whole = decide(ready, None, setup)
    truncated = decide(ready, DrawnFault(Fault.TRUNCATE), setup)
    assert truncated.truncated
    assert truncated.body == whole.body[: len(whole.body) // 2]
    retrieving = Poll(plan=a_plan(), now=0.0, ready_at=1.0)
    assert decide(retrieving, DrawnFault(Fault.TRUNCATE), setup) == decide(retrieving, None, setup)
    html = dataclasses.replace(ready, wants_html=True)
    assert not decide(html, DrawnFault(Fault.TRUNCATE), setup).truncated
    assert decide(ready, DrawnFault(Fault.DROP_AFTER_HEADERS), setup).send is Send.CUT
    assert decide(ready, DrawnFault(Fault.SLOW_DRIP), setup).send is Send.DRIP
    stalled = decide(ready, DrawnFault(Fault.STALL), setup)
    assert stalled.body == whole.body
    assert stalled.delay_s == pytest.approx(1.2)
    assert decide(ready, DrawnFault(Fault.DROP), setup).send is Send.DROP


def test_throttle_faults_carry_the_drawn_retry_after() -> None:
    """429/503 faults say their wait in the header and the message, scaled when time is."""
    poll = Poll(plan=a_plan(), now=5.0, ready_at=1.0)
    for fault, status in ((Fault.THROTTLE_429, 429), (Fault.UNAVAILABLE_503, 503)):
        real = decide(poll, DrawnFault(fault, retry_after_s=3), Setup(INSTANT))
        assert (real.status, real.retry_after, real.cause) == (status, "3", "fault")
        assert b"please retry in 3 seconds" in real.body
        scaled = decide(poll, DrawnFault(fault, retry_after_s=3), Setup(INSTANT, time_scale=0.01))
        assert scaled.retry_after == "0.03"


def test_retry_after_as_an_http_date_uses_the_given_wall_clock() -> None:
    """With retry_after_http_date the header is the wall time plus the wait, rounded up."""
    setup = Setup(dataclasses.replace(INSTANT, retry_after_http_date=True), time_scale=0.5)
    poll = Poll(plan=a_plan(), now=5.0, ready_at=1.0, wall_now=1_700_000_000.0)
    answer = decide(poll, DrawnFault(Fault.THROTTLE_429, retry_after_s=3), setup)
    assert answer.retry_after == formatdate(1_700_000_000.0 + 2, usegmt=True)


def test_capacity_bucket_admits_its_rate_and_refused_requests_use_none() -> None:
    """A token bucket of 10/s with 0.1 s of burst: 2 at once, then one every 0.1 s, however
    many more are sent (those refused do not use capacity)."""
    bucket = CapacityBucket(10.0)
    admitted = [t / 100 for t in range(300) if bucket.admit(t / 100)]  # 100 tries a second
    assert admitted[:3] == [0.0, 0.0 + 0.01, 0.1]
    assert len(admitted) == pytest.approx(31, abs=1)
    assert all(CapacityBucket(0.0).admit(t) for t in range(100))


def test_capacity_throttles_before_any_fault_is_drawn() -> None:
    """Refused by the capacity bucket: 429 Retry-After 1 and no fault draw."""
    setup = Setup(dataclasses.replace(INSTANT, capacity_rps=5.0))
    at_capacity = Poll(plan=a_plan(), now=5.0, ready_at=1.0)
    over = dataclasses.replace(at_capacity, over_capacity=True)
    assert needs_fault(at_capacity, setup)
    assert decide(at_capacity, None, setup).status == 200
    assert not needs_fault(over, setup)
    answer = decide(over, DrawnFault(Fault.ERROR_500), setup)
    assert (answer.status, answer.retry_after, answer.cause) == (429, "1", "capacity")


def test_auth_id_and_saturation_checks_are_pure() -> None:
    """The checks that run before the id's own answer need no server either."""
    assert check_auth(None, None) is None
    assert check_auth(f"Bearer {TOKEN}", TOKEN) is None
    statuses = [
        a.status
        for a in (
            check_auth(None, TOKEN),
            check_auth("Bearer nope", TOKEN),
            check_auth("Bearer no-credit", None),
        )
        if a is not None
    ]
    assert statuses == [401, 403, 402]
    assert check_id(str(uuid.uuid4())) is None
    assert [a.status for a in (check_id(""), check_id("x" * 300), check_id("x")) if a] == [422] * 3
    setup = Setup(dataclasses.replace(INSTANT, saturated_s=10.0, saturated_retry_after_s=4))
    saturated = check_saturation(9.99, setup, wall_now=0.0)
    assert saturated is not None
    assert (saturated.status, saturated.retry_after, saturated.cause) == (429, "4", "saturated")
    assert saturated.body == b"Rate limit was exceeded; please retry in 4 seconds"
    assert check_saturation(10.0, setup, wall_now=0.0) is None
    assert check_saturation(0.0, Setup(INSTANT), wall_now=0.0) is None  # off by default


# -- the fault matrix -------------------------------------------------------------------------


def _every_fault_on() -> Profile:
    """A valid profile with every fault of the enum turned on."""
    changes: dict[str, Any] = {f.field: 0.02 for f in TABLE_FAULTS}
    changes.update(
        slow_share=0.1,
        burst_period_s=10.0,
        burst_length_s=1.0,
        burst_fault_share=0.5,
        first_poll_throttle_share=0.2,
        saturated_s=3.0,
        capacity_rps=50.0,
    )
    return dataclasses.replace(INSTANT, name="everything", **changes)


def test_without_faults_zeroes_every_fault_member() -> None:
    """without_faults() is derived from the enum: each member's field is zero afterwards."""
    noisy = _every_fault_on()
    assert all(getattr(noisy, f.field) > 0 for f in Fault)
    calm = noisy.without_faults()
    assert {f: getattr(calm, f.field) for f in Fault} == dict.fromkeys(Fault, 0)
    assert calm.fault_share() == 0
    assert calm.name == "everything-calm"
    # Timings and content are untouched.
    assert (calm.models, calm.html_bytes, calm.fail_share) == (
        noisy.models,
        noisy.html_bytes,
        noisy.fail_share,
    )


def test_every_fault_knob_of_the_profile_has_a_member() -> None:
    """Every request-level share of Profile belongs to a Fault member, so none is forgotten."""
    profile_fields = {f.name for f in dataclasses.fields(Profile)}
    fault_fields = {f.field for f in Fault}
    assert fault_fields <= profile_fields
    id_shares = {"fail_share", "targeted_share"}  # what an id is, not a fault
    assert {n for n in profile_fields if n.endswith("_share")} - id_shares <= fault_fields
    assert len(fault_fields) == len(Fault)


def test_every_table_fault_changes_the_answer() -> None:
    """The dispatch covers the whole table: no table fault answers like no fault at all."""
    setup = Setup(dataclasses.replace(INSTANT, oversize_bytes=100))
    ready = Poll(plan=a_plan(), now=5.0, ready_at=1.0)
    plain = decide(ready, None, setup)
    for fault in TABLE_FAULTS:
        drawn = DrawnFault(fault, retry_after_s=1, status=404)
        assert decide(ready, drawn, setup) != plain, fault


def test_fault_draws_follow_the_shares_and_draw_what_they_need() -> None:
    """One uniform draw per request against the table; throttles and unknown codes draw more."""
    shares = {Fault.ERROR_500: 0.2, Fault.THROTTLE_429: 0.1, Fault.UNKNOWN_CODE: 0.1}
    draws = FaultDraws(random.Random(1), shares, retry_after_s=(2, 4))
    got = [draws.draw(0.0) for _ in range(10_000)]
    counts = Counter(None if d is None else d.fault for d in got)
    assert 0.18 < counts[Fault.ERROR_500] / 10_000 < 0.22
    assert 0.08 < counts[Fault.THROTTLE_429] / 10_000 < 0.12
    assert 0.57 < counts[None] / 10_000 < 0.63
    assert {d.retry_after_s for d in got if d and d.fault is Fault.THROTTLE_429} == {2, 3, 4}
    assert {d.status for d in got if d and d.fault is Fault.UNKNOWN_CODE} == {404, 418}
    assert FaultDraws(random.Random(1), {}, retry_after_s=(1, 1)).draw(0.0) is None


def test_bursts_answer_5xx_only_inside_the_window() -> None:
    """In the last burst_length_s of each period, burst_share of requests get 500/502/504."""
    draws = FaultDraws(
        random.Random(2),
        {},
        retry_after_s=(1, 1),
        burst_period_s=10.0,
        burst_length_s=2.0,
        burst_share=0.5,
    )
    assert all(draws.draw(t / 100) is None for t in range(800))  # 0 <= t < 8: calm
    inside = [draws.draw(18.0 + t / 1000) for t in range(1000)]
    faults = Counter(d.fault for d in inside if d is not None)
    assert set(faults) == {Fault.ERROR_500, Fault.ERROR_502, Fault.ERROR_504}
    assert 0.45 < sum(faults.values()) / 1000 < 0.55


# -- first-poll throttle ----------------------------------------------------------------------


def test_first_poll_throttle_picks_its_share_of_ids_by_their_digest() -> None:
    """About 6% of 2000 ids are picked, half 429 and half 503, the same way every time."""
    profile = dataclasses.replace(INSTANT, first_poll_throttle_share=0.06, retry_after_s=(1, 5))
    ids = list(make_ids(2000, seed=3))
    picked = [t for i in ids if (t := plan_for(i, seed=0, profile=profile).first_poll_throttle)]
    assert 0.04 < len(picked) / 2000 < 0.08
    statuses = Counter(t.status for t in picked)
    assert set(statuses) == {429, 503}
    assert 0.3 < statuses[429] / len(picked) < 0.7
    assert {t.retry_after_s for t in picked} <= set(range(1, 6))
    assert len({t.retry_after_s for t in picked}) > 1
    again = [plan_for(i, seed=0, profile=profile).first_poll_throttle for i in ids]
    assert [t for t in again if t] == picked
    assert all(plan_for(i, seed=0, profile=INSTANT).first_poll_throttle is None for i in ids)


async def test_first_poll_throttle_hits_only_the_first_request() -> None:
    """Picked ids get 429/503 with their Retry-After (real seconds) once, then answer normally;
    the others answer at once."""
    profile = dataclasses.replace(INSTANT, first_poll_throttle_share=0.06, retry_after_s=(1, 5))
    ids = list(make_ids(2000, seed=3))
    plans = {i: plan_for(i, seed=0, profile=profile) for i in ids}
    picked = [i for i in ids if plans[i].first_poll_throttle is not None]
    others = [i for i in ids if plans[i].first_poll_throttle is None][:40]
    app = make_app(profile=profile, clock=FakeClock())
    async with running(app) as client:
        for id_ in picked:
            throttle = plans[id_].first_poll_throttle
            assert throttle is not None
            status, body, headers = await get(client, id_)
            assert (status, headers["Retry-After"]) == (
                throttle.status,
                str(throttle.retry_after_s),
            )
            assert f"please retry in {throttle.retry_after_s} seconds".encode() in body
            normal = 202 if plans[id_].fails else 200  # 202 failed: its conversation failed
            assert (await get(client, id_))[0] == normal
            assert (await get(client, id_.upper()))[0] == normal  # the same id
        for id_ in others:
            assert (await get(client, id_))[0] == (202 if plans[id_].fails else 200)
    stats = app[STATS_KEY]
    assert stats.throttled == {"first_poll": len(picked)}
    assert stats.by_status.get(429, 0) + stats.by_status.get(503, 0) == len(picked)


# -- saturation -------------------------------------------------------------------------------


async def test_saturation_throttles_everything_for_a_window_after_the_first_request() -> None:
    """For saturated_s after the server's first request every authorised request gets 429
    with Retry-After saturated_retry_after_s; then the server answers normally."""
    clock = FakeClock(100.0)
    profile = dataclasses.replace(INSTANT, saturated_s=5.0, saturated_retry_after_s=2)
    id_ = a_plan(profile).id
    app = make_app(profile=profile, clock=clock)
    async with running(app) as client:
        clock.now = 300.0  # the window starts at the first request, not at make_app
        status, body, headers = await get(client, id_)
        assert (status, headers["Retry-After"]) == (429, "2")
        assert body == b"Rate limit was exceeded; please retry in 2 seconds"
        clock.now = 304.99
        assert (await get(client, id_))[0] == 429
        assert (await get(client, "not-an-id"))[0] == 429  # before the id is even looked at
        assert (await get(client, id_, {}))[0] == 401  # auth first
        clock.now = 305.0
        assert (await get(client, id_))[0] == 200
        assert (await get(client, "not-an-id"))[0] == 422
    stats = app[STATS_KEY]
    assert stats.throttled == {"saturated": 3}
    assert stats.by_status == {429: 3, 401: 1, 200: 1, 422: 1}


async def test_saturation_is_scaled_and_does_not_start_ready_delays() -> None:
    """With time_scale the window and Retry-After shrink; an id's ready delay starts at its
    first request past the window."""
    clock = FakeClock()
    profile = dataclasses.replace(QUIET, saturated_s=10.0, saturated_retry_after_s=3)
    plan = a_plan(QUIET)
    ready_in = plan.ready_delay_s * 0.1
    app = make_app(profile=profile, time_scale=0.1, clock=clock)
    async with running(app) as client:
        status, _, headers = await get(client, plan.id)
        assert (status, headers["Retry-After"]) == (429, "0.3")
        clock.now = 1.0  # 10 s x 0.1: the window is over
        assert (await get(client, plan.id))[1] == b'{"status":"retrieving"}'
        clock.now = 1.0 + ready_in - 0.01
        assert (await get(client, plan.id))[1] == b'{"status":"retrieving"}'
        clock.now = 1.0 + ready_in + 0.01
        assert (await get(client, plan.id))[0] == 200


# -- capacity and the per-second timeline -----------------------------------------------------


async def test_capacity_429s_are_counted_per_second_at_the_server() -> None:
    """Arrivals, 200s and capacity 429s land in the per-second timeline, also over HTTP."""
    clock = FakeClock(10.0)
    app = make_app(profile=dataclasses.replace(INSTANT, capacity_rps=1.0), clock=clock)
    id_ = a_plan().id
    statuses = []
    async with running(app) as client:
        for now in (10.0, 10.5, 11.2, 13.9):
            clock.now = now
            statuses.append((await get(client, id_))[0])
        async with client.get("/_sim/stats") as response:
            served = await response.json()
    # A bucket of 1/s (0.1 s of burst): 10.5 comes too soon after 10.0; 11.2 does not.
    assert statuses == [200, 429, 200, 200]
    stats = app[STATS_KEY]
    assert stats.throttled == {"capacity": 1}
    per_second = served["per_second"]
    assert per_second == stats.as_dict()["per_second"]
    assert set(per_second) == set(TIMELINE_KEYS)
    assert per_second["requests"] == [2, 1, 0, 1]
    assert per_second["200"] == per_second["ok"] == [1, 1, 0, 1]
    assert per_second["429"] == [1, 0, 0, 0]
    assert per_second["503"] == per_second["202"] == per_second["other"] == [0, 0, 0, 0]


def test_timeline_counts_by_whole_second_since_the_first_event() -> None:
    """Every series has one entry per second since the first event; reset starts over."""
    stats = SimulatorStats()
    stats.arrive(50.25)
    stats.answered(202, 50.3)
    stats.arrive(52.0)
    stats.answered(503, 52.1, cause="fault")
    stats.arrive(52.2)
    stats.answered(404, 52.4)
    stats.arrive(52.9)
    stats.drop(53.3)
    stats.in_flight = 0
    per_second = stats.per_second  # seconds since 50.25, not calendar seconds
    assert per_second["requests"] == [1, 2, 1, 0]
    assert per_second["202"] == per_second["ok"] == [1, 0, 0, 0]
    assert per_second["503"] == [0, 1, 0, 0]
    assert per_second["other"] == [0, 0, 1, 0]
    assert per_second["dropped"] == [0, 0, 0, 1]
    assert stats.throttled == {"fault": 1}
    stats.reset()
    assert stats.as_dict() == SimulatorStats().as_dict()
    assert all(v == [] for v in stats.per_second.values())
    stats.arrive(1000.0)
    assert stats.per_second["requests"] == [1]


def test_timeline_answers_before_the_origin_count_in_the_first_second() -> None:
    """An answer timed before the first arrival (after a reset) is not lost."""
    timeline = Timeline()
    timeline.count("requests", 5.0)
    timeline.answered(200, 4.5)
    assert timeline.as_dict()["200"] == [1]


# -- serve() ----------------------------------------------------------------------------------


async def test_serve_takes_the_throttling_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    """serve(saturated_s=..., saturated_retry_after_s=...) throttles its first requests."""
    task = asyncio.create_task(
        serve(
            host="127.0.0.1",
            port=0,
            token=TOKEN,
            profile="instant",
            seed=0,
            time_scale=1.0,
            first_poll_throttle_share=0.5,
            saturated_s=60.0,
            saturated_retry_after_s=7,
        )
    )
    url = None
    for _ in range(200):  # at most ~4 s
        await asyncio.sleep(0.02)
        if match := re.search(r"simulator listening on (\S+)", capsys.readouterr().err):
            url = match.group(1)
            break
    assert url is not None
    try:
        async with (
            aiohttp.ClientSession(url, headers=AUTH) as session,
            session.get(PATH, params={"id": a_plan().id}) as response,
        ):
            assert (response.status, response.headers["Retry-After"]) == (429, "7")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_throttling_knobs_are_validated() -> None:
    """Bad shares, windows and waits are UsageErrors naming the value."""
    from harvester.errors import UsageError

    for changes, message in (
        ({"first_poll_throttle_share": 1.5}, "first_poll_throttle_share must be a number"),
        ({"saturated_s": -1.0}, "saturated_s must be a finite number >= 0"),
        ({"saturated_retry_after_s": 0}, "saturated_retry_after_s must be whole seconds >= 1"),
        ({"saturated_retry_after_s": 1.5}, "saturated_retry_after_s must be whole seconds >= 1"),
    ):
        with pytest.raises(UsageError, match=re.escape(message)):
            dataclasses.replace(INSTANT, **changes)


def test_answer_defaults_describe_a_plain_json_200() -> None:
    """An Answer with no arguments is a whole 200 JSON answer with no Retry-After."""
    assert Answer() == Answer(status=200, body=b"", content_type=JSON, send=Send.WHOLE)
