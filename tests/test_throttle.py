"""The throttling policy on a fake clock: exact cut, hold, recover, pause and probe decisions."""

from __future__ import annotations

import math
import random

import pytest

from harvester.throttle import (
    BETA,
    CUBIC_C,
    CUT_GAP,
    MAX_CUT,
    PROBES,
    SATURATED_MIN,
    Answer,
    ThrottleController,
)

from .clocks import FakeClock


def answers(
    control: ThrottleController,
    clock: FakeClock,
    *,
    ok: int = 0,
    t429: int = 0,
    t503: int = 0,
    over: float = 1.0,
    retry_after: float = 1.0,
    ordered: bool = False,
) -> None:
    """Feed ``ok`` accepted answers and the given throttled ones, evenly ``over`` seconds and
    mixed in a fixed shuffled order, as a server mixing them in would answer; ``ordered``:
    accepted first, as a server that admits its capacity at the start of each second does."""
    kinds = [Answer.ACCEPTED] * ok + [Answer.THROTTLED_429] * t429 + [Answer.THROTTLED_503] * t503
    if not ordered:
        random.Random(len(kinds)).shuffle(kinds)
    step = over / max(len(kinds), 1)
    for kind in kinds:
        clock.advance(step)
        control.record(kind, retry_after)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def opened(rate: float, clock: FakeClock) -> ThrottleController:
    """A controller past its start: its first probe was accepted a second ago."""
    control = ThrottleController(rate, clock=clock)
    probe = control.may_probe()
    assert probe
    control.record(Answer.ACCEPTED, probe=probe)
    assert not control.probing
    clock.advance(1.0)
    return control


def test_starts_with_probes_then_opens_at_the_full_rate(clock: FakeClock) -> None:
    """A run begins with PROBES requests; the first accepted one opens --rate, and that
    start counts as no pause at all."""
    control = ThrottleController(500.0, clock=clock)
    assert control.probing
    rounds = [control.may_probe() for _ in range(PROBES + 1)]
    assert rounds == [1] * PROBES + [0]
    clock.advance(0.02)
    control.record(Answer.ACCEPTED, probe=1)
    assert not control.probing
    assert control.rate == 500.0
    assert control.paused_seconds() == 0.0
    assert control.pauses(clock.now) == []
    assert control.note == ""


def test_a_server_refusing_everyone_from_the_start_gets_the_probes_only(
    clock: FakeClock,
) -> None:
    """Both start probes answered 429 "retry in 2 s": pause 2 s, and say why."""
    control = ThrottleController(1000.0, clock=clock)
    assert control.may_probe()
    probe = control.may_probe()
    assert probe
    control.record(Answer.THROTTLED_429, 2.0, probe=probe)
    control.record(Answer.THROTTLED_429, 2.0, probe=True)
    assert control.probing
    assert control.paused_until == pytest.approx(clock.now + 2.0)
    assert control.note == "paused 2 s: 429 on 100% of the last 2 answers"
    assert control.probes_out == 0


def test_scattered_429s_and_503s_hold_the_rate(clock: FakeClock) -> None:
    """3% 429s and 3% 503s (the scattered case) neither cut nor pause: the rate stays R."""
    control = opened(2000.0, clock)
    for _ in range(5):
        answers(control, clock, ok=1880, t429=60, t503=60)
    assert control.rate == 2000.0
    assert not control.probing


def test_a_high_share_of_503s_alone_cuts_but_a_few_do_not(clock: FakeClock) -> None:
    """503 is "autoscaling": 20% of answers do not cut; 40% do."""
    control = opened(1000.0, clock)
    answers(control, clock, ok=800, t503=200)
    assert control.rate == 1000.0
    answers(control, clock, ok=600, t503=400)
    assert control.rate < 1000.0


