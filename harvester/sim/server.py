"""The simulator as an aiohttp.web app: ``GET /ai/completions?id=<uuid>`` and the newer
``GET /ai?id=<uuid>`` (the same per-id plan; status objects answered with 200), plus its stats.

It follows ``shared/spec/ai-completions.openapi.yaml`` and the real-world behaviour in
``shared/API-NOTES.md``; what each request gets is decided by the pure functions of
:mod:`harvester.sim.decide`, and this module only keeps the state they need (when each id was
first seen, the fault RNG, the load) and sends their :class:`~harvester.sim.decide.Answer`.

``time_scale`` multiplies every delay: ready delays, added latency, slow answers, burst windows,
the saturation window and ``Retry-After``. ``Retry-After`` is whole seconds when
``time_scale == 1`` (as HTTP says), otherwise a decimal number of seconds such as ``"0.05"``.

``GET /_sim/stats`` (JSON, no auth) shows what the server served, ``detection`` included: how
many polls each completed id took and how long after its ready time its Completion was first
served (unscaled seconds); ``POST /_sim/reset`` zeroes it. A ready delay runs from the id's
first request, or with the profile's ``queued_at_start`` from the server's start or last reset.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web

from ..errors import UsageError
from .decide import (
    DROPPED,
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
from .faults import FaultDraws
from .plans import plan_id
from .profiles import Profile, resolve_profile
from .stats import SimulatorStats

__all__ = ["AI_PATH", "COMPLETIONS_PATH", "STATS_KEY", "Simulator", "make_app", "serve"]

COMPLETIONS_PATH: Final = "/ai/completions"
AI_PATH: Final = "/ai"  # the newer form of the same endpoint
STATS_KEY: Final = web.AppKey("harvester_simulator_stats", SimulatorStats)
_DRIP_PIECES: Final = 10


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
        """Keep the settings, build the fault draws and start the burst clock."""
        self.token = token
        self.profile = profile
        self.seed = seed
        self.time_scale = time_scale
        self.setup = Setup(profile=profile, seed=seed, time_scale=time_scale)
        self.clock = clock
        self.stats = SimulatorStats()
        self.down = False
        self.first_seen: dict[str, float] = {}  # only ids with a ready delay are tracked
        self.first_polled: set[str] = set()  # only ids the first-poll throttle picked
        self.first_request_at: float | None = None  # starts the saturation window
        self.capacity = CapacityBucket(profile.capacity_rps)
        self.rng = random.Random(f"faults:{seed}")
        self.started = clock()
        self.queued_at = self.started  # the ready delays' start, with queued_at_start
        self.faults = FaultDraws(
            self.rng,
            profile.fault_shares(),
            retry_after_s=profile.retry_after_s,
            burst_period_s=profile.burst_period_s,
            burst_length_s=profile.burst_length_s,
            burst_share=profile.burst_fault_share,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one GET /ai/completions, keeping it in flight until the answer is written."""
        return await self._handle(request, newer_form=False)

    async def handle_ai(self, request: web.Request) -> web.StreamResponse:
        """Answer one GET /ai?id= (the newer form), by the same plans and state."""
        return await self._handle(request, newer_form=True)

    async def _handle(self, request: web.Request, *, newer_form: bool) -> web.StreamResponse:
        arrived = self.clock()
        self.stats.arrive(arrived)
        if self.first_request_at is None:
            self.first_request_at = arrived
        try:
            return await self._send(request, await self._answer(request, newer_form=newer_form))
        finally:
            self.stats.in_flight -= 1

    async def _answer(self, request: web.Request, *, newer_form: bool) -> Answer:
        """Decide the answer after the added latency, updating the id's state."""
        if self.down:
            return DROPPED
        await self._wait_latency()
        now = self.clock()
        wall_now = time.time()
        started = now if self.first_request_at is None else self.first_request_at
        raw_id = request.query.get("id", "")
        early = (
            check_auth(request.headers.get("Authorization"), self.token)
            or check_saturation(now - started, self.setup, wall_now=wall_now)
            or check_id(raw_id)
        )
        id_ = raw_id.lower()
        detection = self.stats.detection
        if early is None or (early.cause == "saturated" and check_id(raw_id) is None):
            detection.polled(id_)  # a request for the id, throttled or not
        if early is not None:
            return early
        plan = plan_id(id_, self.seed, self.profile)
        ready_at = now
        # Tracked only where it matters: a ready delay, or an archiving spell to time.
        if plan.ready_delay_s > 0 or (newer_form and self.profile.archiving_s > 0):
            origin = (
                self.queued_at
                if self.profile.queued_at_start
                else self.first_seen.setdefault(id_, now)
            )
            ready_at = origin + plan.ready_delay_s * self.time_scale
        first_request = False
        if plan.first_poll_throttle is not None and id_ not in self.first_polled:
            self.first_polled.add(id_)
            first_request = True
        accept = request.headers.get("Accept", "")
        poll = Poll(
            plan=plan,
            now=now,
            ready_at=ready_at,
            first_request=first_request,
            over_capacity=not self.capacity.admit(now),
            wants_html="text/html" in accept and "application/json" not in accept,
            wall_now=wall_now,
            newer_form=newer_form,
        )
        fault = None
        if needs_fault(poll, self.setup):
            fault = self.faults.draw((now - self.started) / self.time_scale)
        answer = decide(poll, fault, self.setup)
        if answer.completes and not answer.truncated and answer.send is not Send.CUT:
            detection.completed(id_, (now - ready_at) / self.time_scale)
        return answer

    async def _wait_latency(self) -> None:
        """Sleep the profile's lognormal latency, plus a slow spell for some requests."""
        profile = self.profile
        delay = 0.0
        if profile.latency_median_s > 0:
            delay = self.rng.lognormvariate(
                math.log(profile.latency_median_s), profile.latency_sigma
            )
        if profile.slow_share > 0 and self.rng.random() < profile.slow_share:
            delay += self.rng.uniform(*profile.slow_s)
        if delay > 0:
            await asyncio.sleep(delay * self.time_scale)

    async def _send(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        """Write the answer as it says: whole, not at all, cut after the headers or dripped."""
        stats = self.stats
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)
        if answer.send is Send.DROP:
            stats.drop(self.clock())
            _drop(request)
            return web.Response()  # never written: aiohttp sees the closed transport
        if answer.truncated:
            stats.truncated += 1
        stats.answered(answer.status, self.clock(), cause=answer.cause)
        if answer.send is not Send.WHOLE:
            return await self._stream(request, answer)
        response = web.Response(
            status=answer.status,
            body=answer.body,
            content_type=answer.content_type,
            charset="utf-8" if answer.content_type.startswith("text/") else None,
            headers=None if answer.retry_after is None else {"Retry-After": answer.retry_after},
        )
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away first; aiohttp closes the connection
        return response

    async def _stream(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        """Send headers, then the body cut off mid-way or dripped out slowly."""
        body = answer.body
        response = web.StreamResponse(status=answer.status)
        response.content_type = answer.content_type
        response.content_length = len(body)
        try:
            await response.prepare(request)
            if answer.send is Send.CUT:
                await response.write(body[: len(body) // 2])
                self.stats.drop(self.clock())
                _drop(request)
                return response
            step = max(1, -(-len(body) // _DRIP_PIECES))
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                await asyncio.sleep(self.profile.drip_s * self.time_scale / _DRIP_PIECES)
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up first (its read timeout): that is the point
        return response

    async def stats_view(self, request: web.Request) -> web.Response:
        """Serve the stats as JSON (no auth: loopback test helper)."""
        return _json(orjson.dumps(self.stats.as_dict()))

    async def reset_view(self, request: web.Request) -> web.Response:
        """Zero the stats and answer them; with ``queued_at_start``, every id counts as
        queued now (a benchmark's next round starts its ready clocks here)."""
        self.stats.reset()
        self.queued_at = self.clock()
        return _json(orjson.dumps(self.stats.as_dict()))


def _json(body: bytes) -> web.Response:
    """A 200 application/json answer from ready-made bytes."""
    return web.Response(body=body, content_type="application/json")


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
    app.router.add_get(AI_PATH, server.handle_ai)
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
    jitter: float | None = None,
    first_poll_throttle_share: float = 0.0,
    saturated_s: float = 0.0,
    saturated_retry_after_s: int = 2,
    retry_after: int | None = None,
    queued_at_start: bool = False,
) -> None:
    """Run the simulator until cancelled, saying where it listens on stderr.

    ``capacity``, ``first_poll_throttle_share``, ``saturated_s`` and ``saturated_retry_after_s``
    override the profile's value unless left at their defaults; ``latency`` (seconds) sets a
    fixed added latency per request (or, with ``jitter``, its lognormal median, ``jitter`` the
    sigma; ``jitter`` alone changes the profile's sigma), ``retry_after`` (whole seconds) every
    fault's Retry-After; ``queued_at_start`` counts every ready delay from the server's start
    (or last reset) instead of the id's first request.
    """
    chosen = resolve_profile(profile)
    given: dict[str, Any] = {
        "capacity_rps": capacity,
        "first_poll_throttle_share": first_poll_throttle_share,
        "saturated_s": saturated_s,
        "saturated_retry_after_s": saturated_retry_after_s,
        "queued_at_start": queued_at_start,
    }
    defaults = {f.name: f.default for f in fields(Profile)}
    overrides = {name: value for name, value in given.items() if value != defaults[name]}
    if latency is not None:
        overrides.update(latency_median_s=latency, latency_sigma=jitter or 0.0)
    elif jitter is not None:
        overrides.update(latency_sigma=jitter)
    if jitter is not None and not (jitter >= 0 and math.isfinite(jitter)):
        raise UsageError(f"--jitter must be a number >= 0 (got {jitter})")
    if retry_after is not None:
        overrides.update(retry_after_s=(retry_after, retry_after))
    if overrides:
        chosen = replace(chosen, **overrides)
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
