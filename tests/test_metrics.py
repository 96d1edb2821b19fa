"""Tests of the latency histogram and the run summary."""

from __future__ import annotations

from collections import Counter

import numpy as np
import numpy.typing as npt
import pytest

from harvester.metrics import LatencyHistogram, RunStats, peak_rss_mb


def filled(seconds: npt.NDArray[np.float64]) -> LatencyHistogram:
    """A histogram holding every value of ``seconds``."""
    hist = LatencyHistogram()
    for value in seconds.tolist():
        hist.record(value)
    return hist


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_match_numpy_on_lognormal(seed: int) -> None:
    """p50/p90/p99 are within 2% of numpy's on 50k lognormal latencies (median ~80 ms)."""
    rng = np.random.default_rng(seed)
    seconds = rng.lognormal(mean=np.log(0.08), sigma=1.0, size=50_000)
    hist = filled(seconds)
    for q in (50, 90, 99):
        exact = float(np.percentile(seconds * 1000.0, q))
        assert hist.percentile(q) == pytest.approx(exact, rel=0.02), q


def test_percentiles_wide_range() -> None:
    """Accuracy holds from sub-millisecond to minutes."""
    rng = np.random.default_rng(9)
    seconds = np.exp(rng.uniform(np.log(0.0002), np.log(120.0), size=20_000))
    hist = filled(seconds)
    for q in (1, 10, 50, 90, 99, 99.9):
        exact = float(np.percentile(seconds * 1000.0, q))
        assert hist.percentile(q) == pytest.approx(exact, rel=0.02), q


def test_percentile_never_below_true_rank_value() -> None:
    """The percentile is the top of its bucket: never under the nearest-rank value."""
    rng = np.random.default_rng(4)
    seconds = rng.lognormal(mean=np.log(0.2), sigma=0.5, size=2_000)
    hist = filled(seconds)
    ordered = np.sort(seconds * 1000.0)
    for q in (50, 90, 99):
        rank = int(np.ceil(len(ordered) * q / 100.0))
        assert hist.percentile(q) >= ordered[rank - 1] * (1 - 1e-9)


def test_empty_histogram_is_zeros() -> None:
    """An empty histogram reports zeros everywhere."""
    hist = LatencyHistogram()
    assert hist.count == 0
    assert hist.percentile(50) == 0.0
    assert hist.summary() == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_max_is_exact() -> None:
    """The max is the exact largest latency, and caps every percentile."""
    hist = filled(np.array([0.010, 0.0123456, 0.002]))
    assert hist.max_ms == pytest.approx(12.3456)
    assert hist.summary()["max"] == 12.35
    assert hist.percentile(100) == pytest.approx(12.3456)
    assert hist.percentile(99) <= hist.max_ms


def test_single_value() -> None:
    """With one latency every percentile is that latency."""
    hist = filled(np.array([0.25]))
    for q in (0, 50, 99, 100):
        assert hist.percentile(q) == pytest.approx(250.0)


def test_tiny_and_huge_latencies() -> None:
    """Zero, sub-10 µs and hour-long latencies are counted without error."""
    hist = filled(np.array([0.0, 0.000001, 3600.0]))
    assert hist.count == 3
    assert hist.max_ms == pytest.approx(3_600_000.0)
    assert hist.percentile(100) == pytest.approx(3_600_000.0)
    assert hist.percentile(10) <= 0.011


def test_run_stats_summary_keys_and_values() -> None:
    """The run summary has every documented key, with rates and latency computed."""
    stats = RunStats(unique_ids=10, completed=6, failed=1, invalid=2, unresolved=1, requests=40)
    stats.errors.update(Counter({"timeout": 2, "http_500": 1}))
    stats.latency.record(0.05)
    summary = stats.summary(4.0, out="somewhere")
    required = {
        "unique_ids",
        "completed",
        "failed",
        "invalid",
        "unresolved",
        "requests",
        "elapsed_s",
        "requests_per_s",
        "latency_ms",
    }
    assert required <= summary.keys()
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert summary["unique_ids"] == 10
    assert summary["completed"] == 6
    assert summary["failed"] == 1
    assert summary["invalid"] == 2
    assert summary["unresolved"] == 1
    assert summary["requests"] == 40
    assert summary["elapsed_s"] == 4.0
    assert summary["requests_per_s"] == 10.0
    assert summary["ids_per_s"] == 2.5
    assert summary["errors"] == {"http_500": 1, "timeout": 2}
    assert list(summary["errors"]) == ["http_500", "timeout"]
    assert summary["latency_ms"]["max"] == 50.0
    assert summary["out"] == "somewhere"


def test_run_stats_summary_zero_elapsed() -> None:
    """A zero elapsed time does not divide by zero."""
    summary = RunStats(requests=3).summary(0.0)
    assert summary["elapsed_s"] == 0.0
    assert summary["requests_per_s"] > 0


def test_finished_counts_every_outcome() -> None:
    """``finished`` is completed + failed + invalid + unresolved."""
    assert RunStats(completed=1, failed=2, invalid=3, unresolved=4).finished == 10


def test_peak_rss_is_positive() -> None:
    """Peak RSS is reported in MiB and plausible."""
    assert 1.0 < peak_rss_mb() < 1_000_000.0


def test_cumulative_counts_match_numpy_within_a_bucket() -> None:
    """Prometheus buckets from the histogram: counts at or below each bound within 1% of the
    bound (a value counts under the first bound its bucket's top fits), monotonic, and the
    sum kept exactly; merging keeps both."""
    rng = np.random.default_rng(4)
    seconds = rng.lognormal(mean=np.log(0.02), sigma=1.5, size=20_000)
    hist = filled(seconds)
    ms = seconds * 1000.0
    bounds = [0.005, 0.5, 1.0, 5.0, 25.0, 100.0, 1000.0, 60_000.0]
    counts = hist.cumulative(bounds)
    assert counts == sorted(counts)
    for bound, count in zip(bounds, counts, strict=True):
        assert int((ms <= bound / 1.01).sum()) <= count <= int((ms <= bound).sum()), bound
    assert counts[-1] == hist.count == 20_000
    assert hist.sum_ms == pytest.approx(float(ms.sum()))
    other = LatencyHistogram()
    other.merge(hist.buckets(), hist.max_ms, hist.sum_ms)
    assert other.cumulative(bounds) == counts
    assert other.sum_ms == pytest.approx(hist.sum_ms)
    assert LatencyHistogram().cumulative(bounds) == [0] * len(bounds)
