"""The p95 the rollups report (from the latency histogram) follows ``percentile_cont``:
between two ranks it interpolates, so a few slow requests among fast ones move it as
they move the exact value, instead of leaving it inside a fast bucket."""

from __future__ import annotations

import random

from ext_proc.usage.rollups import (
    LAST_BUCKET,
    bucket_bounds,
    histogram_percentile,
    latency_bucket,
)


def _counts(latencies: list[float]) -> list[int]:
    counts = [0] * (LAST_BUCKET + 1)
    for ms in latencies:
        counts[latency_bucket(ms)] += 1
    return counts


def _percentile_cont(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    position = q * (len(ordered) - 1)
    below = int(position)
    if below + 1 >= len(ordered):
        return ordered[below]
    return ordered[below] + (position - below) * (ordered[below + 1] - ordered[below])


def test_a_slow_request_among_fast_ones_moves_the_p95_as_it_moves_the_exact_value() -> None:
    latencies = [647.0, 4.6, 4.8, 7.7]  # seen on the console's dashboard: p95 was 8.4 ms
    exact = _percentile_cont(latencies, 0.95)  # 551.0
    estimate = histogram_percentile(_counts(latencies))
    assert estimate is not None
    assert abs(estimate - exact) / exact < 0.1, (estimate, exact)


def test_the_estimate_stays_near_the_exact_value_for_random_samples() -> None:
    rng = random.Random(7)
    for size in (1, 2, 3, 5, 20, 200, 2000):
        latencies = [rng.lognormvariate(4, 1.2) + 1 for _ in range(size)]
        exact = _percentile_cont(latencies, 0.95)
        estimate = histogram_percentile(_counts(latencies))
        assert estimate is not None
        # Within the width of a bucket (19%) of the exact value.
        assert abs(estimate - exact) <= 0.19 * exact + 1e-9, (size, estimate, exact)


def test_the_estimate_never_leaves_the_range_of_its_two_ranks_buckets() -> None:
    latencies = [1.5, 2.0, 90.0]
    estimate = histogram_percentile(_counts(latencies))
    assert estimate is not None
    lowest = bucket_bounds(latency_bucket(2.0))[0]
    highest = bucket_bounds(latency_bucket(90.0))[1]
    assert lowest <= estimate < highest
