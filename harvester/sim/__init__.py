"""An in-process simulator of ``GET /ai/completions?id=<uuid>`` for the demo, tests and benchmarks;
the newer ``GET /ai?id=<uuid>`` answers by the same plans, its status objects with 200.

* ``Authorization: Bearer <token>``: no header -> 401, wrong token -> 403 (``token=None`` turns
  auth off). The bearer token ``no-credit`` always answers 402, so tests can reach that path.
* ``id`` missing, longer than 255 characters or not a hyphenated UUID -> 422. Error bodies are
  ``text/plain``.
* Everything about an id is derived from ``blake2b(seed:id)`` (:mod:`.plans`): whether it
  completes or fails, its model, its ready delay, its first-poll throttle and its content
  (:mod:`.content`). Same seed and id -> byte-identical 200 body, every time.
* The ready delay runs from the first request that names the id (or, with the profile's
  ``queued_at_start``, from the server's start or last reset). Before it: 202
  ``{"status":"retrieving"}``; after it: 200 Completion or 202 ``{"status":"failed"}`` (terminal).
  ``Accept: text/html`` without ``application/json`` gets the ``html`` field as ``text/html``.
* Faults (:mod:`.faults`: 500/502/504, 429/503 with ``Retry-After``, dropped connections,
  truncated bodies, slow answers, bursts of errors...) come from one ``random.Random`` seeded
  from ``seed``: they hit requests, never ids, so a client that retries gets every id in the end.
* Throttling scenarios (:mod:`.profiles`): a capacity in requests per second, a saturation
  window after the first request, and a share of ids throttled on their first request.

Modules: ``content`` (documents), ``profiles`` (knobs), ``plans`` (per-id fate), ``faults``
(the fault matrix and its draws), ``decide`` (the pure answer of one request), ``stats``,
``server`` (the aiohttp app, :class:`Simulator`, :func:`serve`) and ``demo``.
"""

from .decide import NO_CREDIT_TOKEN, format_retry_after
from .plans import IdPlan, expected_completion, plan_for
from .profiles import PROFILES, ModelTiming, Profile, resolve_profile
from .server import AI_PATH, COMPLETIONS_PATH, STATS_KEY, Simulator, make_app, serve
from .stats import SimulatorStats

__all__ = [
    "AI_PATH",
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
