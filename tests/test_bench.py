"""`harvester bench`: parsing, the schedule and dropping on virtual time, and whole benches
against the simulator in its own process (latency, capacity, drops, 402, the rate cap)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from harvester.bench import (
    SendLog,
    Slots,
    dispatch,
    intended_times,
    parse_ramp,
    parse_rates,
    parse_slo,
)
from harvester.cli import main
from harvester.errors import ExitCode, UsageError

from .clocks import virtual_time
from .conftest import TOKEN, launch_simulator, make_ids, write_csv

# -- parsing ----------------------------------------------------------------------------------


def test_rates_and_ramp_parse() -> None:
    assert parse_rates("100, 200,450.5") == (100.0, 200.0, 450.5)
    assert parse_ramp("100:500:100") == (100.0, 200.0, 300.0, 400.0, 500.0)
    assert parse_ramp("10:25:10") == (10.0, 20.0)
    assert parse_ramp("50:50:1") == (50.0,)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_rates, ""),
        (parse_rates, "100,,200"),
        (parse_rates, "abc"),
        (parse_rates, "0"),
        (parse_rates, "-5"),
        (parse_rates, "inf"),
        (parse_ramp, "100:50:10"),
        (parse_ramp, "100:500"),
        (parse_ramp, "1:2:0"),
        (parse_ramp, "1:100000:1"),
        (parse_slo, ""),
        (parse_slo, "success=2"),
        (parse_slo, "p99=500"),
        (parse_slo, "p95=1s"),
        (parse_slo, "success"),
        (parse_slo, "p99=-1ms"),
    ],
)
def test_bad_values_raise_usage_errors(parse: Any, text: str) -> None:
    with pytest.raises(UsageError):
        parse(text)


def test_slo_parses_units() -> None:
    slo = parse_slo("success=0.99,p99=500ms,p50=0.1s,P999=2s")
    assert slo.success == 0.99
    assert slo.bounds_ms == {"p99": 500.0, "p50": 100.0, "p999": 2000.0}
    assert parse_slo("p90=20ms").success is None


# -- the schedule, the send log and dropping, on virtual time -------------------------------


def test_schedule_is_fixed() -> None:
    times = list(intended_times(10.0, 4.0, 1.0))
    assert times == [10.0, 10.25, 10.5, 10.75]
    assert len(list(intended_times(0.0, 412.5, 2.0))) == 825


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` in any half-open window ``(t - window, t]``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_send_log_holds_a_catch_up_burst_to_rate_plus_one() -> None:
    log = SendLog()
    log.set_rate(10)
    sent: list[float] = []
    now = 0.0
    for _ in range(60):  # a backlog: every send wants to go at once
        now = log.next_free(now)
        log.record(now)
        sent.append(now)
    assert max_in_window(sent) <= 11
    assert min(b - a for a, b in itertools.pairwise(sent)) >= 0.025 - 1e-9


def test_send_log_lets_the_exact_schedule_through() -> None:
    log = SendLog()
    log.set_rate(250)
    for t in intended_times(0.0, 250, 3.0):
        assert log.next_free(t) == pytest.approx(t, abs=1e-9)
        log.record(t)


async def _dispatch(
    rate: float,
    seconds: float,
    *,
    concurrency: int,
    latency: float,
    stall: tuple[float, float] | None = None,
) -> tuple[list[tuple[float, float]], list[float]]:
    """Dispatch one step on the running (virtual) loop; requests take ``latency`` s; ``stall``
    (at, for) makes the sender oversleep once."""
    loop = asyncio.get_running_loop()
    slots = Slots(concurrency)
    log = SendLog()
    log.set_rate(rate)
    sent: list[tuple[float, float]] = []
    dropped: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    stalled = [stall is None]

    async def sleep(seconds: float) -> None:
        if not stalled[0] and stall is not None and loop.time() >= stall[0]:
            stalled[0] = True
            seconds += stall[1]
        await asyncio.sleep(seconds)

    async def request() -> None:
        await asyncio.sleep(latency)
        slots.release()

    def send(intended: float, at: float) -> None:
        sent.append((intended, at))
        tasks.append(asyncio.create_task(request()))

    await dispatch(
        intended_times(loop.time(), rate, seconds),
        clock=loop.time,
        sleep=sleep,
        slots=slots,
        log=log,
        send=send,
        drop=dropped.append,
        stopped=lambda: False,
    )
    await asyncio.gather(*tasks)
    return sent, dropped


@virtual_time
async def test_sends_on_schedule_when_the_server_keeps_up() -> None:
    sent, dropped = await _dispatch(100, 2.0, concurrency=64, latency=0.05)
    assert not dropped
    assert len(sent) == 200
    assert all(at - intended < 1e-3 for intended, at in sent)


@virtual_time
async def test_full_slots_drop_requests_a_second_late() -> None:
    """4 slots of 50 ms carry 80/s: offered 200/s, the rest wait, and those a second late drop."""
    sent, dropped = await _dispatch(200, 2.0, concurrency=4, latency=0.05)
    assert len(sent) + len(dropped) == 400
    assert dropped
    assert 2 * 80 <= len(sent) <= 3 * 80 + 4  # at most ~1 s of lateness is carried past the end
    assert all(at - intended <= 1.0 + 1e-6 for intended, at in sent)


@virtual_time
async def test_catching_up_after_a_stall_keeps_the_rate_cap() -> None:
    sent, dropped = await _dispatch(50, 3.0, concurrency=64, latency=0.01, stall=(1.0, 0.6))
    assert not dropped  # 0.6 s late is within the 1 s allowed
    times = [at for _, at in sent]
    assert max_in_window(times) <= 51
    assert max(at - intended for intended, at in sent) >= 0.5


@virtual_time
async def test_a_long_stall_drops_what_is_over_a_second_late() -> None:
    sent, dropped = await _dispatch(50, 3.0, concurrency=64, latency=0.01, stall=(1.0, 1.5))
    assert dropped
    assert len(sent) + len(dropped) == 150
    assert max_in_window([at for _, at in sent]) <= 51


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--synthetic", "5", "--rates", "10,x"],
        ["--synthetic", "5", "--ramp", "10:5:1"],
        ["--synthetic", "5", "--rates", "10", "--slo", "p99=fast"],
        ["--rates", "10"],
        ["--synthetic", "5", "--ids", "ids.csv", "--rates", "10"],
        ["--synthetic", "5"],
        ["--synthetic", "5", "--rates", "10", "--ramp", "1:2:1"],
        ["--synthetic", "0", "--rates", "10"],
        ["--synthetic", "5", "--rates", "10", "--concurrency", "0"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)
    code = main(["bench", "--base-url", "http://127.0.0.1:9", *args])
    out, err = capsys.readouterr()
    assert code == ExitCode.USAGE
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err


def test_missing_token_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MASSIVE_API_TOKEN", raising=False)
    code = main(["bench", "--base-url", "http://127.0.0.1:9", "--synthetic", "3", "--rates", "5"])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert err.strip().splitlines() == [err.strip()]
    assert "MASSIVE_API_TOKEN" in err


# -- whole benches against the simulator ---------------------------------------------------------


def bench(url: str, *args: str, token: str = TOKEN, timeout: float = 90) -> tuple[int, Any, str]:
    """``harvester bench --json`` in a child process: (exit code, the JSON or None, stderr)."""
    env = {**os.environ, "MASSIVE_API_TOKEN": token}
    done = subprocess.run(
        [sys.executable, "-m", "harvester", "bench", "--base-url", url, "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    result = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, result, done.stderr


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as answer:
        stats: dict[str, Any] = json.load(answer)
    return stats


FIXED_50MS = ("--profile", "instant", "--latency", "0.05", "--jitter", "0")


def test_latency_at_100_per_s_and_the_server_count(tmp_path: Path) -> None:
    """(b) p50 near the fixed 50 ms; (c) sent == the server's own count; (g) rate cap;
    and --out writes its three files."""
    ids = write_csv(tmp_path / "ids.csv", [*make_ids(3), "not-a-uuid"])
    with launch_simulator(tmp_path, *FIXED_50MS) as url:
        out = tmp_path / "out"
        code, result, err = bench(
            url, "--ids", str(ids), "--rates", "100", "--step-seconds", "3", "--out", str(out)
        )
        stats = sim_stats(url)
    assert code == 0, err
    (step,) = result["steps"]
    assert step["offered"] == 100
    assert (step["sent"], step["dropped"], step["rate_reached"]) == (300, 0, True)
    assert step["success_ratio"] == 1.0
    assert sum(step["status"].values()) == step["answered"] == 300
    # Loose, as every timing here (the shared 2-core CI machine runs three processes at
    # once); on a quiet machine both are within 5 ms of 50 (the note has the figures).
    assert 45 <= step["latency_ms_from_send"]["p50"] <= 65, step
    assert 45 <= step["latency_ms"]["p50"] <= 70, step  # from intended: plus loop lateness
    assert result["max_rate_within_slo"] is None
    assert stats["requests"] == step["sent"]
    sent = [r["sent_at"] for r in pq.read_table(out / "requests.parquet").to_pylist()]
    assert max_in_window(sent) <= 101  # strict by the sender's clock
    # At the server, deliveries can bunch by more than the 10 ms margin on a loaded machine.
    assert max(stats["per_second"]["requests"]) <= 101 * 1.05
    assert stats["max_per_second"] <= 101 * 1.05
    assert json.loads((out / "bench.json").read_text()) == result
    rows = pq.read_table(out / "requests.parquet")
    assert rows.num_rows == 300
    assert set(rows.column_names) >= {"step", "offered", "intended_at", "sent_at", "latency_ms"}
    if importlib.util.find_spec("matplotlib") is not None:  # the optional `bench` extra
        assert (out / "bench.png").stat().st_size > 1000
    else:
        assert not (out / "bench.png").exists()
        assert "bench.png skipped (matplotlib is not installed" in err


def test_too_few_slots_drop_and_show_coordinated_omission(tmp_path: Path) -> None:
    """(d) 4 slots of 50 ms carry ~80/s: offered 200/s drops, and the intended-time p99 shows
    the queueing that the from-send p99 hides."""
    with launch_simulator(tmp_path, *FIXED_50MS) as url:
        code, result, err = bench(
            url, "--synthetic", "50", "--rates", "200", "--step-seconds", "3",
            "--concurrency", "4",
        )  # fmt: skip
        stats = sim_stats(url)
    assert code == 0, err
    (step,) = result["steps"]
    assert step["dropped"] > 0
    assert step["rate_reached"] is False
    assert "not reached" in err
    assert step["latency_ms"]["p99"] > 400  # about a second of waiting for a slot
    assert step["latency_ms_from_send"]["p99"] < 100
    assert step["latency_ms"]["p99"] > 4 * step["latency_ms_from_send"]["p99"]
    assert stats["requests"] == step["sent"]
    assert stats["peak_in_flight"] <= 4
    assert stats["max_per_second"] <= 201


def test_402_stops_with_exit_3(tmp_path: Path) -> None:
    """(e) the simulator answers 402 to the token "no-credit"."""
    with launch_simulator(tmp_path, *FIXED_50MS) as url:
        code, result, err = bench(
            url, "--synthetic", "5", "--rates", "20,40", "--step-seconds", "5", token="no-credit"
        )
        stats = sim_stats(url)
    assert code == ExitCode.REFUSED
    assert result is None
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "402" in lines[0], err
    assert stats["requests"] < 40  # stopped at once, not after the steps


@pytest.mark.slow
def test_max_rate_within_slo_finds_the_capacity(tmp_path: Path) -> None:
    """(a) a server of 400/s capacity: the bisection lands within 10% of it; (c) and (g)."""
    out = tmp_path / "out"
    with launch_simulator(tmp_path, *FIXED_50MS, "--capacity", "400") as url:
        code, result, err = bench(
            url, "--synthetic", "1000", "--rates", "200,300,350,450,600",
            "--step-seconds", "3", "--slo", "success=0.99", "--out", str(out), timeout=110,
        )  # fmt: skip
        stats = sim_stats(url)
    assert code == 0, err
    best = result["max_rate_within_slo"]
    assert best is not None, result
    assert 360 <= best <= 440, result
    offered = [s["offered"] for s in result["steps"]]
    assert offered[:5] == [200, 300, 350, 450, 600]
    assert 1 <= len(offered) - 5 <= 3  # the bisection steps
    assert stats["requests"] == sum(s["sent"] for s in result["steps"])
    # By the sender's clock: never more than offered + 1 in any second of a step.
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    for index, step in enumerate(result["steps"]):
        sent = [r["sent_at"] for r in rows if r["step"] == index and r["sent_at"] is not None]
        assert len(sent) == step["sent"]
        assert max_in_window(sent) <= int(step["offered"]) + 1
    # At the server, whose own loop bunches arrivals by a few ms at 600/s (a margin of 1/R
    # covers less), a few more can land in one second: measured up to 616 in a sliding second.
    assert max(stats["per_second"]["requests"]) <= 601 * 1.02
    assert stats["max_per_second"] <= 601 * 1.05
    assert "max rate within SLO" in err


def test_serve_takes_a_jitter(capsys: pytest.CaptureFixture[str]) -> None:
    """`--latency S --jitter 0` is a fixed latency; a negative sigma exits 2 before listening."""
    from harvester.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--latency", "0.05", "--jitter", "0"])
    assert (args.latency, args.jitter) == (0.05, 0.0)
    assert main(["serve", "--port", "0", "--latency", "0.05", "--jitter", "-1"]) == ExitCode.USAGE
    assert "--jitter" in capsys.readouterr().err
