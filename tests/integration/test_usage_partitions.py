"""usage_records partitioned by day, its rollups, and its retention, against the real
Postgres (migration 0007, ``ext_proc.usage.maintenance``, ``ext_proc.usage.rollups``).

What a user relies on: no row is lost converting a filled table; a request is still one
row, the best-ranked record of it; the rollups answer exactly what the rows add up to,
whatever arrived late, was replaced or was deleted; days are created ahead and dropped
only when asked.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ext_proc.metrics import Metrics
from ext_proc.stores.postgres import SCHEMA_DIR, create_pool, migrate
from ext_proc.usage.cli import add_usage_arguments, run_usage
from ext_proc.usage.maintenance import (
    MaintenancePolicy,
    ensure_partitions,
    fold,
    list_partitions,
    maintain,
    prune,
)
from ext_proc.usage.record import UsageRecord
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.rollups import (
    LEVELS,
    Part,
    RollupRow,
    _build_query,
    histogram_percentile,
    latency_bucket,
    rollup,
    unpack_histogram,
)
from ext_proc.usage.spool import Spool
from tests.conftest import poll_async

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
TODAY = NOW.date()
T0 = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)  # a Monday 09:00 UTC, long before today

# Synthetic rows: $1 first number, $2 count, $3 start, $4 spread. Every column the rollups
# read takes NULLs and odd values somewhere: no org, no status, no latency, NaN and
# infinite latencies, sub-millisecond and 20-minute ones, no price.
_GENERATE = """
INSERT INTO usage_records (
    request_id, created_at, org_id, app_id, key_id, environment, model, provider,
    deployment, status_code, decision, prompt_tokens, completion_tokens, total_tokens,
    tokens_estimated, latency_ms, cached_tokens, cache_creation_tokens, reasoning_tokens,
    recorded_by, cost_usd)
SELECT 'gen-' || n, $3::timestamptz + (n % 997) * $4::interval / 997,
       CASE WHEN n % 23 = 0 THEN NULL ELSE 'org-' || (n % 3) END,
       'app-' || (n % 7), 'key-' || (n % 29), (ARRAY['prod', 'dev', NULL])[1 + n % 3],
       (ARRAY['gpt-4o-mini', 'gpt-4.1', 'o3', NULL])[1 + n % 4], 'prov-' || (n % 2),
       'dep-' || (n % 5),
       CASE WHEN n % 31 = 0 THEN NULL ELSE (ARRAY[200, 200, 200, 429, 500, 499])[1 + n % 6] END,
       (ARRAY['allowed', 'allowed', 'allowed', 'denied', 'error', 'error'])[1 + n % 6],
       CASE WHEN n % 6 = 3 THEN NULL ELSE (n * 7) % 3000 END,
       CASE WHEN n % 6 = 3 THEN NULL ELSE (n * 13) % 900 END,
       CASE WHEN n % 6 = 3 THEN NULL ELSE (n * 7) % 3000 + (n * 13) % 900 END,
       n % 11 = 0,
       CASE WHEN n % 17 = 0 THEN NULL
            WHEN n % 1009 = 0 THEN 'NaN'::float8
            WHEN n % 1013 = 0 THEN 'Infinity'::float8
            WHEN n % 19 = 0 THEN 0.25
            WHEN n % 503 = 0 THEN 1.2e6
            ELSE exp(2 + (n % 101) / 15.0) + (n % 7) / 3.0 END,
       CASE WHEN n % 5 = 0 THEN (n * 7) % 3000 / 2 END,
       CASE WHEN n % 13 = 0 THEN 64 END,
       CASE WHEN n % 4 = 2 THEN (n * 13) % 900 / 3 END,
       'response',
       CASE WHEN n % 4 = 3 THEN NULL ELSE ((n % 1000) * 0.0000001234)::numeric(20, 10) END
