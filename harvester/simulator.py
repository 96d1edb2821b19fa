"""An in-process simulator of ``GET /ai/completions?id=<uuid>`` for the demo, tests and benchmarks.

It follows ``shared/spec/ai-completions.openapi.yaml`` and the real-world behaviour in
``shared/API-NOTES.md``:

* ``Authorization: Bearer <token>``: no header -> 401, wrong token -> 403 (``token=None`` turns
  auth off). The bearer token ``no-credit`` always answers 402, so tests can reach that path.
* ``id`` missing, longer than 255 characters or not a hyphenated UUID -> 422. Error bodies are
  ``text/plain``.
* Everything about an id is derived from ``blake2b(seed:id)``: whether it completes or fails,
  its model, its ready delay and its content (see :func:`plan_for` and
  :func:`expected_completion`). Same seed and id -> byte-identical 200 body, every time.
* The ready delay runs from the first request that names the id. Before it: 202
  ``{"status":"retrieving"}``; after it: 200 Completion or 202 ``{"status":"failed"}`` (terminal).
  ``Accept: text/html`` without ``application/json`` gets the ``html`` field as ``text/html``.
* Faults (500/502/504, 429/503 with ``Retry-After``, dropped connections, truncated bodies, slow
  answers, bursts of errors) come from one ``random.Random`` seeded from ``seed``: they hit
  requests, never ids, so a client that retries gets every id in the end.

``time_scale`` multiplies every delay: ready delays, added latency, slow answers, burst windows
and ``Retry-After``. ``Retry-After`` is whole seconds when ``time_scale == 1`` (as HTTP says),
otherwise a decimal number of seconds such as ``"0.05"``, which a harvester under test must accept.

``GET /_sim/stats`` (JSON, no auth) shows what the server served; ``POST /_sim/reset`` zeroes it.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from email.utils import formatdate
from functools import lru_cache
from hashlib import blake2b
from statistics import NormalDist
from types import TracebackType
from typing import Final

import orjson
from aiohttp import web

from harvester.errors import UsageError

__all__ = [
    "COMPLETIONS_PATH",
    "NO_CREDIT_TOKEN",
    "PROFILES",
    "STATS_KEY",
    "IdPlan",
    "ModelTiming",
    "Profile",
    "Simulator",
    "SimulatorStats",
    "expected_completion",
    "format_retry_after",
    "make_app",
    "plan_for",
    "resolve_profile",
    "serve",
]

NO_CREDIT_TOKEN: Final = "no-credit"
COMPLETIONS_PATH: Final = "/ai/completions"

# -- content fragments (assembled per id further down) ------------------------------------

_PRODUCTS: Final = (
    "basketball shoes", "noise cancelling headphones", "running shoes", "espresso machines",
    "budget laptops", "robot vacuums", "electric bikes", "standing desks", "air purifiers",
    "travel credit cards", "project management software", "VPN services", "mirrorless cameras",
    "trail running shoes", "gaming monitors", "password managers", "mechanical keyboards",
    "air fryers", "smart thermostats", "e-readers", "hiking backpacks", "dash cams",
    "office chairs", "wireless earbuds", "4K TVs", "coffee grinders", "baby strollers",
    "electric toothbrushes", "CRM tools for startups", "road bikes", "camping tents",
)  # fmt: skip
_QUERY_TEMPLATES: Final = (
    "best {p} for {y}", "top rated {p} {y}", "which {p} do experts recommend in {y}",
    "cheapest {p} with good reviews", "are premium {p} worth it in {y}",
    "{p} buying guide {y}", "what are the most reliable {p}", "compare the best {p} under $300",
)  # fmt: skip
_FANOUT_TEMPLATES: Final = (
    "best {p} {y}", "top rated {p} {y} reviews", "best performance {p} {y}",
    "{p} for beginners {y}", "best {p} for wide feet {y}", "most popular {p} {y}",
    "{p} reddit recommendations", "{p} under $200 {y}", "{p} vs alternatives {y}",
)  # fmt: skip
_BRANDS: Final = (
    "Acme", "Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay",
    "Soylent", "Tyrell", "Cyberdyne", "Wonka", "Stark", "Gringotts", "Aperture",
    "Müller &amp; Söhne",
)  # fmt: skip
_DOMAINS: Final = (
    "www.rtings.com", "www.techradar.com", "www.tomsguide.com", "www.reddit.com",
    "www.youtube.com", "www.consumerreports.org", "en.wikipedia.org", "www.theverge.com",
    "www.wired.com", "www.outdoorgearlab.com", "www.pcmag.com", "www.cnet.com",
)  # fmt: skip
_SUBJECTS: Final = (
    "The standout pick", "Our runner-up", "This budget option", "The premium model",
    "Reviewers’ favourite", "The lightweight choice", "For most people, the best buy",
    "The value champion", "A café-tested favourite", "The newest release",
)  # fmt: skip
_VERBS: Final = (
    "offers", "delivers", "balances", "combines", "prioritises", "trades away", "excels at",
    "stands out for", "keeps", "improves on",
)  # fmt: skip
_OBJECTS: Final = (
    "durability and comfort", "battery life of roughly 30 hours", "a sturdier build",
    "excellent value at about €180", "responsive cushioning", "low noise under load",
    "a generous two-year warranty", "a naïve but effective setup flow", "class-leading support",
    "predictable performance ±5%", "an easy-to-clean design", "a compact footprint",
)  # fmt: skip
_CLAUSES: Final = (
    "which testers consistently praise", "although stock can be limited",
    "a detail long-term owners mention often", "especially for everyday use",
    "if you can live with the heavier weight", "according to several independent reviews",
    "making it easy to recommend", "though the price fluctuates during sales",
    "so it suits beginners and enthusiasts alike", "with only minor trade-offs",
)  # fmt: skip
_HEADINGS: Final = (
    "Top picks", "Best overall", "Best on a budget", "What to look for", "How we chose",
    "Alternatives worth considering", "Bottom line", "Key differences",
)  # fmt: skip
_PLACES: Final = (
    ("US", "CA", "Los Angeles"), ("US", "NY", "New York"), ("GB", "ENG", "London"),
    ("DE", "BY", "München"), ("FR", "IDF", "Paris"), ("JP", "13", "Tokyo"),
    ("BR", "SP", "São Paulo"), ("IN", "MH", "Mumbai"), ("CA", "ON", "Toronto"),
    ("AU", "NSW", "Sydney"),
)  # fmt: skip
_DEVICES: Final = ("iPhone 15 Pro", "Pixel 8", "Galaxy S24", "iPad Air", "Desktop")
_DISPLAY: Final = {"chatgpt": "ChatGPT", "gemini": "Gemini", "perplexity": "Perplexity"}


# -- profiles ---------------------------------------------------------------------------------


def _check_rate(where: str, name: str, value: float, *, top: float = 1.0) -> None:
    """Raise UsageError unless ``value`` is a share between 0 and ``top``."""
    if not (isinstance(value, int | float) and 0.0 <= value <= top):
        raise UsageError(f"{where}: {name} must be a number between 0 and {top}, got {value!r}")


def _check_non_negative(where: str, name: str, value: float) -> None:
    """Raise UsageError unless ``value`` is a finite number >= 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{where}: {name} must be a finite number >= 0, got {value!r}")


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
        if not 0 <= lo <= hi <= len(_FANOUT_TEMPLATES):
            raise UsageError(
                f"{where}: fanouts must be (least, most) with 0 <= least <= most <= "
                f"{len(_FANOUT_TEMPLATES)}"
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

# Fault rates that are drawn once per request from one table (they exclude each other).
_EXCLUSIVE_FAULTS: Final = (
    "error_500_rate",
    "error_502_rate",
    "error_504_rate",
    "throttle_429_rate",
    "unavailable_503_rate",
    "drop_rate",
    "truncate_rate",
    "drop_after_headers_rate",
    "wrong_shape_rate",
    "html_body_rate",
    "oversize_rate",
    "unknown_status_rate",
    "unknown_code_rate",
    "slow_drip_rate",
    "stall_rate",
)
# Leaves at least this share of requests fault-free so every id stays harvestable.
_MAX_FAULT_SHARE: Final = 0.9


@dataclass(frozen=True)
class Profile:
    """Every knob of one simulator behaviour; validated on creation (and on ``replace``)."""

    name: str
    models: tuple[ModelTiming, ...] = REALISTIC_MODELS
    fail_rate: float = 0.05  # share of ids whose conversation ends 202 failed
    html_bytes: int = 14_000  # typical size of the html field; each id varies 0.6x-1.4x
    targeted_rate: float = 0.1  # share of ids with device/country/subdivision/city set
    latency_median_s: float = 0.0  # added latency per request (lognormal); 0 = none
    latency_sigma: float = 0.0
    error_500_rate: float = 0.0
    error_502_rate: float = 0.0
    error_504_rate: float = 0.0
    throttle_429_rate: float = 0.0
    unavailable_503_rate: float = 0.0
    retry_after_s: tuple[int, int] = (1, 5)  # whole seconds, before time_scale
    drop_rate: float = 0.0  # connection closed without an answer
    truncate_rate: float = 0.0  # applies only where the answer would be a 200 JSON body
    slow_rate: float = 0.0  # extra wait of slow_s on top of the latency (any answer)
    slow_s: tuple[float, float] = (2.0, 6.0)
    burst_period_s: float = 0.0  # every period, the last burst_length_s fail a lot; 0 = never
    burst_length_s: float = 0.0
    burst_fault_rate: float = 0.0  # share of requests answering 500/502/504 inside a burst
    # The rest of the fault matrix (each an exclusive share of requests, like the ones above):
    drop_after_headers_rate: float = 0.0  # headers sent, then the body is cut mid-way
    wrong_shape_rate: float = 0.0  # 200 valid JSON that is not a Completion
    html_body_rate: float = 0.0  # 200 text/html although JSON was asked for
    oversize_rate: float = 0.0  # 200 whose body is oversize_bytes long
    unknown_status_rate: float = 0.0  # 202 with a status the spec does not list
    unknown_code_rate: float = 0.0  # 404 or 418
    slow_drip_rate: float = 0.0  # the right answer, dripped out over drip_s seconds
    stall_rate: float = 0.0  # no answer for stall_s seconds (past a client's read timeout)
    oversize_bytes: int = 30 * 1024 * 1024
    drip_s: float = 3.0
    stall_s: float = 120.0
    retry_after_http_date: bool = False  # Retry-After as an HTTP date instead of seconds
    capacity_rps: float = 0.0  # over this many requests in the last second: 429; 0 = none

    def __post_init__(self) -> None:
        """Reject settings the simulator cannot honour, saying which value to change."""
        where = f"simulator profile {self.name!r}"
        if not self.models or sum(m.weight for m in self.models) <= 0:
            raise UsageError(f"{where}: give at least one model with a positive weight")
        if len({m.name for m in self.models}) != len(self.models):
            raise UsageError(f"{where}: model names must be unique")
        if self.html_bytes < 200:
            raise UsageError(f"{where}: html_bytes must be at least 200, got {self.html_bytes}")
        for name in ("fail_rate", "targeted_rate", "slow_rate", *_EXCLUSIVE_FAULTS):
            _check_rate(where, name, getattr(self, name))
        _check_rate(where, "burst_fault_rate", self.burst_fault_rate, top=_MAX_FAULT_SHARE)
        if self.fault_share() > _MAX_FAULT_SHARE:
            raise UsageError(
                f"{where}: the fault rates add up to {self.fault_share():.2f}; keep them at "
                f"or below {_MAX_FAULT_SHARE} so retrying clients still get through"
            )
        for name in ("latency_median_s", "latency_sigma", "burst_period_s", "burst_length_s"):
            _check_non_negative(where, name, getattr(self, name))
        if self.burst_length_s > self.burst_period_s:
            raise UsageError(f"{where}: burst_length_s must not exceed burst_period_s")
        lo, hi = self.retry_after_s
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise UsageError(f"{where}: retry_after_s must be (least, most) whole seconds >= 1")
        for name in ("drip_s", "stall_s", "capacity_rps"):
            _check_non_negative(where, name, getattr(self, name))
        if self.oversize_bytes < 1:
            raise UsageError(f"{where}: oversize_bytes must be at least 1")
        slow_lo, slow_hi = self.slow_s
        if not 0 <= slow_lo <= slow_hi:
            raise UsageError(f"{where}: slow_s must be (least, most) seconds with least >= 0")

    def fault_share(self) -> float:
        """Return the share of requests that draw one of the exclusive faults outside bursts."""
        return float(sum(getattr(self, name) for name in _EXCLUSIVE_FAULTS))

    def without_faults(self) -> Profile:
        """Return a copy with the same timings and content but no faults (for exact tests)."""
        return replace(
            self,
            name=f"{self.name}-calm",
            error_500_rate=0.0,
            error_502_rate=0.0,
            error_504_rate=0.0,
            throttle_429_rate=0.0,
            unavailable_503_rate=0.0,
            drop_rate=0.0,
            truncate_rate=0.0,
            slow_rate=0.0,
            burst_period_s=0.0,
            burst_length_s=0.0,
            burst_fault_rate=0.0,
            drop_after_headers_rate=0.0,
            wrong_shape_rate=0.0,
            html_body_rate=0.0,
            oversize_rate=0.0,
            unknown_status_rate=0.0,
            unknown_code_rate=0.0,
            slow_drip_rate=0.0,
            stall_rate=0.0,
            capacity_rps=0.0,
        )


PROFILES: Final[dict[str, Profile]] = {
    # Benchmarks and engine tests: all ready at once, small bodies, no faults, no latency.
    "instant": Profile(name="instant", models=INSTANT_MODELS, html_bytes=2_000),
    # What API-NOTES.md describes: model ready times, tens to hundreds of ms per request and a
    # few percent of 500/503/429.
    "realistic": Profile(
        name="realistic",
        latency_median_s=0.06,
        latency_sigma=0.6,
        error_500_rate=0.02,
        throttle_429_rate=0.01,
        unavailable_503_rate=0.01,
        retry_after_s=(1, 5),
    ),
    # Everything going wrong at once, about 30% of requests, yet every id still harvestable.
    "chaos": Profile(
        name="chaos",
        html_bytes=10_000,
        latency_median_s=0.06,
        latency_sigma=0.8,
        error_500_rate=0.05,
        error_502_rate=0.02,
        error_504_rate=0.03,
        throttle_429_rate=0.04,
        unavailable_503_rate=0.03,
        retry_after_s=(1, 3),
        drop_rate=0.03,
        truncate_rate=0.03,
        slow_rate=0.03,
        slow_s=(2.0, 6.0),
        burst_period_s=20.0,
        burst_length_s=2.0,
        burst_fault_rate=0.8,
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


# -- per-id plan, derived from the seed -------------------------------------------------------

_UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_STD_NORMAL: Final = NormalDist()
_U64: Final = float(2**64)


@dataclass(frozen=True, slots=True)
class IdPlan:
    """What the simulator will do with one id: its model, unscaled ready delay and fate."""

    id: str
    model: ModelTiming
    ready_delay_s: float
    fails: bool
    digest: bytes = field(repr=False)


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


def _normalise_id(id_: str) -> str:
    """Return the lowercase canonical id, or raise UsageError if it is not a UUID."""
    if _UUID_RE.fullmatch(id_) is None:
        raise UsageError(f"{id_!r} is not a hyphenated UUID; the simulator answers 422 for it")
    return id_.lower()


def _plan(id_: str, seed: int, profile: Profile) -> IdPlan:
    """Derive the plan of a canonical id; cheap enough to run on every request."""
    digest = blake2b(f"{seed}:{id_}".encode(), digest_size=32).digest()
    model = _pick_model(profile.models, _unit(digest, 1))
    return IdPlan(
        id=id_,
        model=model,
        ready_delay_s=_ready_delay(model, _unit(digest, 2)),
        fails=_unit(digest, 0) < profile.fail_rate,
        digest=digest,
    )


def plan_for(id: str, *, seed: int, profile: Profile | str) -> IdPlan:
    """Return what the simulator with this seed and profile does with ``id`` (for tests)."""
    return _plan(_normalise_id(id), seed, resolve_profile(profile))


def expected_completion(id: str, *, seed: int, profile: Profile | str) -> dict[str, object] | None:
    """Return the Completion the simulator serves for ``id``, or None if that id fails."""
    plan = plan_for(id, seed=seed, profile=profile)
    return None if plan.fails else _completion(plan, seed, resolve_profile(profile))


# -- content ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    """Text fragments built once per seed, so each body is only picks and joins."""

    sentences: tuple[str, ...]
    paragraphs: tuple[str, ...]


@lru_cache(maxsize=8)
def _pool(seed: int) -> _Pool:
    """Build the fragment pool for ``seed`` (cached: every id of a run shares it)."""
    rng = random.Random(f"pool:{seed}")
    sentences = tuple(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, "
        f"{rng.choice(_CLAUSES)}."
        for _ in range(400)
    )
    paragraphs = tuple(
        "<p>" + " ".join(rng.sample(sentences, rng.randint(2, 5))) + "</p>" for _ in range(300)
    )
    return _Pool(sentences=sentences, paragraphs=paragraphs)


def _completion(plan: IdPlan, seed: int, profile: Profile) -> dict[str, object]:
    """Assemble the Completion dict of a completing id from the pool and its own RNG."""
    rng = random.Random(plan.digest)
    pool = _pool(seed)
    model = plan.model.name
    display = _DISPLAY.get(model, model.capitalize())
    product, year = rng.choice(_PRODUCTS), rng.choice(("2025", "2026"))
    query = rng.choice(_QUERY_TEMPLATES).format(p=product, y=year)
    prompt = (
        '<h4 class="sr-only select-none">You said:</h4>'
        f'<div class="whitespace-pre-wrap user-message">{query}</div>'
    )
    # Small profiles get fewer links so that the completion still fills most of the page.
    sources = _sources_html(rng, product, year, most=min(8, max(2, profile.html_bytes // 1000)))
    ads = _ads_html(rng, product) if rng.random() < 0.3 else ""
    target = int(profile.html_bytes * rng.uniform(0.6, 1.4))
    budget = target - len(prompt) - len(sources) - len(ads) - 400  # 400: the page chrome
    completion = _completion_html(rng, pool, display, product, budget)
    html = (
        '<!DOCTYPE html><html lang="en-US"><head><meta charset="utf-8">'
        f"<title>{query} - {display}</title>"
        '<link rel="stylesheet" href="/assets/app.css"></head><body><div id="root">'
        f'<main class="conversation" data-model="{model}">'
        f'<article data-turn="user">{prompt}</article>'
        f'<article data-turn="assistant">{completion}{sources}{ads}</article>'
        "</main></div></body></html>"
    )
    lo, hi = plan.model.fanouts
    fanouts = [
        t.format(p=product, y=year) for t in rng.sample(_FANOUT_TEMPLATES, rng.randint(lo, hi))
    ]
    return {
        "model": model,
        "query": query,
        "html": html,
        "prompt": prompt,
        "completion": completion,
        "sources": sources,
        "ads": ads,
        "fanouts": fanouts,
        **_targeting(rng, profile.targeted_rate),
    }


def _completion_html(
    rng: random.Random, pool: _Pool, display: str, product: str, budget: int
) -> str:
    """Return the completion HTML, paragraphs and lists until ``budget`` characters."""
    parts = [
        f'<h4 class="sr-only select-none">{display} said:</h4>',
        '<div class="markdown prose w-full break-words">',
    ]
    size = 0
    while size < budget or len(parts) < 4:  # at least two blocks, however small the budget
        kind = rng.random()
        if kind < 0.6:
            part = rng.choice(pool.paragraphs)
        elif kind < 0.8:
            items = "".join(
                f"<li><strong>{rng.choice(_BRANDS)} {product}</strong>: "
                f"{rng.choice(pool.sentences)}</li>"
                for _ in range(rng.randint(3, 5))
            )
            part = f"<ul>{items}</ul>"
        else:
            part = f"<h3>{rng.choice(_HEADINGS)}</h3>"
        parts.append(part)
        size += len(part)
    parts.append("</div>")
    return "".join(parts)


def _sources_html(rng: random.Random, product: str, year: str, *, most: int) -> str:
    """Return the sources section: a handful of links about the product."""
    slug = product.lower().replace(" ", "-")
    links = "".join(
        f'<li><a href="https://{rng.choice(_DOMAINS)}/{slug}-{rng.randint(100, 999)}" '
        f'target="_blank" rel="noopener">{rng.choice(_HEADINGS)}: {product} in {year}</a></li>'
        for _ in range(rng.randint(2, most))
    )
    return (
        f'<section aria-label="Sources" class="sources"><h3>Sources</h3><ol>{links}</ol></section>'
    )


def _ads_html(rng: random.Random, product: str) -> str:
    """Return one to three sponsored links."""
    slug = product.lower().replace(" ", "-")
    items = "".join(
        f'<a href="https://shop.example.com/{slug}?ref=ai{rng.randint(1, 99)}" rel="sponsored">'
        f"{rng.choice(_BRANDS)} {product} — save {rng.randint(5, 40)}%</a>"
        for _ in range(rng.randint(1, 3))
    )
    return (
        '<div class="border-token-border-default mt-2 border-t py-4 text-sm">'
        f'<span class="ad-label">Sponsored</span>{items}</div>'
    )


def _targeting(rng: random.Random, targeted_rate: float) -> dict[str, str | None]:
    """Return device/country/subdivision/city: null unless the id was targeted, as the API does."""
    none: dict[str, str | None] = dict.fromkeys(("device", "country", "subdivision", "city"))
    if rng.random() >= targeted_rate:
        return none
    country, subdivision, city = rng.choice(_PLACES)
    local = rng.random() < 0.5  # half the targeted ids name a place inside the country
    return {
        "device": rng.choice(_DEVICES) if rng.random() < 0.5 else None,
        "country": country,
        "subdivision": subdivision if local else None,
        "city": city if local else None,
    }


# -- stats ------------------------------------------------------------------------------------


@dataclass
class SimulatorStats:
    """What the server served; answered + dropped + in_flight == requests at any time."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0
    max_per_second: int = 0  # most arrivals inside any sliding 1-second window
    dropped: int = 0  # connections closed on purpose without an answer
    truncated: int = 0  # 200 answers whose body was cut short (also counted in by_status)
    _arrivals: deque[float] = field(default_factory=deque, init=False, repr=False, compare=False)

    def arrive(self, now: float) -> None:
        """Count a request at its arrival time; amortised O(1) sliding-window maximum."""
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        arrivals = self._arrivals
        arrivals.append(now)
        while arrivals[0] <= now - 1.0:
            arrivals.popleft()
        self.max_per_second = max(self.max_per_second, len(arrivals))

    def current_per_second(self) -> int:
        """Arrivals in the last second, as of the latest arrival."""
        return len(self._arrivals)

    def answered(self, status: int) -> None:
        """Count one answer by status code."""
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def reset(self) -> None:
        """Zero every counter but keep requests still in flight, so the invariant holds."""
        self.requests = self.peak_in_flight = self.in_flight
        self.by_status = {}
        self.max_per_second = self.dropped = self.truncated = 0
        self._arrivals.clear()

    def as_dict(self) -> dict[str, object]:
        """Return the counters as a JSON-ready dict (status codes as string keys)."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        return data


# -- the server -------------------------------------------------------------------------------

STATS_KEY: Final = web.AppKey("harvester_simulator_stats", SimulatorStats)

_RETRIEVING: Final = b'{"status":"retrieving"}'
_FAILED: Final = b'{"status":"failed"}'
_FAULT_MESSAGES: Final = {
    500: "Unknown error occurred",
    502: "Bad gateway",
    504: "Request(s) timed out",
}
_FAULT_STATUS: Final = {
    "error_500": 500,
    "error_502": 502,
    "error_504": 504,
    "throttle_429": 429,
    "unavailable_503": 503,
}
_BURST_FAULTS: Final = ("error_500", "error_502", "error_504")
# Faults answered by _body_fault, and faults that change how the right answer is sent.
_BODY_FAULTS: Final = frozenset(
    ("wrong_shape", "html_body", "oversize", "unknown_status", "unknown_code")
)
_ANSWER_FAULTS: Final = frozenset(("truncate", "drop_after_headers", "slow_drip", "stall"))


@dataclass(frozen=True, slots=True)
class _Streamed:
    """An answer whose body is sent by hand: cut after the headers, or dripped out."""

    fault: str
    answer: web.Response


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Build a text/plain answer, the content type of every error the API sends."""
    return web.Response(status=status, text=message, headers=headers)


def _json(status: int, body: bytes) -> web.Response:
    """Build an application/json answer from ready-made bytes."""
    return web.Response(status=status, body=body, content_type="application/json")


def format_retry_after(seconds: int, time_scale: float) -> str:
    """Return the Retry-After value: whole seconds unscaled, else a plain decimal like 0.05."""
    if time_scale == 1.0:
        return str(seconds)
    scaled = max(seconds * time_scale, 1e-6)
    return f"{scaled:.6f}".rstrip("0").rstrip(".")


class _Server:
    """Holds one app's settings and per-id state, and answers every request."""

    def __init__(
        self,
        *,
        token: str | None,
        profile: Profile,
        seed: int,
        time_scale: float,
        clock: Callable[[], float],
    ) -> None:
        """Keep the settings, precompute the fault table and start the burst clock."""
        self.token = token
        self.profile = profile
        self.seed = seed
        self.time_scale = time_scale
        self.clock = clock
        self.stats = SimulatorStats()
        self.down = False
        self.first_seen: dict[str, float] = {}  # only ids with a ready delay are tracked
        self.rng = random.Random(f"faults:{seed}")
        self.started = clock()
        self.fault_table = self._fault_table(profile)

    @staticmethod
    def _fault_table(profile: Profile) -> list[tuple[float, str]]:
        """Return (cumulative threshold, fault) pairs for one uniform draw per request."""
        table, total = [], 0.0
        for name in _EXCLUSIVE_FAULTS:
            rate = getattr(profile, name)
            if rate > 0:
                total += rate
                table.append((total, name.removesuffix("_rate")))
        return table

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one GET /ai/completions, keeping it in flight until the answer is written."""
        stats = self.stats
        stats.arrive(self.clock())
        try:
            response = await self._answer(request)
            if response is None:
                stats.dropped += 1
                _drop(request)
                return web.Response()  # never written: aiohttp sees the closed transport
            if isinstance(response, _Streamed):
                return await self._stream(request, response)
            stats.answered(response.status)
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                pass  # the client went away first; aiohttp closes the connection
            return response
        finally:
            stats.in_flight -= 1

    async def _stream(self, request: web.Request, streamed: _Streamed) -> web.StreamResponse:
        """Send headers, then the body cut off mid-way or dripped out slowly."""
        answer = streamed.answer
        body = answer.body if isinstance(answer.body, bytes) else b""
        response = web.StreamResponse(status=answer.status)
        response.content_type = answer.content_type
        response.content_length = len(body)
        self.stats.answered(answer.status)
        try:
            await response.prepare(request)
            if streamed.fault == "drop_after_headers":
                await response.write(body[: len(body) // 2])
                self.stats.dropped += 1
                _drop(request)
                return response
            pieces = 10
            step = max(1, -(-len(body) // pieces))
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                await asyncio.sleep(self.profile.drip_s * self.time_scale / pieces)
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up first (its read timeout): that is the point
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse | _Streamed | None:
        """Decide the answer (None = drop the connection) after the added latency."""
        if self.down:
            return None
        await self._wait_latency()
        denied = self._check_auth(request.headers.get("Authorization"))
        if denied is not None:
            return denied
        raw_id = request.query.get("id")
        invalid = _check_id(raw_id)
        if invalid is not None or raw_id is None:
            return invalid
        id_ = raw_id.lower()
        plan = _plan(id_, self.seed, self.profile)
        now = self.clock()
        ready_at = now
        if plan.ready_delay_s > 0:
            ready_at = self.first_seen.setdefault(id_, now) + plan.ready_delay_s * self.time_scale
        if self._over_capacity():
            return self._throttle_response(429, seconds=1)  # the window is one second
        fault = self._draw_fault(now)
        if fault is not None:
            if fault == "drop":
                return None
            if fault == "stall":
                await asyncio.sleep(self.profile.stall_s * self.time_scale)
            elif fault in _BODY_FAULTS:
                return self._body_fault(fault)
            elif fault not in _ANSWER_FAULTS:
                return self._fault_response(fault)
        if now < ready_at:
            answer = _json(202, _RETRIEVING)
        elif plan.fails:
            answer = _json(202, _FAILED)
        else:
            answer = self._completed(request, plan, truncate=fault == "truncate")
        if fault in ("drop_after_headers", "slow_drip"):
            return _Streamed(fault, answer)
        return answer

    def _over_capacity(self) -> bool:
        """True past the profile's capacity: arrivals in the last second exceed it."""
        capacity = self.profile.capacity_rps
        return capacity > 0 and self.stats.current_per_second() > capacity

    def _body_fault(self, fault: str) -> web.Response:
        """A 2xx whose body is unusable, or an unlisted status code."""
        if fault == "wrong_shape":
            return _json(200, b'{"model": 7, "query": null, "fanouts": "none"}')
        if fault == "html_body":
            return web.Response(text="<html><body>rendered</body></html>", content_type="text/html")
        if fault == "oversize":
            filler = b"x" * self.profile.oversize_bytes
            return _json(200, b'{"model": "chatgpt", "html": "' + filler + b'"}')
        if fault == "unknown_status":
            return _json(202, b'{"status": "queued"}')
        return _text(self.rng.choice((404, 418)), "Not here")

    async def _wait_latency(self) -> None:
        """Sleep the profile's lognormal latency, plus a slow spell for some requests."""
        profile = self.profile
        delay = 0.0
        if profile.latency_median_s > 0:
            delay = self.rng.lognormvariate(
                math.log(profile.latency_median_s), profile.latency_sigma
            )
        if profile.slow_rate > 0 and self.rng.random() < profile.slow_rate:
            delay += self.rng.uniform(*profile.slow_s)
        if delay > 0:
            await asyncio.sleep(delay * self.time_scale)

    def _check_auth(self, header: str | None) -> web.Response | None:
        """Return the 401/403/402 answer the credentials deserve, or None if they pass."""
        if header is None:
            if self.token is None:
                return None
            return _text(401, "Authorization header must be provided")
        scheme, _, sent = header.partition(" ")
        sent = sent.strip() if scheme.lower() == "bearer" else ""
        if sent == NO_CREDIT_TOKEN:
            return _text(402, "Credit balance is 0; top up at https://example.invalid/billing")
        if self.token is not None and sent != self.token:
            return _text(403, "Valid API token must be provided")
        return None

    def _draw_fault(self, now: float) -> str | None:
        """Return the fault for this request (burst error, table fault) or None."""
        profile = self.profile
        if profile.burst_period_s > 0 and profile.burst_fault_rate > 0:
            phase = ((now - self.started) / self.time_scale) % profile.burst_period_s
            in_burst = phase >= profile.burst_period_s - profile.burst_length_s
            if in_burst and self.rng.random() < profile.burst_fault_rate:
                return self.rng.choice(_BURST_FAULTS)
        if not self.fault_table:
            return None
        u = self.rng.random()
        for threshold, fault in self.fault_table:
            if u < threshold:
                return fault
        return None

    def _fault_response(self, fault: str) -> web.Response:
        """Build the error answer of an HTTP fault; 429 and 503 carry Retry-After."""
        status = _FAULT_STATUS[fault]
        if status in _FAULT_MESSAGES:
            return _text(status, _FAULT_MESSAGES[status])
        return self._throttle_response(status)

    def _throttle_response(self, status: int, seconds: int | None = None) -> web.Response:
        """429 or 503 with Retry-After in seconds (scaled) or, if the profile says, a date."""
        if seconds is None:
            seconds = self.rng.randint(*self.profile.retry_after_s)
        value = format_retry_after(seconds, self.time_scale)
        if self.profile.retry_after_http_date:
            # HTTP dates have whole seconds: round the scaled wait up so it is never zero.
            wait = math.ceil(seconds * self.time_scale)
            value = formatdate(time.time() + wait, usegmt=True)
        if status == 429:
            message = f"Rate limit was exceeded; please retry in {value} seconds"
        else:
            message = f"Service is autoscaling; please retry in {value} seconds"
        return _text(status, message, headers={"Retry-After": value})

    def _completed(self, request: web.Request, plan: IdPlan, *, truncate: bool) -> web.Response:
        """Build the 200: HTML if only text/html is accepted, else JSON (maybe truncated)."""
        completion = _completion(plan, self.seed, self.profile)
        accept = request.headers.get("Accept", "")
        if "text/html" in accept and "application/json" not in accept:
            return web.Response(text=str(completion["html"]), content_type="text/html")
        body = orjson.dumps(completion)
        if truncate:
            self.stats.truncated += 1
            body = body[: len(body) // 2]  # a consistent Content-Length: the JSON is what breaks
        return _json(200, body)

    async def stats_view(self, request: web.Request) -> web.Response:
        """Serve the stats as JSON (no auth: loopback test helper)."""
        return _json(200, orjson.dumps(self.stats.as_dict()))

    async def reset_view(self, request: web.Request) -> web.Response:
        """Zero the stats and answer them."""
        self.stats.reset()
        return _json(200, orjson.dumps(self.stats.as_dict()))


def _check_id(raw_id: str | None) -> web.Response | None:
    """Return the 422 answer an invalid id deserves, or None for a UUID."""
    if not raw_id:
        return _text(422, "Id must be provided")
    if len(raw_id) > 255:
        return _text(422, "Character counts must be no more than 255")
    if _UUID_RE.fullmatch(raw_id) is None:
        return _text(422, "Id must be a valid UUID")
    return None


def _drop(request: web.Request) -> None:
    """Close the connection without answering, like a crashed backend or a cut network."""
    transport = request.transport
    if transport is not None:
        transport.close()


_SERVER_KEY: Final = web.AppKey("harvester_simulator_server", _Server)


def make_app(
    *,
    token: str | None = "sim-token",
    profile: Profile | str = "realistic",
    seed: int = 0,
    time_scale: float = 1.0,
    clock: Callable[[], float] | None = None,
) -> web.Application:
    """Build the simulator app; ``app[STATS_KEY]`` holds its stats, ``clock`` is for tests."""
    if token == "":
        raise UsageError("the simulator token must not be empty; pass token=None to turn auth off")
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise UsageError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    server = _Server(
        token=token,
        profile=resolve_profile(profile),
        seed=seed,
        time_scale=time_scale,
        clock=clock or time.monotonic,
    )
    app = web.Application()
    app[STATS_KEY] = server.stats
    app[_SERVER_KEY] = server
    app.router.add_get(COMPLETIONS_PATH, server.handle)
    app.router.add_get("/_sim/stats", server.stats_view)
    app.router.add_post("/_sim/reset", server.reset_view)
    return app


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the app on host:port (0 = any free port) and return the runner and real port."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}")
    # No access log: one log line per request would cost more than the answer itself.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {host}:{port} ({exc}); pick another port") from exc
    return runner, int(runner.addresses[0][1])


class Simulator:
    """Runs the simulator app in-process on a loopback port: ``async with Simulator() as sim``."""

    def __init__(
        self,
        *,
        token: str | None = "sim-token",
        profile: Profile | str = "realistic",
        seed: int = 0,
        time_scale: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Build the app now (so bad settings fail early); it listens on ``__aenter__``."""
        self.app = make_app(token=token, profile=profile, seed=seed, time_scale=time_scale)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def stats(self) -> SimulatorStats:
        """Return what the server has served so far."""
        return self.app[STATS_KEY]

    @property
    def base_url(self) -> str:
        """Return the URL to send requests to, such as http://127.0.0.1:43127."""
        if self._runner is None:
            raise RuntimeError("the simulator is not running; use 'async with Simulator(...)'")
        return f"http://{self.host}:{self.port}"

    def set_down(self, down: bool) -> None:
        """While down, close every connection without answering (a server restart)."""
        self.app[_SERVER_KEY].down = down

    async def __aenter__(self) -> Simulator:
        """Start listening; the port is known from here on."""
        self._runner, self.port = await _start(self.app, self.host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening and close the open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve(
    *,
    host: str,
    port: int,
    token: str | None,
    profile: str,
    seed: int,
    time_scale: float,
    capacity: float = 0.0,
    latency: float | None = None,
) -> None:
    """Run the simulator until cancelled, saying where it listens on stderr."""
    chosen = resolve_profile(profile)
    if capacity:
        chosen = replace(chosen, capacity_rps=capacity)
    if latency is not None:
        chosen = replace(chosen, latency_median_s=latency, latency_sigma=0.0)
    app = make_app(token=token, profile=chosen, seed=seed, time_scale=time_scale)
    runner, real_port = await _start(app, host, port)
    try:
        print(
            f"simulator listening on http://{host}:{real_port} (profile {profile})",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
