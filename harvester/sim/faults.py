"""The fault matrix: every way the simulator misbehaves, each tied to the profile field that
sets how often (or how long), and the per-request draw of the faults that exclude each other.

Table faults (``Fault.in_table``) are drawn once per request from one uniform number, in the
enum's order; each has an exclusive share of requests. The others are decided by their own
rule: slow spells and bursts per request, the first-poll throttle per id, saturation and the
capacity by the server's clock. ``Profile.without_faults`` zeroes every member's field.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["BURST_FAULTS", "TABLE_FAULTS", "DrawnFault", "Fault", "FaultDraws"]


class Fault(enum.Enum):
    """One kind of misbehaviour; ``field`` is the Profile field that turns it on."""

    # -- drawn from one table, each an exclusive share of requests ---------------------------
    ERROR_500 = ("error_500_share", True)  # 500 text/plain
    ERROR_502 = ("error_502_share", True)
    ERROR_504 = ("error_504_share", True)
    THROTTLE_429 = ("throttle_429_share", True)  # with Retry-After from retry_after_s
    UNAVAILABLE_503 = ("unavailable_503_share", True)  # with Retry-After from retry_after_s
    DROP = ("drop_share", True)  # the connection closed without an answer
    TRUNCATE = ("truncate_share", True)  # a 200 JSON body cut in half
    DROP_AFTER_HEADERS = ("drop_after_headers_share", True)  # headers, half the body, closed
    WRONG_SHAPE = ("wrong_shape_share", True)  # 200 valid JSON that is not a Completion
    HTML_BODY = ("html_body_share", True)  # 200 text/html although JSON was asked for
    OVERSIZE = ("oversize_share", True)  # 200 whose body is oversize_bytes long
    UNKNOWN_STATUS = ("unknown_status_share", True)  # 202 with a status the spec does not list
    UNKNOWN_CODE = ("unknown_code_share", True)  # 404 or 418
    SLOW_DRIP = ("slow_drip_share", True)  # the right answer, dripped out over drip_s
    STALL = ("stall_share", True)  # no answer for stall_s (past a client's read timeout)
    # -- decided by their own rule ------------------------------------------------------------
    SLOW = ("slow_share", False)  # extra wait of slow_s on top of the latency (any answer)
    BURST = ("burst_fault_share", False)  # 500/502/504 for that share inside a burst window
    FIRST_POLL_THROTTLE = ("first_poll_throttle_share", False)  # 429/503 on an id's first poll
    SATURATED = ("saturated_s", False)  # 429 to everything for this long after the start
    OVER_CAPACITY = ("capacity_rps", False)  # 429 past this many requests in the last second

    def __init__(self, field: str, in_table: bool) -> None:
        """Keep the profile field and whether the per-request table draws this fault."""
        self.field = field
        self.in_table = in_table


TABLE_FAULTS: Final = tuple(f for f in Fault if f.in_table)
BURST_FAULTS: Final = (Fault.ERROR_500, Fault.ERROR_502, Fault.ERROR_504)


@dataclass(frozen=True, slots=True)
class DrawnFault:
    """The fault one request got, with what was drawn along with it."""

    fault: Fault
    retry_after_s: int = 0  # THROTTLE_429 and UNAVAILABLE_503: the unscaled wait
    status: int = 0  # UNKNOWN_CODE: 404 or 418


class FaultDraws:
    """Draws each request's fault from one ``random.Random``, in a fixed order.

    Per request: inside a burst window, one draw against ``burst_share`` (and a choice among
    500/502/504); otherwise one uniform draw against the cumulative table; then whatever the
    fault needs (a Retry-After, a status code).
    """

    def __init__(
        self,
        rng: random.Random,
        shares: Mapping[Fault, float],
        *,
        retry_after_s: tuple[int, int],
        burst_period_s: float = 0.0,
        burst_length_s: float = 0.0,
        burst_share: float = 0.0,
    ) -> None:
        """Build the cumulative table from the table faults' shares (zero shares left out)."""
        self.rng = rng
        self.retry_after_s = retry_after_s
        self.burst_period_s = burst_period_s
        self.burst_length_s = burst_length_s
        self.burst_share = burst_share
        table, total = [], 0.0
        for fault in TABLE_FAULTS:
            share = shares.get(fault, 0.0)
            if share > 0:
                total += share
                table.append((total, fault))
        self.table: tuple[tuple[float, Fault], ...] = tuple(table)

    def in_burst(self, elapsed_s: float) -> bool:
        """True inside the last burst_length_s of every burst period (unscaled seconds)."""
        if not (self.burst_period_s > 0 and self.burst_share > 0):
            return False
        phase = elapsed_s % self.burst_period_s
        return phase >= self.burst_period_s - self.burst_length_s

    def draw(self, elapsed_s: float) -> DrawnFault | None:
        """Return this request's fault, ``elapsed_s`` unscaled seconds after the start, or None."""
        rng = self.rng
        if self.in_burst(elapsed_s) and rng.random() < self.burst_share:
            return DrawnFault(rng.choice(BURST_FAULTS))
        if not self.table:
            return None
        u = rng.random()
        for threshold, fault in self.table:
            if u < threshold:
                follow_up = _FOLLOW_UPS.get(fault)
                return DrawnFault(fault) if follow_up is None else follow_up(self, fault)
        return None

    def _retry_after(self, fault: Fault) -> DrawnFault:
        """A 429 or 503 fault with its Retry-After drawn."""
        return DrawnFault(fault, retry_after_s=self.rng.randint(*self.retry_after_s))

    def _unknown_code(self, fault: Fault) -> DrawnFault:
        """An unknown-code fault with its status drawn."""
        return DrawnFault(fault, status=self.rng.choice((404, 418)))


# What a fault draws along with it, right after the fault itself.
_FOLLOW_UPS: Final[dict[Fault, Callable[[FaultDraws, Fault], DrawnFault]]] = {
    Fault.THROTTLE_429: FaultDraws._retry_after,
    Fault.UNAVAILABLE_503: FaultDraws._retry_after,
    Fault.UNKNOWN_CODE: FaultDraws._unknown_code,
}
