"""The pacer on a virtual loop clock: exact rate bounds, pauses and probes, no wall time."""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest

from harvester.pacer import JITTER_SECONDS, Pacer
from harvester.throttle import PROBES, SATURATED_MIN, Answer

from .clocks import virtual_time


async def send_times(pacer: Pacer, *, workers: int, seconds: float) -> list[float]:
    """Send times of ``workers`` tasks acquiring back to back for ``seconds`` of loop time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    times: list[float] = []

    async def work() -> None:
        while loop.time() < end:
            probe = await pacer.acquire()
            times.append(loop.time())
            pacer.record(Answer.ACCEPTED, probe=probe)

    await asyncio.gather(*(work() for _ in range(workers)))
    return sorted(times)


async def opened(rate: float) -> Pacer:
    """A pacer past its start: its first probe was accepted a second ago."""
    pacer = Pacer(rate)
    probe = await pacer.acquire()  # the start's probe
    assert probe
    pacer.record(Answer.ACCEPTED, probe=probe)
    await asyncio.sleep(1.0)
    return pacer


def most_in_any_second(times: list[float]) -> int:
    """The largest number of ``times`` inside any half-open 1 s window (as the server counts)."""
    return max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))


@pytest.mark.parametrize("rate", [7.0, 100.0, 1000.0])
@virtual_time
async def test_sustains_095_r_and_never_more_than_r_plus_1_a_second(rate: float) -> None:
    """Back-to-back demand from 50 workers: >= 0.95 R over 10 s, <= R+1 in any second."""
    pacer = Pacer(rate)
    times = await send_times(pacer, workers=50, seconds=4.0)
    assert len(times) >= 0.95 * rate * 4
    assert most_in_any_second(times) <= rate + 1


@pytest.mark.parametrize("rate", [50.0, 2000.0])
@virtual_time
async def test_delivery_jitter_of_50_ms_still_lands_at_most_r_plus_1(rate: float) -> None:
    """Each request reaches the server 0-50 ms after it left (a loaded machine or network)."""
    pacer = Pacer(rate)
    times = await send_times(pacer, workers=100, seconds=2.0)
    rng = random.Random(7)
    arrivals = sorted(t + rng.uniform(0.0, JITTER_SECONDS) for t in times)
    assert most_in_any_second(arrivals) <= rate + 1
    # The worst case: alternate requests delayed the whole jitter, the others not at all.
    bunched = sorted(t + (JITTER_SECONDS if i % 2 else 0.0) for i, t in enumerate(times))
    assert most_in_any_second(bunched) <= rate + 1


@virtual_time
async def test_a_pause_holds_every_request_then_probes_go_alone() -> None:
    """Saturated: nothing leaves during the Retry-After, then PROBES; one accepted probe and
    the rate is back."""
    loop = asyncio.get_running_loop()
    pacer = await opened(100.0)
    for _ in range(SATURATED_MIN):
        pacer.record(Answer.THROTTLED_429, 30.0, probe=False)
    paused_at = loop.time()
    sent: list[tuple[float, int]] = []

    async def one() -> None:
        probe = await pacer.acquire()
        sent.append((loop.time(), probe))

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    await asyncio.sleep(31.0)
    assert [bool(probe) for _, probe in sent] == [True] * PROBES  # only the probes have gone
    assert all(at >= paused_at + 30.0 for at, _ in sent)
    pacer.record(Answer.ACCEPTED, probe=sent[0][1])
    await asyncio.gather(*tasks)
    assert len(sent) == 10
    assert pacer.paused_seconds() == pytest.approx(31.0, abs=0.1)  # held until the accept
    assert pacer.note() == ""


@virtual_time
async def test_the_note_says_why_and_how_long() -> None:
    """While paused, the progress line says for how long and why."""
    pacer = await opened(1000.0)
    for _ in range(SATURATED_MIN):
        pacer.record(Answer.THROTTLED_429, 180.0, probe=False)
    await asyncio.sleep(60.0)
    assert pacer.note() == (
        f"paused 180 s: 429 on 100% of the last {SATURATED_MIN} answers (120 s left)"
    )


@virtual_time
async def test_a_cut_binds_at_once() -> None:
    """After the controller cuts the rate, the next second sends no more than the new rate."""
    pacer = Pacer(1000.0)
    await send_times(pacer, workers=20, seconds=1.0)  # ~1000 accepted in the last second
    for _ in range(150):
        pacer.record(Answer.THROTTLED_429, 1.0, probe=False)
    cut = pacer.controller.rate
    assert 250.0 <= cut < 950.0
    # The 429s hold the rate there while they stay in the window (a second, to 100 ms).
    times = await send_times(pacer, workers=20, seconds=0.9)
    assert pacer.rate == cut
    assert most_in_any_second(times) <= cut + 1


@pytest.mark.parametrize(
    ("answer", "retry_after"),
    [(Answer.NONE, None), (Answer.THROTTLED_429, 0.0), (Answer.THROTTLED_503, 0.0)],
)
@virtual_time
async def test_probes_that_fail_fast_still_keep_the_rate(
    answer: Answer, retry_after: float | None
) -> None:
    """Probes answered at once with no answer, or 429/503 "retry after 0", do not become a
    flood: probes keep the log and the bucket like any request (<= R+1 in any second)."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(10.0)
    times: list[float] = []

    async def work() -> None:
        while loop.time() < 3.0:
            probe = await pacer.acquire()
            times.append(loop.time())
            await asyncio.sleep(0.001)
            pacer.record(answer, retry_after, probe=probe)

    await asyncio.gather(*(work() for _ in range(8)))
    assert most_in_any_second(sorted(times)) <= 11
