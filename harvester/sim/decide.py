"""What one request gets, decided without any I/O: pure functions from what the server knows
(the id's plan, its poll state, the clock, the drawn fault, the load) to an :class:`Answer`.

The server runs them in this order and sends the first answer it gets::

    check_auth -> check_saturation -> check_id -> decide(poll, fault)

``decide`` itself throttles first (over capacity, or the id's first poll), then lets a fault
replace the answer (errors, bad bodies, drops) or change how it is sent (truncated, cut after
the headers, dripped, stalled); otherwise the id answers by its plan: 202 retrieving before its
ready time, then 202 failed or the 200 Completion (JSON, or its ``html`` as text/html). Asked
at the newer ``GET /ai?id=`` (``Poll.newer_form``), the same plan answers every status object
with 200, and says ``archiving`` for the profile's ``archiving_s`` before the Completion.
The server draws a fault only when ``needs_fault`` says the answer depends on one, so requests
that are throttled consume no draw.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Final

import orjson

from .faults import DrawnFault, Fault
from .plans import UUID_RE, IdPlan, completion_for
from .profiles import Profile

__all__ = [
    "DROPPED",
    "HTML",
    "JSON",
    "NO_CREDIT_TOKEN",
    "TEXT",
    "Answer",
    "Poll",
    "Send",
    "Setup",
    "check_auth",
    "check_id",
    "check_saturation",
    "decide",
    "format_retry_after",
    "in_newer_form",
    "needs_fault",
    "throttle_answer",
]

NO_CREDIT_TOKEN: Final = "no-credit"
JSON: Final = "application/json"
TEXT: Final = "text/plain"  # every error the API sends
HTML: Final = "text/html"

_RETRIEVING: Final = b'{"status":"retrieving"}'
_FAILED: Final = b'{"status":"failed"}'
_ARCHIVING: Final = b'{"status":"archiving"}'  # the newer form only


class Send(enum.Enum):
    """How an answer goes out."""

    WHOLE = "whole"  # headers and body, as usual
    DROP = "drop"  # the connection is closed without an answer
    CUT = "cut"  # headers and half the body, then the connection is closed
    DRIP = "drip"  # the body in ten pieces over the profile's drip_s


@dataclass(frozen=True, slots=True)
class Answer:
    """A description of one answer; the server turns it into an HTTP response."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON  # text types are sent with charset=utf-8
    retry_after: str | None = None  # the Retry-After header, if any
    send: Send = Send.WHOLE
    delay_s: float = 0.0  # seconds (already scaled) to hold the answer back: a stall
    truncated: bool = False  # a 200 JSON body cut short
    cause: str | None = None  # why it throttled: fault, capacity, saturated, first_poll
    completes: bool = False  # the id's Completion, by its plan (JSON or its html)


DROPPED: Final = Answer(status=0, send=Send.DROP)


@dataclass(frozen=True, slots=True)
class Setup:
    """What stays fixed for one app: the profile, the content seed and the time scale."""

    profile: Profile
    seed: int = 0
    time_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Poll:
    """What the server knows when it answers one request for a valid id."""

    plan: IdPlan
    now: float  # the server's clock
    ready_at: float  # when the id's conversation is over (first sighting + scaled delay)
    first_request: bool = False  # the id's first request (tracked for throttled ids only)
    over_capacity: bool = False  # the server's rate limit refused it (see CapacityBucket)
    wants_html: bool = False  # Accept lists text/html and not application/json
    wall_now: float = 0.0  # time.time(), for a Retry-After given as an HTTP date
    newer_form: bool = False  # asked at GET /ai?id=: status objects come with 200


class CapacityBucket:
    """The server's rate limit, as real ones work: a token bucket (GCRA) of ``rate`` requests
    a second with ``burst_s`` seconds of burst. Only the requests it admits use capacity, so
    a client that sends too many still gets ``rate`` a second through, the rest 429."""

    __slots__ = ("_burst", "_interval", "_tat")

    def __init__(self, rate: float, burst_s: float = 0.1) -> None:
        """``rate`` 0 admits everything."""
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._burst = burst_s
        self._tat = -math.inf  # the theoretical arrival time of the next admitted request

    def admit(self, now: float) -> bool:
        """True (and counted) if a request arriving at ``now`` is within the rate."""
        if not self._interval:
            return True
        tat = max(self._tat, now)
        if tat - now > self._burst:
            return False
        self._tat = tat + self._interval
        return True


