"""Simulator profiles: every knob of one behaviour (timings, content size, faults, throttling).

Plain frozen dataclasses, validated on creation (and on ``dataclasses.replace``). Every "share"
is a probability between 0 and 1; ``capacity_rps`` is a rate. Durations are in seconds before
the app's ``time_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Final

from ..errors import UsageError
from .content import MAX_FANOUTS
from .faults import TABLE_FAULTS, Fault

__all__ = [
    "INSTANT_MODELS",
    "PROFILES",
    "REALISTIC_MODELS",
    "ModelTiming",
    "Profile",
    "resolve_profile",
]


def _check_share(where: str, name: str, value: float, *, top: float = 1.0) -> None:
    """Raise UsageError unless ``value`` is a share between 0 and ``top``."""
    if not (isinstance(value, int | float) and 0.0 <= value <= top):
        raise UsageError(f"{where}: {name} must be a number between 0 and {top}, got {value!r}")


def _check_non_negative(where: str, name: str, value: float) -> None:
    """Raise UsageError unless ``value`` is a finite number >= 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{where}: {name} must be a finite number >= 0, got {value!r}")


def _check_whole_seconds(where: str, name: str, value: int) -> None:
    """Raise UsageError unless ``value`` is a whole number of seconds >= 1."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise UsageError(f"{where}: {name} must be whole seconds >= 1, got {value!r}")


@dataclass(frozen=True)
class ModelTiming:
    """How often one model answers, how long its conversations take and whether it shows fanouts."""

    name: str
    weight: float
    median_s: float  # median ready delay; 0 means ready at once
    sigma: float  # lognormal spread of the ready delay (0 = always the median)
    min_s: float
    max_s: float
    fanouts: tuple[int, int]  # least and most fanout queries; (0, 0) for models that hide them

    def __post_init__(self) -> None:
        """Reject timings that cannot be drawn from, naming the bad value."""
        where = f"model timing {self.name!r}"
        if not self.name:
            raise UsageError("a model timing needs a non-empty name")
        _check_non_negative(where, "weight", self.weight)
        _check_non_negative(where, "median_s", self.median_s)
        _check_non_negative(where, "sigma", self.sigma)
        if not 0 <= self.min_s <= self.median_s <= self.max_s:
            raise UsageError(f"{where}: need 0 <= min_s <= median_s <= max_s")
        lo, hi = self.fanouts
        if not 0 <= lo <= hi <= MAX_FANOUTS:
            raise UsageError(
                f"{where}: fanouts must be (least, most) with 0 <= least <= most <= {MAX_FANOUTS}"
            )


# Public measurements from API-NOTES.md: gemini 7-8 s, chatgpt 14-15 s, perplexity 18-51 s,
# copilot about 35 s and up to 152 s. Weights are a plausible mix, not a measurement.
REALISTIC_MODELS: Final = (
    ModelTiming("chatgpt", 0.40, 14.5, 0.03, 14.0, 15.0, (3, 7)),
    ModelTiming("gemini", 0.25, 7.5, 0.04, 7.0, 8.0, (0, 4)),
    ModelTiming("perplexity", 0.20, 28.0, 0.35, 18.0, 51.0, (2, 5)),
    ModelTiming("copilot", 0.15, 35.0, 0.45, 20.0, 152.0, (0, 0)),
)
INSTANT_MODELS: Final = tuple(
    replace(m, median_s=0.0, sigma=0.0, min_s=0.0, max_s=0.0) for m in REALISTIC_MODELS
)

# Leaves at least this share of requests fault-free so every id stays harvestable.
_MAX_FAULT_SHARE: Final = 0.9
# Shares that are not fault shares, checked like them.
_OTHER_SHARES: Final = ("fail_share", "targeted_share", "slow_share", "first_poll_throttle_share")


@dataclass(frozen=True)
class Profile:
    """Every knob of one simulator behaviour; validated on creation (and on ``replace``)."""

    name: str
    models: tuple[ModelTiming, ...] = REALISTIC_MODELS
    fail_share: float = 0.05  # share of ids whose conversation ends 202 failed
    html_bytes: int = 14_000  # typical size of the html field; each id varies 0.6x-1.4x
    targeted_share: float = 0.1  # share of ids with device/country/subdivision/city set
    latency_median_s: float = 0.0  # added latency per request (lognormal); 0 = none
    latency_sigma: float = 0.0
    error_500_share: float = 0.0
    error_502_share: float = 0.0
    error_504_share: float = 0.0
    throttle_429_share: float = 0.0
    unavailable_503_share: float = 0.0
    retry_after_s: tuple[int, int] = (1, 5)  # whole seconds, before time_scale
    drop_share: float = 0.0  # connection closed without an answer
    truncate_share: float = 0.0  # applies only where the answer would be a 200 JSON body
    slow_share: float = 0.0  # extra wait of slow_s on top of the latency (any answer)
    slow_s: tuple[float, float] = (2.0, 6.0)
    burst_period_s: float = 0.0  # every period, the last burst_length_s fail a lot; 0 = never
    burst_length_s: float = 0.0
    burst_fault_share: float = 0.0  # share of requests answering 500/502/504 inside a burst
    # The rest of the fault matrix (each an exclusive share of requests, like the ones above):
    drop_after_headers_share: float = 0.0  # headers sent, then the body is cut mid-way
    wrong_shape_share: float = 0.0  # 200 valid JSON that is not a Completion
    html_body_share: float = 0.0  # 200 text/html although JSON was asked for
    oversize_share: float = 0.0  # 200 whose body is oversize_bytes long
    unknown_status_share: float = 0.0  # 202 with a status the spec does not list
    unknown_code_share: float = 0.0  # 404 or 418
    slow_drip_share: float = 0.0  # the right answer, dripped out over drip_s seconds
    stall_share: float = 0.0  # no answer for stall_s seconds (past a client's read timeout)
    oversize_bytes: int = 30 * 1024 * 1024
    drip_s: float = 3.0
    stall_s: float = 120.0
    retry_after_http_date: bool = False  # Retry-After as an HTTP date instead of seconds
    capacity_rps: float = 0.0  # over this many requests in the last second: 429; 0 = none
    # Throttling scenarios (Retry-After in real seconds at time_scale 1):
    first_poll_throttle_share: float = 0.0  # share of ids whose first request gets 429 or 503
    saturated_s: float = 0.0  # 429 to every request this long after the server's first one
    saturated_retry_after_s: int = 2  # the Retry-After of those 429s, whole seconds
    # GET /ai?id= only: seconds a finished conversation answers {"status":"archiving"} (200)
    # before its Completion; the older endpoint goes straight to the Completion.
    archiving_s: float = 0.0
    # Where an id's ready delay starts: False, at its first request (the id is unknown until
    # then); True, when the server started or was last reset (POST /_sim/reset), as when
    # every prompt was queued just before the harvest, so a late first poll is a late find.
    queued_at_start: bool = False

    def __post_init__(self) -> None:
        """Reject settings the simulator cannot honour, saying which value to change."""
        where = f"simulator profile {self.name!r}"
        if not self.models or sum(m.weight for m in self.models) <= 0:
            raise UsageError(f"{where}: give at least one model with a positive weight")
        if len({m.name for m in self.models}) != len(self.models):
            raise UsageError(f"{where}: model names must be unique")
        if self.html_bytes < 200:
            raise UsageError(f"{where}: html_bytes must be at least 200, got {self.html_bytes}")
        for name in (*_OTHER_SHARES, *(f.field for f in TABLE_FAULTS)):
            _check_share(where, name, getattr(self, name))
        _check_share(where, "burst_fault_share", self.burst_fault_share, top=_MAX_FAULT_SHARE)
        if self.fault_share() > _MAX_FAULT_SHARE:
            raise UsageError(
                f"{where}: the fault shares add up to {self.fault_share():.2f}; keep them at "
                f"or below {_MAX_FAULT_SHARE} so retrying clients still get through"
            )
        for name in ("latency_median_s", "latency_sigma", "burst_period_s", "burst_length_s"):
            _check_non_negative(where, name, getattr(self, name))
        if self.burst_length_s > self.burst_period_s:
            raise UsageError(f"{where}: burst_length_s must not exceed burst_period_s")
        lo, hi = self.retry_after_s
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise UsageError(f"{where}: retry_after_s must be (least, most) whole seconds >= 1")
        for name in ("drip_s", "stall_s", "capacity_rps", "saturated_s", "archiving_s"):
            _check_non_negative(where, name, getattr(self, name))
        _check_whole_seconds(where, "saturated_retry_after_s", self.saturated_retry_after_s)
        if self.oversize_bytes < 1:
            raise UsageError(f"{where}: oversize_bytes must be at least 1")
        slow_lo, slow_hi = self.slow_s
        if not 0 <= slow_lo <= slow_hi:
            raise UsageError(f"{where}: slow_s must be (least, most) seconds with least >= 0")

    def fault_shares(self) -> dict[Fault, float]:
        """Return the share of requests of each table fault (they exclude each other)."""
        return {f: float(getattr(self, f.field)) for f in TABLE_FAULTS}

    def fault_share(self) -> float:
        """Return the share of requests that draw one of the table faults outside bursts."""
        return sum(self.fault_shares().values())

    def without_faults(self) -> Profile:
        """Return a copy with the same timings and content but no faults (for exact tests)."""
        zeroed: dict[str, Any] = {fault.field: 0.0 for fault in Fault}
        return replace(self, name=f"{self.name}-calm", **zeroed)


PROFILES: Final[dict[str, Profile]] = {
    # Benchmarks and engine tests: all ready at once, small bodies, no faults, no latency.
    "instant": Profile(name="instant", models=INSTANT_MODELS, html_bytes=2_000),
    # What API-NOTES.md describes: model ready times, tens to hundreds of ms per request and a
    # few percent of 500/503/429.
    "realistic": Profile(
        name="realistic",
        latency_median_s=0.06,
        latency_sigma=0.6,
        error_500_share=0.02,
        throttle_429_share=0.01,
        unavailable_503_share=0.01,
        retry_after_s=(1, 5),
        archiving_s=1.0,
    ),
    # Everything going wrong at once, about 30% of requests, yet every id still harvestable.
    "chaos": Profile(
        name="chaos",
        html_bytes=10_000,
        latency_median_s=0.06,
        latency_sigma=0.8,
        error_500_share=0.05,
        error_502_share=0.02,
        error_504_share=0.03,
        throttle_429_share=0.04,
        unavailable_503_share=0.03,
        retry_after_s=(1, 3),
        drop_share=0.03,
        truncate_share=0.03,
        slow_share=0.03,
        slow_s=(2.0, 6.0),
        burst_period_s=20.0,
        burst_length_s=2.0,
        burst_fault_share=0.8,
    ),
}


def resolve_profile(profile: Profile | str) -> Profile:
    """Return the profile itself or the named one from PROFILES."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        choices = ", ".join(sorted(PROFILES))
        raise UsageError(
            f"unknown simulator profile {profile!r}; choose one of {choices}"
        ) from None
