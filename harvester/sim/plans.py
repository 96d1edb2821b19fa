"""What the simulator does with one id, derived from ``blake2b(seed:id)`` alone.

The 32-byte digest is four uniform draws: 0 whether the conversation fails, 1 its model,
2 its ready delay, 3 whether (and how) its first request is throttled. The same digest seeds
the id's content (``content.build_completion``), so the same seed and id always get the same
plan and the same document, whatever order requests come in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from hashlib import blake2b
from statistics import NormalDist
from typing import Final

from ..errors import UsageError
from .content import build_completion
from .profiles import ModelTiming, Profile, resolve_profile

__all__ = [
    "UUID_RE",
    "FirstPollThrottle",
    "IdPlan",
    "completion_for",
    "expected_completion",
    "plan_for",
    "plan_id",
]

UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_STD_NORMAL: Final = NormalDist()
_U64: Final = float(2**64)


@dataclass(frozen=True, slots=True)
class FirstPollThrottle:
    """How an id's first request is throttled: 429 or 503 with this many unscaled seconds."""

    status: int
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class IdPlan:
    """What the simulator will do with one id: its model, unscaled ready delay and fate."""

    id: str
    model: ModelTiming
    ready_delay_s: float
    fails: bool
    digest: bytes = field(repr=False)
    first_poll_throttle: FirstPollThrottle | None = None  # None: the first request is answered


def _unit(digest: bytes, index: int) -> float:
    """Return a uniform float in (0, 1) from the index-th 8 bytes of the digest."""
    chunk = digest[8 * index : 8 * index + 8]
    return (int.from_bytes(chunk, "big") + 0.5) / _U64


def _pick_model(models: tuple[ModelTiming, ...], u: float) -> ModelTiming:
    """Pick a model by weight with the uniform draw ``u``."""
    target = u * sum(m.weight for m in models)
    for model in models:
        target -= model.weight
        if target < 0:
            return model
    return models[-1]  # float rounding on the last step


def _ready_delay(model: ModelTiming, u: float) -> float:
    """Draw the model's clipped lognormal ready delay from the uniform draw ``u``."""
    if model.median_s == 0:
        return 0.0
    raw = model.median_s * math.exp(model.sigma * _STD_NORMAL.inv_cdf(u))
    return min(model.max_s, max(model.min_s, raw))


def _first_poll_throttle(digest: bytes, profile: Profile) -> FirstPollThrottle | None:
    """Pick the ids whose first request is throttled: the lower half of the share gets 429,
    the upper half 503; the Retry-After comes from a second digest of the id's own."""
    share = profile.first_poll_throttle_share
    if share <= 0:
        return None
    u = _unit(digest, 3)
    if u >= share:
        return None
    lo, hi = profile.retry_after_s
    v = _unit(blake2b(digest, digest_size=8, person=b"first-poll").digest(), 0)
    return FirstPollThrottle(
        status=429 if u < share / 2 else 503,
        retry_after_s=lo + min(hi - lo, int(v * (hi - lo + 1))),
    )


def _normalise_id(id_: str) -> str:
    """Return the lowercase canonical id, or raise UsageError if it is not a UUID."""
    if UUID_RE.fullmatch(id_) is None:
        raise UsageError(f"{id_!r} is not a hyphenated UUID; the simulator answers 422 for it")
    return id_.lower()


def plan_id(id_: str, seed: int, profile: Profile) -> IdPlan:
    """Derive the plan of a canonical (lowercase) id; cheap enough to run on every request."""
    digest = blake2b(f"{seed}:{id_}".encode(), digest_size=32).digest()
    model = _pick_model(profile.models, _unit(digest, 1))
    return IdPlan(
        id=id_,
        model=model,
        ready_delay_s=_ready_delay(model, _unit(digest, 2)),
        fails=_unit(digest, 0) < profile.fail_share,
        digest=digest,
        first_poll_throttle=_first_poll_throttle(digest, profile),
    )


def completion_for(plan: IdPlan, seed: int, profile: Profile) -> dict[str, object]:
    """Return the Completion document the plan's id gets (whether or not it fails)."""
    return build_completion(
        plan.digest,
        model=plan.model.name,
        fanouts=plan.model.fanouts,
        seed=seed,
        html_bytes=profile.html_bytes,
        targeted_share=profile.targeted_share,
    )


def plan_for(id: str, *, seed: int, profile: Profile | str) -> IdPlan:
    """Return what the simulator with this seed and profile does with ``id`` (for tests)."""
    return plan_id(_normalise_id(id), seed, resolve_profile(profile))


def expected_completion(id: str, *, seed: int, profile: Profile | str) -> dict[str, object] | None:
    """Return the Completion the simulator serves for ``id``, or None if that id fails."""
    chosen = resolve_profile(profile)
    plan = plan_for(id, seed=seed, profile=chosen)
    return None if plan.fails else completion_for(plan, seed, chosen)