def test_429s_over_the_cut_share_cut_toward_the_accepted_rate(clock: FakeClock) -> None:
    """The server accepts 300/s of 1000/s: the rate becomes BETA x 300, once per CUT_GAP."""
    control = opened(1000.0, clock)
    answers(control, clock, ok=30, t429=70, over=0.1)
    assert control.rate == pytest.approx(BETA * 300, rel=0.1)
    cut = control.rate
    # More 429s before CUT_GAP has passed do not cut again: the cut has not shown yet.
    answers(control, clock, ok=10, t429=20, over=CUT_GAP * 0.8)
    assert control.rate == cut


def test_a_burst_of_capacity_is_overestimated_then_corrected(clock: FakeClock) -> None:
    """A server admitting its 300 at the start of each second looks like 2000/s at first (a
    mild cut); 429s to all for 300 ms then read as saturation: pause, and cut toward it."""
    control = opened(2000.0, clock)
    answers(control, clock, ok=300, t429=40, over=0.15, ordered=True)
    assert control.rate == pytest.approx(BETA * 2000)
    assert not control.probing
    answers(control, clock, t429=600, over=0.35)
    assert control.probing
    # 300 accepted over the 0.35-0.45 s the answers spanned when saturation showed.
    assert BETA * 300 / 0.45 <= control.rate <= BETA * 300 / 0.35


def test_a_cut_never_goes_below_a_quarter_of_the_rate(clock: FakeClock) -> None:
    """10x over capacity, 10% accepted: part got through, so cut toward it, a quarter of the
    rate at most at once, and without pausing everyone."""
    control = opened(3000.0, clock)
    answers(control, clock, ok=10, t429=90, over=0.03)
    assert not control.probing
    assert control.rate == pytest.approx(MAX_CUT * 3000)


def test_rate_wins_back_along_cubic_when_calm(clock: FakeClock) -> None:
    """After a cut, calm seconds bring the rate back: BETA*W at 0, W after K, R at last."""
    control = opened(1000.0, clock)
    answers(control, clock, ok=50, t429=50, over=0.1)
    w_max = control.rate / BETA
    k = math.cbrt(w_max * (1 - BETA) / CUBIC_C)
    start = clock.now
    while clock.now - start < 1.0:  # the throttled answers are still in the window: hold
        clock.advance(0.1)
        control.tick()
    assert control.rate == pytest.approx(BETA * w_max, rel=0.02)
    start = clock.now
    while clock.now - start < k - 1e-9:
        clock.advance(0.1)
        control.tick()
    assert control.rate == pytest.approx(w_max, rel=0.02)
    for _ in range(400):
        clock.advance(0.1)
        control.tick()
    assert control.rate == 1000.0  # never past --rate


def test_no_growth_while_a_few_429s_keep_coming(clock: FakeClock) -> None:
    """Hold: 5% 429s (under the cut share, over the hold share) freeze the rate where it is."""
    control = opened(1000.0, clock)
    answers(control, clock, ok=50, t429=50, over=0.1)
    clock.advance(1.0)
    held = control.rate
    for _ in range(20):
        answers(control, clock, ok=95, t429=5, over=0.2)
        control.tick()
    assert control.rate == held


def test_saturation_pauses_everyone_for_the_retry_after(clock: FakeClock) -> None:
    """Every answer a 429 "retry in 180 s": the client holds 180 s, and says why."""
    control = opened(1000.0, clock)
    answers(control, clock, t429=SATURATED_MIN, over=0.05, retry_after=180.0)
    assert control.probing
    assert control.paused_until == pytest.approx(clock.now + 180.0, abs=0.01)
    assert control.note == f"paused 180 s: 429 on 100% of the last {SATURATED_MIN} answers"
    assert control.rate == 1000.0  # nothing was accepted: no capacity to cut toward


def test_after_a_pause_only_probes_go_until_one_is_answered(clock: FakeClock) -> None:
    """Probe: PROBES requests, no more; an accepted probe resumes at the rate of before."""
    control = opened(1000.0, clock)
    answers(control, clock, t429=SATURATED_MIN, over=0.05, retry_after=2.0)
    clock.advance(2.0)
    rounds = [control.may_probe() for _ in range(PROBES + 2)]
    assert rounds[PROBES:] == [0, 0]
    assert rounds[0] == rounds[1] > 1  # a new round: not the start's
    control.record(Answer.ACCEPTED, probe=rounds[0])
    assert not control.probing
    assert control.rate == 1000.0
    assert control.paused_seconds() == pytest.approx(2.0, abs=0.01)


