"""Usage data lifecycle logic without services: which table answers which part of a
range, the latency histogram, one created_at per request, retention settings."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from ext_proc.server.completion import new_record
from ext_proc.server.facts import Facts
from ext_proc.settings import Settings, SettingsError, parse_age
from ext_proc.usage.maintenance import MaintenancePolicy, check_retentions
from ext_proc.usage.rollups import (
    _UNITS,
    LAST_BUCKET,
    Part,
    _floor,
    bucket_bounds,
    histogram_percentile,
    latency_bucket,
    plan_parts,
    rollup_grains,
    rollup_level,
    unpack_histogram,
)

DAY = datetime(2025, 5, 1, tzinfo=UTC)


def _h(hours: float) -> datetime:
    return DAY + timedelta(hours=hours)


# --- which table answers which part of a range ---

FULL = ("hourly", "daily", "weekly")


def test_a_range_is_read_from_the_nearest_bucket_edges_and_corrected() -> None:
    since, until = _h(10.25), _h(24 * 3 + 5.5)  # 10:15 on day 1 to 05:30 on day 4
    # 10:00 is nearer to 10:15 than 11:00: the hour is read whole, its first quarter
    # subtracted; days 1-3 whole, less the hours before 10:00, plus those of day 4.
    assert plan_parts(since, until) == [
        Part("raw", _h(10), since, -1),
        Part("raw", _h(77), until),
        Part("pending", _h(10), _h(77)),
        Part("hourly", _h(0), _h(10), -1),
        Part("hourly", _h(72), _h(77)),
        Part("daily", _h(0), _h(72)),
    ]
    # Grouped by hour: no daily totals. Three days: no week (it would need more days
    # corrected than it replaces).
    assert plan_parts(since, until, grains=("hourly",)) == [
        Part("raw", _h(10), since, -1),
        Part("raw", _h(77), until),
        Part("pending", _h(10), _h(77)),
        Part("hourly", _h(10), _h(77)),
    ]
    assert plan_parts(since, until, grains=FULL) == plan_parts(since, until)


def test_thirty_days_up_to_now_read_weeks_and_nothing_of_the_future() -> None:
    now = datetime(2025, 6, 2, 14, 15, tzinfo=UTC)  # a Monday
    since = now - timedelta(days=30)  # Saturday 3 May, 14:15

    def at(day: int, hour: int = 0, minute: int = 0, month: int = 5) -> datetime:
        return datetime(2025, month, day, hour, minute, tzinfo=UTC)

    assert plan_parts(since, now, grains=FULL, now=now) == [
        Part("raw", at(3, 14), since, -1),
        # The rest of this hour, day and week has not happened: read whole, nothing to
        # subtract but what arrives meanwhile.
        Part("raw", now, at(2, 15, month=6), -1),
        Part("pending", at(3, 14), at(2, 15, month=6)),
        Part("hourly", at(3, 14), at(4)),
        Part("hourly", at(2, 15, month=6), at(3, month=6), -1),
        Part("daily", at(4), at(5)),
        Part("daily", at(3, month=6), at(9, month=6), -1),
        Part("weekly", at(5), at(9, month=6)),  # weeks from Monday 00:00 UTC
    ]
    # `now` changes what is read, never what it adds up to: with now a day later, the
    # same range is read up to its own end.
    later = plan_parts(since, now, grains=FULL, now=now + timedelta(days=1))
    assert Part("raw", at(2, 14, month=6), now) in later


def test_short_aligned_and_open_ranges() -> None:
    # Whole hours only, no whole day: the hourly rollup alone.
    assert plan_parts(_h(3), _h(9)) == [
        Part("pending", _h(3), _h(9)),
        Part("hourly", _h(3), _h(9)),
    ]
    # Inside one hour: the hour less 12 minutes of rows beats 48 minutes of rows...
    assert plan_parts(_h(3.1), _h(3.9)) == [
        Part("raw", _h(3), _h(3.1), -1),
        Part("raw", _h(3.9), _h(4), -1),
        Part("pending", _h(3), _h(4)),
        Part("hourly", _h(3), _h(4)),
    ]
    # ...but an hour across two, half of each: the rows alone.
    assert plan_parts(_h(3.5), _h(4.5)) == [Part("raw", _h(3.5), _h(4.5))]
    assert plan_parts(_h(3.2), _h(3.4)) == [Part("raw", _h(3.2), _h(3.4))]
    # Unbounded ends are read from the coarsest rollup.
    assert plan_parts(None, None) == [Part("pending", None, None), Part("daily", None, None)]
    assert plan_parts(None, None, grains=FULL)[-1] == Part("weekly", None, None)
    assert plan_parts(None, _h(30.5)) == [
        Part("raw", _h(30), _h(30.5)),
        Part("pending", None, _h(30)),
        Part("hourly", _h(24), _h(30)),
        Part("daily", None, _h(24)),
    ]
    # Another time zone, same instants.
    tokyo = _h(10.25).astimezone(timezone(timedelta(hours=9)))
    assert plan_parts(tokyo, _h(12))[0] == Part("raw", _h(10), tokyo, -1)


def _covered(parts: list[Part], sources: set[str], t: datetime) -> int:
    return sum(
        p.sign
        for p in parts
        if p.source in sources
        and (p.since is None or p.since <= t)
        and (p.until is None or t < p.until)
    )


def test_every_plan_adds_up_to_its_range() -> None:
    """Any range, any `now`, any grains: every instant of the range is counted once,
    none outside it; the changes not folded yet count where the rollups are read; each
    rollup is read in whole buckets."""
    rng = random.Random(14)
    origin = datetime(2025, 3, 1, tzinfo=UTC)
    minute = timedelta(minutes=1)
    for _ in range(400):
        a, b = sorted(rng.sample(range(0, 60 * 24 * 70), 2))
        since = None if rng.random() < 0.1 else origin + a * minute + rng.random() * minute
        until = None if rng.random() < 0.1 else origin + b * minute + rng.random() * minute
        now = origin + rng.randrange(0, 60 * 24 * 80) * minute
        grains = rng.choice([("hourly",), ("hourly", "daily"), FULL])
        parts = plan_parts(since, until, grains=grains, now=now)
        rollups = {"hourly", "daily", "weekly"}
        for part in parts:
            if part.source in rollups:
                for edge in (part.since, part.until):
                    assert edge is None or edge == _floor(edge, _UNITS[part.source])
        edges = [p.since for p in parts] + [p.until for p in parts]
        instants = {origin + rng.random() * timedelta(days=70) for _ in range(300)}
        for edge in [since, until, *edges]:
            if edge is not None:
                instants |= {edge, edge - timedelta(microseconds=1)}
        for t in instants:
            inside = (since is None or since <= t) and (until is None or t < until)
            assert _covered(parts, {"raw", *rollups}, t) == int(inside), (since, until, t)
            assert _covered(parts, {"pending"}, t) == _covered(parts, rollups, t)


def test_the_smallest_rollups_that_have_the_keys_answer() -> None:
    none: dict[str, str | None] = {"org_id": None, "app_id": None, "model": None}
    assert rollup_level(["hour"], none) == "org"
    assert rollup_level(["day", "org_id"], none) == "org"
    assert rollup_level([], {**none, "org_id": "acme"}) == "org"
    assert rollup_level(["hour"], {**none, "model": "gpt-4o"}) == "app"
    assert rollup_level(["app_id", "provider"], none) == "app"
    for key in ("key_id", "environment", "deployment", "decision", "status_class"):
        assert rollup_level([key], none) == "full"
    assert rollup_level(["model"], {**none, "app_id": "bot"}) == "app"
    assert rollup_grains(["key_id"], "full") == FULL
    assert rollup_grains(["day", "key_id"], "full") == ("hourly", "daily")
    assert rollup_grains(["hour", "org_id"], "org") == ("hourly",)
    assert rollup_grains(["app_id"], "app") == ("hourly", "daily")


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
    # As Postgres sends it: a Decimal, possibly with an exponent.
    assert unpack_histogram(Decimal(12 * 10**16 + 3)) == [3, 12]
    assert unpack_histogram(Decimal("1E+32")) == [0, 0, 1]
    assert unpack_histogram(Decimal(0)) == []
    with pytest.raises(ValueError, match="negative"):
        unpack_histogram(-1)
    with pytest.raises(ValueError, match="whole number"):
        unpack_histogram(Decimal("1.5"))


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
