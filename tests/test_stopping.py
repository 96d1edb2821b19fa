"""The stop controller: what the first and second SIGINT/SIGTERM do, on virtual time."""

from __future__ import annotations

import asyncio
import signal

from harvester.stopping import StopSignals

from .clocks import virtual_time


class Recorder:
    """Stands in for the harvest: remembers what the controller asked of it, and when."""

    def __init__(self, *, finished: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.finished = finished

    def stop(self) -> None:
        self.calls.append(("stop", asyncio.get_running_loop().time()))

    def cancel(self) -> None:
        self.calls.append(("cancel", asyncio.get_running_loop().time()))

    def attach_to(self, signals: StopSignals) -> None:
        signals.attach(stop=self.stop, cancel=self.cancel, finished=lambda: self.finished)


@virtual_time
async def test_first_signal_stops_then_cancels_after_the_grace() -> None:
    """One signal: stop now, cancel only when the grace period is over."""
    harvest = Recorder()
    with StopSignals(grace=10.0) as signals:
        harvest.attach_to(signals)
        signals.received(signal.SIGTERM)
        await asyncio.sleep(30.0)
    assert harvest.calls == [("stop", 0.0), ("cancel", 10.0)]
    assert signals.count == 1


@virtual_time
async def test_second_signal_cancels_at_once() -> None:
    """Two signals: stop, then cancel straight away without waiting for the grace."""
    harvest = Recorder()
    with StopSignals(grace=10.0) as signals:
        harvest.attach_to(signals)
        signals.received(signal.SIGINT)
        await asyncio.sleep(1.0)
        signals.received(signal.SIGINT)
        signals.disarm()
        await asyncio.sleep(30.0)
    assert harvest.calls == [("stop", 0.0), ("cancel", 1.0)]


@virtual_time
async def test_a_harvest_that_ends_in_the_grace_is_not_cancelled() -> None:
    """The harvest returned before the deadline: disarm() means no late cancel."""
    harvest = Recorder()
    with StopSignals(grace=10.0) as signals:
        harvest.attach_to(signals)
        signals.received(signal.SIGTERM)
        await asyncio.sleep(2.0)
        signals.disarm()
        await asyncio.sleep(30.0)
    assert harvest.calls == [("stop", 0.0)]


@virtual_time
async def test_a_signal_before_the_harvest_starts_stops_it_on_attach() -> None:
    """A SIGTERM while the dataset loads: counted, and the harvest stops as soon as it starts."""
    harvest = Recorder()
    with StopSignals() as signals:
        signals.received(signal.SIGTERM)
        assert signals.count == 1
        harvest.attach_to(signals)
    assert [name for name, _ in harvest.calls] == ["stop"]


@virtual_time
async def test_a_signal_after_every_id_is_done_does_not_count() -> None:
    """Every id terminal, only the last commit left: the run is not marked interrupted."""
    harvest = Recorder(finished=True)
    with StopSignals() as signals:
        harvest.attach_to(signals)
        signals.received(signal.SIGTERM)
    assert signals.count == 0
    assert harvest.calls == []