def test_a_throttled_probe_pauses_again(clock: FakeClock) -> None:
    """Still saturated: the probe's Retry-After starts another pause; the total adds up."""
    control = opened(1000.0, clock)
    answers(control, clock, t429=SATURATED_MIN, over=0.05, retry_after=2.0)
    clock.advance(2.0)
    probe = control.may_probe()
    assert probe
    control.record(Answer.THROTTLED_429, 2.0, probe=probe)
    assert control.probing
    assert control.paused_until == pytest.approx(clock.now + 2.0)
    clock.advance(2.0)
    probe = control.may_probe()
    assert probe
    control.record(Answer.ACCEPTED, probe=probe)
    assert not control.probing
    assert control.paused_seconds() == pytest.approx(4.0, abs=0.01)
    [(start, end)] = control.pauses(clock.now)
    assert end - start == pytest.approx(4.0, abs=0.01)


def test_a_probe_without_answer_frees_its_place(clock: FakeClock) -> None:
    """A probe that timed out says nothing: another may go, and the pause is not over."""
    control = opened(100.0, clock)
    answers(control, clock, t429=SATURATED_MIN, over=0.05)
    clock.advance(1.0)
    rounds = [control.may_probe() for _ in range(PROBES)]
    assert all(rounds)
    assert not control.may_probe()
    control.record(Answer.NONE, probe=rounds[0])
    assert control.probing
    assert control.may_probe()


def test_answers_of_requests_sent_before_the_pause_push_it_out(clock: FakeClock) -> None:
    """In-flight requests that come back 429 during the pause extend it to their Retry-After."""
    control = opened(100.0, clock)
    answers(control, clock, t429=SATURATED_MIN, over=0.05, retry_after=1.0)
    first = control.paused_until
    clock.advance(0.5)
    control.record(Answer.THROTTLED_429, 3.0)
    assert control.paused_until == pytest.approx(first + 2.5, abs=0.01)


def test_no_answer_at_all_is_no_signal(clock: FakeClock) -> None:
    """Timeouts and refused connections neither cut nor pause."""
    control = opened(100.0, clock)
    for _ in range(100):
        clock.advance(0.01)
        control.record(Answer.NONE)
    assert control.rate == 100.0
    assert not control.probing


def test_a_slow_client_pauses_after_ten_throttled_in_a_row(clock: FakeClock) -> None:
    """At --rate 5 a second never holds enough answers for a share: ten 429s in a row are
    the saturation test instead."""
    control = opened(5.0, clock)
    for _ in range(9):
        clock.advance(0.2)
        control.record(Answer.THROTTLED_429, 30.0)
    assert not control.probing
    clock.advance(0.2)
    control.record(Answer.THROTTLED_429, 30.0)
    assert control.probing
    assert control.note == "paused 30 s: 429 on 100% of the last 10 answers"


def test_a_probe_of_an_earlier_round_does_not_end_a_later_pause(clock: FakeClock) -> None:
    """The start's second probe, still out when the rate opened and the server then
    saturated, comes back accepted: the new pause holds to its Retry-After regardless."""
    control = ThrottleController(1000.0, clock=clock)
    first, second = control.may_probe(), control.may_probe()
    control.record(Answer.ACCEPTED, probe=first)
    clock.advance(1.0)
    answers(control, clock, t429=SATURATED_MIN, over=0.05, retry_after=180.0)
    assert control.probing
    control.record(Answer.ACCEPTED, probe=second)  # from the earlier round
    assert control.probing
    assert control.paused_until > clock.now + 170
    assert control.may_probe() == control.may_probe() > second  # the new round's two