FROM generate_series($1::bigint, $1::bigint + $2 - 1) n
"""

# Every level of the rollups answers some of these (the first four: all three).
GROUPINGS = [
    [],
    ["org_id"],
    ["hour"],
    ["day", "org_id"],
    ["org_id", "model"],
    ["app_id"],
    ["hour", "provider"],
    ["key_id", "environment"],
    ["provider", "deployment", "decision"],
    ["status_class"],
    ["day", "key_id"],
]


# Groupings with filters (rollup()'s keyword arguments): each level answers one.
FILTERED: list[tuple[list[str], dict[str, Any]]] = [
    (["hour"], {"org_id": "org-1"}),
    (["day", "model"], {"org_id": "org-2", "app_id": "app-3"}),
    (["key_id"], {"model": "gpt-4.1"}),
    (["app_id"], {"model": "o3"}),
]


def _old_schema(tmp_path: Path) -> Path:
    """The repository's migrations before 0007: the unpartitioned table."""
    folder = tmp_path / "schema-0006"
    folder.mkdir()
    for path in SCHEMA_DIR.glob("*.sql"):
        if int(path.name[:4]) < 7:
            shutil.copy(path, folder / path.name)
    return folder


_MEASURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cost_usd",
    "estimated_rows",
    "errors",
    "denied",
    "avg_latency_ms",
)


async def _answer(
    conn: asyncpg.Connection,
    keys: list[str],
    since: datetime | None,
    until: datetime | None,
    filters: dict[str, str | None] | None = None,
    **how: Any,
) -> list[RollupRow]:
    """rollup()'s answer, read as ``how`` says (``_build_query``'s parts, level)."""
    sql, params = _build_query(
        keys,
        since=since,
        until=until,
        filters={"org_id": None, "app_id": None, "model": None, **(filters or {})},
        limit=100_000,
        **how,
    )
    rows = await conn.fetch(sql, *params)
    return [
        RollupRow(
            keys={k: row[k] for k in keys},
            **{m: row[m] for m in _MEASURES},
            p95_latency_ms=histogram_percentile(unpack_histogram(row["latency_histogram"])),
        )
        for row in rows
        if not keys or row["requests"] > 0
    ]


async def _raw_answer(
    conn: asyncpg.Connection,
    keys: list[str],
    since: datetime | None,
    until: datetime | None,
    filters: dict[str, str | None] | None = None,
) -> list[RollupRow]:
    """What the rows alone add up to: the same query with every part read from the rows."""
    return await _answer(conn, keys, since, until, filters, parts=[Part("raw", since, until)])


async def _assert_rollups_exact(
    conn: asyncpg.Connection, ranges: list[tuple[datetime | None, datetime | None]]
) -> int:
    """Every grouping over every range: rollup()'s answer, and that of every level of
    the rollups that has the grouping's keys, equals the rows' own."""
    compared = 0
    for since, until in ranges:
        for keys in GROUPINGS:
            slow = await _raw_answer(conn, keys, since, until)
            fast = await rollup(conn, group_by=keys, since=since, until=until, limit=100_000)
            assert fast == slow, (keys, since, until)
            for level, (has, _) in LEVELS.items():
                if set(keys) <= has:
                    answer = await _answer(conn, keys, since, until, level=level)
                    assert answer == slow, (keys, level, since, until)
            compared += len(fast)
        for keys, filters in FILTERED:
            slow = await _raw_answer(conn, keys, since, until, filters)
            fast = await rollup(
                conn, group_by=keys, since=since, until=until, limit=100_000, **filters
            )
            assert fast == slow, (keys, filters, since, until)
            compared += len(fast)
    return compared


