"""Usage data lifecycle logic without services: which table answers which part of a
range, the latency histogram, one created_at per request, retention settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ext_proc.server.completion import new_record
from ext_proc.server.facts import Facts
from ext_proc.settings import Settings, SettingsError, parse_age
from ext_proc.usage.maintenance import MaintenancePolicy, check_retentions
from ext_proc.usage.rollups import (
    LAST_BUCKET,
    Part,
    bucket_bounds,
    histogram_percentile,
    latency_bucket,
    plan_parts,
    unpack_histogram,
)

DAY = datetime(2025, 5, 1, tzinfo=UTC)


def _h(hours: float) -> datetime:
    return DAY + timedelta(hours=hours)


# --- which table answers which part of a range ---


def test_a_range_is_its_partial_hours_from_rows_and_the_rest_from_rollups() -> None:
    since, until = _h(10.25), _h(24 * 3 + 5.5)  # 10:15 on day 1 to 05:30 on day 4
    assert plan_parts(since, until, by_hour=False) == [
        Part("raw", since, _h(11)),
        Part("raw", _h(77), until),
        Part("pending", _h(11), _h(77)),
        Part("hourly", _h(11), _h(24)),
        Part("daily", _h(24), _h(72)),
        Part("hourly", _h(72), _h(77)),
    ]
    # Grouped by hour: no daily totals.
    assert plan_parts(since, until, by_hour=True) == [
        Part("raw", since, _h(11)),
        Part("raw", _h(77), until),
        Part("pending", _h(11), _h(77)),
        Part("hourly", _h(11), _h(77)),
    ]


def test_aligned_short_and_open_ranges() -> None:
    # Whole hours only, no whole day: rollups alone.
    assert plan_parts(_h(3), _h(9), by_hour=False) == [
        Part("pending", _h(3), _h(9)),
        Part("hourly", _h(3), _h(9)),
    ]
    # Less than one whole hour: the rows alone.
    assert plan_parts(_h(3.1), _h(3.9), by_hour=False) == [Part("raw", _h(3.1), _h(3.9))]
    assert plan_parts(_h(3.5), _h(4.5), by_hour=False) == [Part("raw", _h(3.5), _h(4.5))]
    # Unbounded ends are whole days of the rollups.
    assert plan_parts(None, None, by_hour=False) == [
        Part("pending", None, None),
        Part("daily", None, None),
    ]
    assert plan_parts(None, _h(30.5), by_hour=False) == [
        Part("raw", _h(30), _h(30.5)),
        Part("pending", None, _h(30)),
        Part("daily", None, _h(24)),
        Part("hourly", _h(24), _h(30)),
    ]
    # Another time zone, same instants.
    tokyo = _h(10.25).astimezone(timezone(timedelta(hours=9)))
    assert plan_parts(tokyo, _h(12), by_hour=False)[0] == Part("raw", tokyo, _h(11))


# --- the latency histogram ---


def test_histogram_buckets_and_unpacking() -> None:
    assert latency_bucket(0.0) == latency_bucket(0.99) == 0
    assert latency_bucket(1.0) == 1 and latency_bucket(2.0) == 5  # four buckets per doubling
    assert latency_bucket(1e12) == LAST_BUCKET
    for ms in (1.0, 1.5, 3.3, 250.0, 9_999.0):
        low, high = bucket_bounds(latency_bucket(ms))
        assert low <= ms < high
    assert bucket_bounds(LAST_BUCKET)[1] == float("inf")
    assert unpack_histogram(None) == []
    assert unpack_histogram(3 * 10**16 + 7) == [7, 3]
    assert unpack_histogram(5 * 10 ** (16 * 40)) == [0] * 40 + [5]
    with pytest.raises(ValueError, match="negative"):
        unpack_histogram(-1)


def test_p95_is_within_its_bucket() -> None:
    assert histogram_percentile([]) is None and histogram_percentile([0, 0]) is None
    latencies = [float(i) for i in range(1, 1001)]
    counts = [0] * (LAST_BUCKET + 1)
    for ms in latencies:
        counts[latency_bucket(ms)] += 1
    p95 = histogram_percentile(counts)
    assert p95 is not None
    low, high = bucket_bounds(latency_bucket(950.05))  # percentile_cont(0.95) of 1..1000
    assert low <= p95 < high
    # One latency: inside its bucket. Only huge ones: the last bucket's floor.
    one = histogram_percentile([0] * 30 + [1])
    assert one is not None and bucket_bounds(30)[0] < one < bucket_bounds(30)[1]
    assert histogram_percentile([0] * LAST_BUCKET + [4]) == bucket_bounds(LAST_BUCKET)[0]


# --- one created_at per request, whoever writes its record ---


def test_every_record_of_a_request_has_the_request_start_as_created_at() -> None:
    facts = Facts(request_id="r", started=1_746_093_600.123457, endpoint="/v1/x", operation="chat")
    # The request side's own record, and those written from the facts as they travel in
    # Envoy's metadata (the response processor, the usage log, the fallback).
    travelled = Facts.from_json(facts.to_json())
    assert travelled is not None
    created = {new_record(f).created_at for f in (facts, travelled)}
    assert created == {datetime(2025, 5, 1, 10, 0, 0, 123457, tzinfo=UTC)}


# --- retention settings ---


def test_retention_settings() -> None:
    assert Settings.from_env({}).usage_retention is None  # kept forever by default
    settings = Settings.from_env(
        {"EXT_PROC_USAGE_RETENTION": "90d", "EXT_PROC_USAGE_ROLLUP_RETENTION": "104w"}
    )
    assert settings.usage_retention == timedelta(days=90)
    assert settings.usage_rollup_retention == timedelta(weeks=104)
    assert Settings.from_env({"EXT_PROC_USAGE_RETENTION": "forever"}).usage_retention is None
    assert parse_age(" 36h ") == timedelta(hours=36)
    for bad in ("0d", "90", "1y", "-3d"):
        with pytest.raises(ValueError):
            parse_age(bad)
    with pytest.raises(SettingsError, match="EXT_PROC_USAGE_RETENTION"):
        Settings.from_env({"EXT_PROC_USAGE_RETENTION": "3 months"})
    with pytest.raises(SettingsError, match="must not be shorter"):
        Settings.from_env(
            {"EXT_PROC_USAGE_RETENTION": "90d", "EXT_PROC_USAGE_ROLLUP_RETENTION": "30d"}
        )
    with pytest.raises(SettingsError, match="must not be shorter"):
        Settings.from_env({"EXT_PROC_USAGE_ROLLUP_RETENTION": "30d"})
    with pytest.raises(ValueError, match="rollup retention"):
        check_retentions(timedelta(days=9), timedelta(days=1))
    with pytest.raises(ValueError, match="days_ahead"):
        MaintenancePolicy(days_ahead=0)