def format_retry_after(seconds: int, time_scale: float) -> str:
    """Return the Retry-After value: whole seconds unscaled, else a plain decimal like 0.05."""
    if time_scale == 1.0:
        return str(seconds)
    scaled = max(seconds * time_scale, 1e-6)
    return f"{scaled:.6f}".rstrip("0").rstrip(".")


def _text(status: int, message: str) -> Answer:
    """A text/plain answer, the content type of every error the API sends."""
    return Answer(status=status, body=message.encode(), content_type=TEXT)


def check_auth(header: str | None, token: str | None) -> Answer | None:
    """Return the 401/403/402 answer the credentials deserve, or None if they pass.

    ``token=None`` turns auth off; the bearer token ``no-credit`` always answers 402.
    """
    if header is None:
        if token is None:
            return None
        return _text(401, "Authorization header must be provided")
    scheme, _, sent = header.partition(" ")
    sent = sent.strip() if scheme.lower() == "bearer" else ""
    if sent == NO_CREDIT_TOKEN:
        return _text(402, "Credit balance is 0; top up at https://example.invalid/billing")
    if token is not None and sent != token:
        return _text(403, "Valid API token must be provided")
    return None


def check_id(raw_id: str | None) -> Answer | None:
    """Return the 422 answer a missing, over-long or malformed id deserves, or None."""
    if not raw_id:
        return _text(422, "Id must be provided")
    if len(raw_id) > 255:
        return _text(422, "Character counts must be no more than 255")
    if UUID_RE.fullmatch(raw_id) is None:
        return _text(422, "Id must be a valid UUID")
    return None


def throttle_answer(
    status: int, seconds: int, setup: Setup, *, wall_now: float, cause: str
) -> Answer:
    """429 or 503 with Retry-After in seconds (scaled) or, if the profile says, an HTTP date."""
    value = format_retry_after(seconds, setup.time_scale)
    if setup.profile.retry_after_http_date:
        # HTTP dates have whole seconds: round the scaled wait up so it is never zero.
        wait = math.ceil(seconds * setup.time_scale)
        value = formatdate(wall_now + wait, usegmt=True)
    if status == 429:
        message = f"Rate limit was exceeded; please retry in {value} seconds"
    else:
        message = f"Service is autoscaling; please retry in {value} seconds"
    return replace(_text(status, message), retry_after=value, cause=cause)


def check_saturation(since_start_s: float, setup: Setup, *, wall_now: float) -> Answer | None:
    """The 429 every request gets for saturated_s (scaled) after the server's first request."""
    profile = setup.profile
    if profile.saturated_s > 0 and since_start_s < profile.saturated_s * setup.time_scale:
        return throttle_answer(
            429, profile.saturated_retry_after_s, setup, wall_now=wall_now, cause="saturated"
        )
    return None


def _throttled(poll: Poll, setup: Setup) -> Answer | None:
    """The 429 past the capacity, or the throttle of an id's first poll, or None."""
    if poll.over_capacity:
        return throttle_answer(429, 1, setup, wall_now=poll.wall_now, cause="capacity")
    first = poll.plan.first_poll_throttle
    if first is not None and poll.first_request:
        return throttle_answer(
            first.status, first.retry_after_s, setup, wall_now=poll.wall_now, cause="first_poll"
        )
    return None


def needs_fault(poll: Poll, setup: Setup) -> bool:
    """True when the answer depends on a drawn fault, i.e. the request is not throttled."""
    return _throttled(poll, setup) is None


def decide(poll: Poll, fault: DrawnFault | None, setup: Setup) -> Answer:
    """Return the answer to one request for a valid id, given the fault it drew (or None)."""
    throttled = _throttled(poll, setup)
    if throttled is not None:
        return throttled
    if fault is not None and (answer_fault := _REPLACING.get(fault.fault)) is not None:
        answer = answer_fault(fault, poll, setup)
        return in_newer_form(answer) if poll.newer_form else answer
    answer = _by_plan(poll, setup)
    if fault is not None and (change := _CHANGING.get(fault.fault)) is not None:
        answer = change(answer, setup)
    return in_newer_form(answer) if poll.newer_form else answer


def in_newer_form(answer: Answer) -> Answer:
    """The answer as ``GET /ai?id=`` sends it: a status object with 200, not 202; the rest
    (completions, errors, throttles, drops) as the older endpoint sends it."""
    return replace(answer, status=200) if answer.status == 202 else answer