async def _legacy_totals(conn: asyncpg.Connection) -> dict[Any, tuple[Any, ...]]:
    """Per org: plain SQL over the rows, written independently of the rollup code."""
    rows = await conn.fetch(
        "SELECT org_id, count(*), coalesce(sum(total_tokens), 0), sum(cost_usd), "
        "count(*) FILTER (WHERE decision = 'error') FROM usage_records GROUP BY org_id"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


# --- migration of a filled table ---


async def _snapshot(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every row, every value (NaN made comparable)."""
    rows = await conn.fetch("SELECT * FROM usage_records ORDER BY request_id")
    return [
        {k: "NaN" if isinstance(v, float) and v != v else v for k, v in row.items()} for row in rows
    ]


async def test_migration_converts_a_filled_table_without_losing_a_row(
    database_url: str, tmp_path: Path
) -> None:
    assert await migrate(database_url, _old_schema(tmp_path)) == [
        p.name for p in sorted(SCHEMA_DIR.glob("*.sql")) if int(p.name[:4]) < 7
    ]
    conn = await asyncpg.connect(database_url)
    try:
        assert (
            await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE relname = 'usage_records'"
            )
            == "r"
        )
        await conn.execute(_GENERATE, 1, 3000, T0, timedelta(days=3))
        await conn.execute(_GENERATE, 5000, 50, NOW - timedelta(minutes=30), timedelta(minutes=20))
        await conn.execute(
            "INSERT INTO usage_records (request_id, created_at, policy_violations) "
            "VALUES ('far-past', '2019-01-01 00:00+00', '{a,b}'), "
            "('far-future', now() + interval '400 days', NULL)"
        )
        before = await _snapshot(conn)
    finally:
        await conn.close()

    assert await migrate(database_url) == [
        p.name for p in sorted(SCHEMA_DIR.glob("*.sql")) if int(p.name[:4]) >= 7
    ]

    conn = await asyncpg.connect(database_url)
    try:
        assert (
            await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE relname = 'usage_records'"
            )
            == "p"
        )
        after = await _snapshot(conn)
        assert after == before  # every row, every value
        # Each day with rows has its own partition; nothing waits in DEFAULT.
        assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 0
        days = {p.since.date() for p in await list_partitions(conn) if p.since is not None}
        assert {date(2019, 1, 1), T0.date(), TODAY} <= days
        # The rollups count them (folded by the migration: nothing pending).
        assert await conn.fetchval("SELECT count(*) FROM usage_rollup_pending") == 0
        assert await conn.fetchval("SELECT sum(requests) FROM usage_rollup_daily") == len(before)
        await _assert_rollups_exact(conn, [(None, None), (T0 + timedelta(minutes=7), NOW)])
    finally:
        await conn.close()

    # The writer works on the converted table: new rows, and a record ranked above one
    # written before the migration replaces it.
    pool = await create_pool(database_url)
    recorder = UsageRecorder(pool, Metrics(), Spool(tmp_path / "spool"), maintenance=None)
    await recorder.start()
    try:
        old = after[0]
        recorder.submit(
            UsageRecord(
                request_id=old["request_id"],
                created_at=old["created_at"],
                org_id="replaced",
                recorded_by="access_log",  # ranks above the generated rows ("response")
            )
        )
        for i in range(10):
            recorder.submit(UsageRecord(request_id=f"after-{i}", org_id="new", latency_ms=5.0))
        await recorder.flush()
        rows = await pool.fetch(
            "SELECT org_id FROM usage_records WHERE org_id IN ('replaced', 'new')"
        )
        assert sorted(r["org_id"] for r in rows) == ["new"] * 10 + ["replaced"]
        assert await pool.fetchval("SELECT count(*) FROM usage_records") == len(before) + 10
        async with pool.acquire() as c:
            await _assert_rollups_exact(c, [(None, None)])
    finally:
        await recorder.close()
        await pool.close()


# --- one row per request ---


async def test_records_of_one_request_meet_in_one_partition_and_are_ranked(
    migrated_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    pool = await create_pool(migrated_url)
    recorder = UsageRecorder(pool, Metrics(), Spool(tmp_path / "spool"), maintenance=None)
    await recorder.start()
    started = NOW - timedelta(minutes=5)  # facts.started: the same for every recorder
    await ensure_partitions(conn, today=started.date(), days_ahead=1)
    base = UsageRecord(
        request_id="r-1",
        created_at=started,
        org_id="acme",
        app_id="bot",
        model="gpt-4o-mini",
        status_code=200,
        prompt_tokens=10,
        completion_tokens=0,
        total_tokens=10,
        tokens_estimated=True,
        latency_ms=900.0,
        cost_usd=Decimal("0.001"),
    )
    try:
        # The fallback rebuilt from Envoy's log lands first, estimated and cut short...
        recorder.submit(replace(base, recorded_by="access_log_fallback", status_code=502))
        await recorder.flush()
        # ...then the owner's exact record replaces it, and a late fallback changes nothing.
        exact = replace(
            base,
            recorded_by="access_log",
            completion_tokens=20,
            total_tokens=30,
            tokens_estimated=False,
            cost_usd=Decimal("0.003"),
        )
        recorder.submit(exact)
        recorder.submit(replace(base, request_id="r-2", recorded_by="response"))
        await recorder.flush()
        recorder.submit(replace(base, recorded_by="access_log_fallback", prompt_tokens=1))
        recorder.submit(replace(base, recorded_by="request", prompt_tokens=2))  # ranks lower
        await recorder.flush()
    finally:
        await recorder.close()
        await pool.close()

    rows = await conn.fetch(
        "SELECT request_id, recorded_by, total_tokens, status_code, "
        "tableoid::regclass::text AS part FROM usage_records ORDER BY 1"
    )
    assert [
        (r["request_id"], r["recorded_by"], r["total_tokens"], r["status_code"]) for r in rows
    ] == [
        ("r-1", "access_log", 30, 200),
        ("r-2", "response", 10, 200),
    ]
    assert rows[0]["part"] == f"usage_records_p{started:%Y%m%d}"
    # Counted once, with the kept record's values, before and after the fold.
    for folded in (False, True):
        if folded:
            assert await fold(conn) > 0
        [by_status] = await rollup(
            conn, group_by=["status_class"], since=started - timedelta(hours=1)
        )
        assert (by_status.keys, by_status.requests, by_status.total_tokens) == (
            {"status_class": "2xx"},
            2,
            40,
        )
        assert by_status.cost_usd == Decimal("0.004") and by_status.estimated_rows == 1


# --- the rollups are exact ---


async def test_rollups_equal_what_the_rows_add_up_to(conn: asyncpg.Connection) -> None:
    # 20,000 rows over three days, half of them folded into the rollups, half pending,
    # and 3,000 over five weeks around them (weeks start on Monday; T0 is one).
    await conn.execute(_GENERATE, 1, 10_000, T0, timedelta(days=3))
    await conn.execute(_GENERATE, 40_001, 3_000, T0 - timedelta(days=20), timedelta(days=35))
    assert await fold(conn, max_rows=3_000) == 13_000
    await conn.execute(_GENERATE, 10_001, 10_000, T0 + timedelta(minutes=13), timedelta(days=3))
    # Replaced by higher-ranked records that move them to other groups (the writer's own
    # statement), deleted, and rows arriving late for a day already folded.
    staged = await conn.fetch(
        "SELECT * FROM usage_records WHERE request_id LIKE 'gen-1_' OR request_id LIKE 'gen-2__'"
    )
    replacements = [
        UsageRecord(
            **{
                **dict(r),
                "org_id": "moved",
                "status_code": 503,
                "latency_ms": 1.5,
                "recorded_by": "access_log",
                "cost_usd": None,
            }
        )
        for r in staged
    ]
    await UsageRecorder._copy(conn, replacements)
    await conn.execute("DELETE FROM usage_records WHERE request_id LIKE 'gen-3__'")
    await fold(conn, max_rows=500)
    await conn.execute(_GENERATE, 30_001, 300, T0 - timedelta(days=1), timedelta(hours=30))

    assert await conn.fetchval("SELECT count(*) FROM usage_rollup_pending") > 0
    ranges: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (
            T0 + timedelta(hours=5, minutes=17, seconds=3),
            T0 + timedelta(days=2, hours=1, minutes=9),
        ),
        (T0 + timedelta(hours=6), T0 + timedelta(hours=7)),  # one whole hour
        (T0 + timedelta(hours=6, minutes=5), T0 + timedelta(hours=6, minutes=50)),  # inside one
        (T0 - timedelta(days=1), T0 + timedelta(days=1)),  # the late rows, whole days
        (None, T0 + timedelta(days=1, minutes=30)),
        (T0 + timedelta(hours=30, seconds=1), None),
        # weeks, less or plus days, hours and rows at either end
        (T0 - timedelta(days=17, hours=5, minutes=19), T0 + timedelta(days=2, hours=1, minutes=9)),
        (T0 - timedelta(days=19), T0 + timedelta(days=12)),
        (None, T0 + timedelta(days=9, hours=7, seconds=5)),
    ]
    compared = await _assert_rollups_exact(conn, ranges)
    assert compared > 1000
    # Once more with nothing pending, and against SQL written without the rollup code.
    assert await fold(conn) > 0
    await _assert_rollups_exact(conn, ranges[:2])
    by_org = {
        r.keys["org_id"]: (r.requests, r.total_tokens, r.cost_usd, r.errors)
        for r in await rollup(conn, group_by=["org_id"])
    }
    assert by_org == await _legacy_totals(conn)
    assert by_org["moved"][0] == len(replacements)


async def test_p95_comes_from_the_latency_histogram(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        "INSERT INTO usage_records (request_id, created_at, app_id, latency_ms) "
        "VALUES ($1, $2, 'a', $3)",
        [(f"l-{i}", T0 + timedelta(seconds=i), float(i)) for i in range(1, 1001)],
    )
    await fold(conn)
    [row] = await rollup(conn, group_by=["app_id"])
    exact = 950.05  # percentile_cont(0.95) of 1..1000
    assert row.p95_latency_ms is not None
    assert abs(row.p95_latency_ms - exact) / exact < 2**0.25 - 1  # within one bucket's width
    assert row.avg_latency_ms == 500.5  # exact
    # Python and SQL put a latency in the same bucket, at the edges too.
    samples = [0.0, 0.5, 1.0, 1.5, 2.0, 2**0.25, 2**0.75, 100.0, 2.0**20, 1e9, 33.333]
    buckets = await conn.fetch(
        "SELECT x, usage_latency_bucket(x) AS b FROM unnest($1::float8[]) x", samples
    )
    assert [r["b"] for r in buckets] == [latency_bucket(x) for x in samples]


async def test_truncate_clears_the_rollups(conn: asyncpg.Connection) -> None:
    await conn.execute(_GENERATE, 1, 500, T0, timedelta(hours=5))
    await fold(conn, max_rows=200)
    await conn.execute(_GENERATE, 501, 10, T0, timedelta(hours=5))
    await conn.execute("TRUNCATE usage_records")
    [total] = await rollup(conn, group_by=[])
    assert total.requests == 0
    tables = [r["name"] for r in await conn.fetch("SELECT name FROM usage_rollup_tables()")]
    for table in [*tables, "usage_rollup_pending"]:
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_rows_written_around_the_triggers_are_counted_by_a_rebuild(
    conn: asyncpg.Connection,
) -> None:
    # Three weeks of rows through the triggers, folded; then a Wednesday's partition
    # filled straight (as a bulk load would: no trigger fires), which the rollups miss
    # until usage_rollups_rebuild recomputes that day, and the week it is in.
    await conn.execute(_GENERATE, 1, 6_000, T0 - timedelta(days=7), timedelta(days=21))
    wednesday = (T0 + timedelta(days=2)).date()
    await ensure_partitions(conn, today=wednesday, days_ahead=0)
    await conn.execute(
        _GENERATE.replace(
            "INSERT INTO usage_records (", f"INSERT INTO usage_records_p{wednesday:%Y%m%d} (", 1
        ),
        10_001,
        700,
        T0 + timedelta(days=1, hours=16),
        timedelta(hours=20),
    )
    assert await fold(conn) == 6_000
    ranges: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (T0 - timedelta(days=3, hours=2, minutes=7), T0 + timedelta(days=9, minutes=41)),
    ]
    [total] = await rollup(conn, group_by=[])
    assert total.requests == 6_000  # the straight rows are not counted yet

    day_start = datetime(wednesday.year, wednesday.month, wednesday.day, tzinfo=UTC)
    counted = await conn.fetchval(
        "SELECT usage_rollups_rebuild($1, $2)",
        day_start + timedelta(hours=3),
        day_start + timedelta(hours=5),
    )
    rows_that_day = await conn.fetchval(
        "SELECT count(*) FROM usage_records WHERE created_at >= $1 AND created_at < $2",
        day_start,
        day_start + timedelta(days=1),
    )
    assert counted == rows_that_day  # the whole UTC day, not just 03:00-05:00
    [total] = await rollup(conn, group_by=[])
    assert total.requests == 6_700
    await _assert_rollups_exact(conn, ranges)
    # A week summed again from its days equals the week the fold had kept.
    weeks = await conn.fetch(
        "SELECT bucket, sum(requests) AS n FROM usage_rollup_weekly GROUP BY 1 ORDER BY 1"
    )
    assert sum(w["n"] for w in weeks) == 6_700 and len(weeks) == 4


async def test_the_levels_the_code_reads_are_the_tables_the_schema_keeps(
    conn: asyncpg.Connection,
) -> None:
    tables = await conn.fetch("SELECT name, level, grain, group_columns FROM usage_rollup_tables()")
    grains = {"hour": "hourly", "day": "daily", "week": "weekly"}
    assert {(t["level"], grains[t["grain"]]) for t in tables} == {
        (level, grain) for level, (_, has) in LEVELS.items() for grain in has
    }
    for t in tables:
        keys = LEVELS[t["level"]][0] - {"hour", "day", "status_class"}
        columns = set(t["group_columns"]) - {"status_class"}
        assert columns == keys, t["name"]
        actual = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
            t["name"],
        )
        assert set(t["group_columns"]) <= {c["column_name"] for c in actual}


# --- partitions ahead, the DEFAULT partition, retention ---


async def test_days_are_created_ahead_and_rows_in_default_move_to_their_day(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(_GENERATE, 1, 400, T0, timedelta(days=2))  # no partition: DEFAULT
    assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 400
    totals = await rollup(conn, group_by=["day", "org_id"])

    created = await ensure_partitions(conn, today=TODAY, days_ahead=7)
    expected = {f"usage_records_p{TODAY + timedelta(days=n):%Y%m%d}" for n in range(8)}
    expected |= {f"usage_records_p{T0 + timedelta(days=n):%Y%m%d}" for n in range(2)}
    names = {p.name for p in await list_partitions(conn)}
    assert expected <= names and set(created) <= expected
    assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 0
    assert await conn.fetchval(
        f"SELECT count(*) FROM usage_records_p{T0:%Y%m%d}"
    ) == await conn.fetchval(
        "SELECT count(*) FROM usage_records WHERE (created_at AT TIME ZONE 'UTC')::date = $1",
        T0.date(),
    )
    assert await rollup(conn, group_by=["day", "org_id"]) == totals  # a move, not a change
    assert await ensure_partitions(conn, today=TODAY, days_ahead=7) == []  # idempotent


async def test_replicas_maintaining_at_once_create_each_day_once(migrated_url: str) -> None:
    pools = [await create_pool(migrated_url) for _ in range(3)]
    try:
        policy = MaintenancePolicy(days_ahead=20)
        reports = await asyncio.gather(*(maintain(p, policy) for p in pools))
        created = [name for r in reports if r is not None for name in r.created]
        assert len(created) == len(set(created))  # nobody created a day twice
        # Whoever was turned away leaves the rest to the next run; after one, all exist.
        await maintain(pools[0], policy)
        async with pools[0].acquire() as conn:
            names = {p.name for p in await list_partitions(conn)}
        assert {f"usage_records_p{TODAY + timedelta(days=n):%Y%m%d}" for n in range(21)} <= names
    finally:
        for p in pools:
            await p.close()


async def _waiting_for_a_lock(conn: asyncpg.Connection, pid: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", pid
        )
    )


# What readers ask while a day moves out of DEFAULT: every row, the day's rows, one row.
_READS = [
    ("SELECT count(*) FROM usage_records", ()),
    (
        "SELECT count(*) FROM usage_records WHERE created_at >= $1 AND created_at < $2",
        (T0, T0 + timedelta(days=1)),
    ),
    ("SELECT count(*) FROM usage_records WHERE request_id = 'gen-7'", ()),
]


# The reader plans its query while it waits (what went wrong under 0007: it planned
# with the partitions of before the move), or runs a plan it cached before.
@pytest.mark.parametrize("cached", [False, True], ids=["planned", "cached"])
@pytest.mark.parametrize(("query", "args"), _READS)
async def test_a_reader_waiting_on_a_move_out_of_default_sees_every_row(
    migrated_url: str, conn: asyncpg.Connection, query: str, args: tuple[Any, ...], cached: bool
) -> None:
    await conn.execute(_GENERATE, 1, 300, T0, timedelta(hours=20))  # one day, in DEFAULT
    expected = await conn.fetchval(query, *args)
    assert expected > 0
    mover = await asyncpg.connect(migrated_url)
    reader = await asyncpg.connect(migrated_url)
    try:
        if cached:
            await reader.execute("SET plan_cache_mode = force_generic_plan")
            assert await reader.fetchval(query, *args) == expected
        move = mover.transaction()
        await move.start()
        assert await mover.fetchval("SELECT usage_records_create_partition($1)", T0.date())
        # The move is done but not committed: a reader now queues behind its locks.
        read = asyncio.create_task(reader.fetchval(query, *args))
        waiting = await poll_async(
            lambda: _waiting_for_a_lock(conn, reader.get_server_pid()), timeout=10
        )
        assert waiting and not read.done()
        await move.commit()
        assert await asyncio.wait_for(read, 10) == expected
    finally:
        await reader.close()
        await mover.close()
    assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 0


async def test_creating_an_empty_day_does_not_lock_out_readers_of_other_days(
    migrated_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(_GENERATE, 1, 50, T0, timedelta(hours=1))  # T0's day, in DEFAULT
    day = TODAY + timedelta(days=30)
    assert day.strftime("usage_records_p%Y%m%d") not in {
        p.name for p in await list_partitions(conn)
    }
    mover = await asyncpg.connect(migrated_url)
    try:
        async with mover.transaction():
            assert await mover.fetchval("SELECT usage_records_create_partition($1)", day)
            # Held open: the table itself stays readable and writable meanwhile (only
            # the DEFAULT partition is locked, for ATTACH's check that it has no row of
            # the day).
            today = datetime(TODAY.year, TODAY.month, TODAY.day, 1, tzinfo=UTC)
            await asyncio.wait_for(conn.execute(_GENERATE, 1000, 10, today, timedelta(0)), 10)
            read = conn.fetchval(
                "SELECT count(*) FROM usage_records WHERE created_at >= $1 AND created_at < $2",
                today,
                today + timedelta(hours=1),
            )
            assert await asyncio.wait_for(read, 10) == 10
            table_locks = await mover.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                "AND mode = 'AccessExclusiveLock' AND relation = 'usage_records'::regclass"
            )
            assert table_locks == 0
    finally:
        await mover.close()
    assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 50


async def test_a_row_reaching_default_while_its_day_is_created_is_moved_on_retry(
    migrated_url: str, conn: asyncpg.Connection
) -> None:
    day = T0.date()
    writer = await asyncpg.connect(migrated_url)
    mover = await asyncpg.connect(migrated_url)
    try:
        # A writer's row of the day, not committed yet: the mover finds DEFAULT empty of
        # the day, skips the table's lock, then waits for the partition's.
        write = writer.transaction()
        await write.start()
        await writer.execute(_GENERATE, 1, 5, T0, timedelta(minutes=1))
        create = asyncio.create_task(ensure_partitions(mover, today=day, days_ahead=0))
        waiting = await poll_async(
            lambda: _waiting_for_a_lock(conn, mover.get_server_pid()), timeout=10
        )
        assert waiting and not create.done()
        await write.commit()
        # The first attempt refuses (serialization_failure); the retry moves the rows.
        assert await asyncio.wait_for(create, 10) == [f"usage_records_p{day:%Y%m%d}"]
    finally:
        await mover.close()
        await writer.close()
    assert await conn.fetchval("SELECT count(*) FROM usage_records_default") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM usage_records_p{day:%Y%m%d}") == 5
    with pytest.raises(asyncpg.SerializationError):
        # The same race, by hand (no retry): the refusal itself.
        await _refused_creation(migrated_url, conn, day + timedelta(days=1))


async def _refused_creation(url: str, conn: asyncpg.Connection, day: date) -> None:
    writer = await asyncpg.connect(url)
    mover = await asyncpg.connect(url)
    try:
        async with writer.transaction():
            start = datetime(day.year, day.month, day.day, 9, tzinfo=UTC)
            await writer.execute(_GENERATE, 100, 5, start, timedelta(minutes=1))
            create = asyncio.create_task(
                mover.fetchval("SELECT usage_records_create_partition($1)", day)
            )
            assert await poll_async(
                lambda: _waiting_for_a_lock(conn, mover.get_server_pid()), timeout=10
            )
        await asyncio.wait_for(create, 10)
    finally:
        await mover.close()
        await writer.close()


def _at_ten(days_ago: int) -> datetime:
    """10:00 UTC that many days ago: an hour of rows there stays within one day."""
    day = (NOW - timedelta(days=days_ago)).date()
    return datetime(day.year, day.month, day.day, 10, tzinfo=UTC)


async def _days(conn: asyncpg.Connection, table: str = "usage_records") -> list[date]:
    rows = await conn.fetch(
        f"SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS d FROM {table} ORDER BY 1"
    )
    return [r["d"] for r in rows]


async def test_prune_drops_only_whole_old_days_and_the_rollups_keep_them(
    conn: asyncpg.Connection,
) -> None:
    for days_ago, first in ((40, 1), (10, 1001), (0, 2001)):
        start = _at_ten(days_ago) if days_ago else NOW - timedelta(hours=1)
        await conn.execute(_GENERATE, first, 300, start, timedelta(minutes=50))
    await ensure_partitions(conn, today=TODAY, days_ahead=1)  # the old days leave DEFAULT
    await fold(conn)
    before = await rollup(conn, group_by=["day"])
    old_day = _at_ten(40).date()

    dry = await prune(conn, before=NOW - timedelta(days=30), dry_run=True)
    assert [p.name for p in dry.partitions] == [f"usage_records_p{old_day:%Y%m%d}"]
    assert dry.partitions[0].since == _at_ten(40).replace(hour=0)
    assert await conn.fetchval("SELECT count(*) FROM usage_records") == 900  # untouched

    report = await prune(conn, before=NOW - timedelta(days=30))
    assert [p.name for p in report.partitions] == [p.name for p in dry.partitions]
    assert old_day not in await _days(conn)
    assert await conn.fetchval("SELECT count(*) FROM usage_records") == 600
    # The dropped day still counts in the rollups' answer (whole hours).
    assert await rollup(conn, group_by=["day"]) == before

    # Rollups are pruned only when asked, and only periods that ended before the cutoff.
    report = await prune(
        conn, before=NOW - timedelta(days=30), rollups_before=NOW - timedelta(days=30)
    )
    assert report.partitions == [] and report.hourly_rows > 0 and report.daily_rows > 0
    assert report.weekly_rows > 0  # the week 40 days ago ended before the cutoff
    days = [r.keys["day"].date() for r in await rollup(conn, group_by=["day"])]
    assert days == await _days(conn)


def _prune_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ext-proc usage")
    add_usage_arguments(parser)
    return parser.parse_args(["prune", *argv])


async def test_usage_prune_command(
    migrated_url: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await conn.execute(_GENERATE, 1, 200, _at_ten(100), timedelta(hours=1))
    await conn.execute(_GENERATE, 201, 20, NOW - timedelta(hours=1), timedelta(minutes=30))
    day = f"usage_records_p{_at_ten(100):%Y%m%d}"

    # Nothing is dropped unless an age is given (flag or EXT_PROC_USAGE_RETENTION).
    assert await asyncio.to_thread(run_usage, _prune_args(), migrated_url) == 2
    assert "usage is kept forever" in capsys.readouterr().err
    assert (
        await asyncio.to_thread(
            run_usage,
            _prune_args("--older-than", "90d", "--rollups-older-than", "30d"),
            migrated_url,
        )
        == 2
    )
    assert "must not be shorter" in capsys.readouterr().err

    assert (
        await asyncio.to_thread(
            run_usage, _prune_args("--older-than", "90d", "--dry-run"), migrated_url
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "older than 90d" in out and "200 rows of those days were in usage_records_default" in out
    assert await conn.fetchval("SELECT count(*) FROM usage_records") == 220

    code = await asyncio.to_thread(
        run_usage, _prune_args(), migrated_url, retention=timedelta(days=90)
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"dropped {day}" in out and "dropped 1 partition(s)" in out
    assert await conn.fetchval("SELECT count(*) FROM usage_records") == 20


# --- the writer keeps it all going ---


async def test_the_writer_keeps_days_ahead_and_folds(migrated_url: str, tmp_path: Path) -> None:
    pool = await create_pool(migrated_url)
    recorder = UsageRecorder(
        pool,
        Metrics(),
        Spool(tmp_path / "spool"),
        maintenance=MaintenancePolicy(fold_interval=0.05),
    )
    await recorder.start()
    try:
        for i in range(50):
            recorder.submit(UsageRecord(request_id=f"w-{i}", app_id="bot", total_tokens=i))
        await recorder.flush()

        async def settled() -> bool:
            async with pool.acquire() as conn:
                names = {p.name for p in await list_partitions(conn)}
            pending = await pool.fetchval("SELECT count(*) FROM usage_rollup_pending")
            return pending == 0 and f"usage_records_p{TODAY + timedelta(days=7):%Y%m%d}" in names

        assert await poll_async(settled, timeout=15.0)
        assert await pool.fetchval("SELECT sum(total_tokens) FROM usage_rollup_daily") == sum(
            range(50)
        )
    finally:
        await recorder.close()
        await pool.close()