def _by_plan(poll: Poll, setup: Setup) -> Answer:
    """202 retrieving before the ready time, then 202 failed or the 200 Completion; the newer
    form says archiving for the profile's archiving_s between the two (see in_newer_form)."""
    if poll.now < poll.ready_at:
        return Answer(status=202, body=_RETRIEVING)
    if poll.plan.fails:
        return Answer(status=202, body=_FAILED)
    if poll.newer_form and poll.now < poll.ready_at + setup.profile.archiving_s * setup.time_scale:
        return Answer(status=202, body=_ARCHIVING)
    completion = completion_for(poll.plan, setup.seed, setup.profile)
    if poll.wants_html:
        return Answer(body=str(completion["html"]).encode(), content_type=HTML, completes=True)
    return Answer(body=orjson.dumps(completion), completes=True)


# -- faults that replace the answer ----------------------------------------------------------

_ERRORS: Final = {
    Fault.ERROR_500: (500, "Unknown error occurred"),
    Fault.ERROR_502: (502, "Bad gateway"),
    Fault.ERROR_504: (504, "Request(s) timed out"),
}
_THROTTLES: Final = {Fault.THROTTLE_429: 429, Fault.UNAVAILABLE_503: 503}


def _error(fault: DrawnFault, poll: Poll, setup: Setup) -> Answer:
    """500, 502 or 504 text/plain."""
    return _text(*_ERRORS[fault.fault])


def _throttle_fault(fault: DrawnFault, poll: Poll, setup: Setup) -> Answer:
    """429 or 503 with the Retry-After drawn with the fault."""
    return throttle_answer(
        _THROTTLES[fault.fault], fault.retry_after_s, setup, wall_now=poll.wall_now, cause="fault"
    )


def _fixed(answer: Answer) -> Callable[[DrawnFault, Poll, Setup], Answer]:
    """A fault whose answer is always the same."""
    return lambda fault, poll, setup: answer


def _oversize(fault: DrawnFault, poll: Poll, setup: Setup) -> Answer:
    """200 JSON of oversize_bytes of filler."""
    filler = b"x" * setup.profile.oversize_bytes
    return Answer(body=b'{"model": "chatgpt", "html": "' + filler + b'"}')


def _unknown_code(fault: DrawnFault, poll: Poll, setup: Setup) -> Answer:
    """404 or 418 (drawn with the fault)."""
    return _text(fault.status, "Not here")


_REPLACING: Final[dict[Fault, Callable[[DrawnFault, Poll, Setup], Answer]]] = {
    Fault.ERROR_500: _error,
    Fault.ERROR_502: _error,
    Fault.ERROR_504: _error,
    Fault.THROTTLE_429: _throttle_fault,
    Fault.UNAVAILABLE_503: _throttle_fault,
    Fault.DROP: _fixed(DROPPED),
    Fault.WRONG_SHAPE: _fixed(Answer(body=b'{"model": 7, "query": null, "fanouts": "none"}')),
    Fault.HTML_BODY: _fixed(Answer(body=b"<html><body>rendered</body></html>", content_type=HTML)),
    Fault.OVERSIZE: _oversize,
    Fault.UNKNOWN_STATUS: _fixed(Answer(status=202, body=b'{"status": "queued"}')),
    Fault.UNKNOWN_CODE: _unknown_code,
}


# -- faults that change how the right answer is sent ------------------------------------------


def _truncate(answer: Answer, setup: Setup) -> Answer:
    """Cut a 200 JSON body in half (a consistent Content-Length: the JSON is what breaks)."""
    if answer.status != 200 or answer.content_type != JSON:
        return answer
    return replace(answer, body=answer.body[: len(answer.body) // 2], truncated=True)


def _cut(answer: Answer, setup: Setup) -> Answer:
    """Send the headers and half the body, then close the connection."""
    return replace(answer, send=Send.CUT)


def _drip(answer: Answer, setup: Setup) -> Answer:
    """Drip the body out over drip_s."""
    return replace(answer, send=Send.DRIP)


def _stall(answer: Answer, setup: Setup) -> Answer:
    """Hold the answer back for stall_s (past a client's read timeout)."""
    return replace(answer, delay_s=setup.profile.stall_s * setup.time_scale)


_CHANGING: Final[dict[Fault, Callable[[Answer, Setup], Answer]]] = {
    Fault.TRUNCATE: _truncate,
    Fault.DROP_AFTER_HEADERS: _cut,
    Fault.SLOW_DRIP: _drip,
    Fault.STALL: _stall,
}
