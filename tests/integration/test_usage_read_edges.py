"""The rollup read at its edges, against the real Postgres: a range that ends now (the
admin API's and the console's), read while the fold moves rows, with rows on every
boundary, rows written late for hours already folded, and records replaced by
higher-ranked ones (``ext_proc.usage.rollups``, schema 0007's triggers and fold).

Each answer is compared with plain SQL over the rows, written without the rollup code,
for every placement of the fold. Time is fixed: the read's ``now`` is a parameter of
the plan (``_build_query(now=...)``), nothing here depends on the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import product
from typing import Any

import asyncpg
import pytest

from ext_proc.usage.maintenance import fold
from ext_proc.usage.record import UsageRecord
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.rollups import LEVELS, _build_query, plan_parts

pytestmark = pytest.mark.integration

# The moment of the read: a Wednesday, 10:17:42.5 UTC, long before today (the rows
# land in the DEFAULT partition, which the rollups count like any other).
NOW = datetime(2025, 6, 11, 10, 17, 42, 500_000, tzinfo=UTC)
HOUR_START = NOW.replace(minute=0, second=0, microsecond=0)
NEXT_HOUR = HOUR_START + timedelta(hours=1)
SINCE = NOW - timedelta(days=1)  # the API's default range: the last 24 hours
US = timedelta(microseconds=1)

# Groupings the console asks for (totals, per hour, per app, per model, the table),
# and one per rollup level that has them.
GROUPINGS: list[list[str]] = [
    [],
    ["hour"],
    ["app_id"],
    ["model"],
    ["app_id", "model"],
    ["day", "org_id"],
    ["status_class"],
    ["key_id"],
]


def _record(request_id: str, created_at: datetime, **values: Any) -> UsageRecord:
    defaults: dict[str, Any] = {
        "org_id": "acme",
        "app_id": "bot",
        "key_id": "key-1",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "status_code": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "latency_ms": 120.0,
        "cost_usd": Decimal("0.0000045"),
        "recorded_by": "access_log",
    }
    return UsageRecord(request_id=request_id, created_at=created_at, **{**defaults, **values})


async def _write(conn: asyncpg.Connection, records: Sequence[UsageRecord]) -> None:
    """Through the writer's own statement (COPY, then INSERT ... ON CONFLICT)."""
    await UsageRecorder._copy(conn, records)


_RAW_KEYS = {
    "hour": "date_trunc('hour', created_at, 'UTC')",
    "day": "date_trunc('day', created_at, 'UTC')",
    "status_class": "((status_code / 100)::text || 'xx')",
}


async def _rows_say(
    conn: asyncpg.Connection, keys: list[str], since: datetime, until: datetime
) -> dict[tuple[Any, ...], tuple[int, int, Decimal | None]]:
    """Requests, total tokens and cost per group: plain SQL over usage_records."""
    exprs = [_RAW_KEYS.get(k, k) for k in keys]
    select = ", ".join([*exprs, "count(*)", "coalesce(sum(total_tokens), 0)", "sum(cost_usd)"])
    sql = f"SELECT {select} FROM usage_records WHERE created_at >= $1 AND created_at < $2"
    if keys:
        sql += f" GROUP BY {', '.join(str(i) for i in range(1, len(keys) + 1))}"
    rows = await conn.fetch(sql, since, until)
    n = len(keys)
    return {tuple(r[:n]): (r[n], r[n + 1], r[n + 2]) for r in rows if r[n] > 0}


async def _rollup_says(
    conn: asyncpg.Connection,
    keys: list[str],
    since: datetime,
    until: datetime,
    *,
    now: datetime,
    level: Any = None,
) -> dict[tuple[Any, ...], tuple[int, int, Decimal | None]]:
    """The same from the rollup read (rollup()'s query), planned as at ``now``."""
    sql, params = _build_query(
        keys,
        since=since,
        until=until,
        filters={"org_id": None, "app_id": None, "model": None},
        limit=100_000,
        level=level,
        now=now,
    )
    rows = await conn.fetch(sql, *params)
    return {
        tuple(r[k] for k in keys): (r["requests"], r["total_tokens"], r["cost_usd"])
        for r in rows
        if r["requests"] > 0
    }


async def _assert_exact(
    conn: asyncpg.Connection, since: datetime, until: datetime, *, now: datetime, what: str
) -> None:
    for keys in GROUPINGS:
        expected = await _rows_say(conn, keys, since, until)
        assert await _rollup_says(conn, keys, since, until, now=now) == expected, (what, keys)
        for level, (has, _) in LEVELS.items():
            if set(keys) <= has:
                answer = await _rollup_says(conn, keys, since, until, now=now, level=level)
                assert answer == expected, (what, keys, level)


# --- a range that ends now ---


def _boundary_rows() -> list[UsageRecord]:
    """A row on each side of every boundary the read of the last 24 hours has: the
    range's ends, the hours and days around them, and the rest of the current hour
    (created after ``until``: a request still running when the read was planned)."""
    moments = {
        "before-since": SINCE - US,
        "at-since": SINCE,
        "since-hour-start": SINCE.replace(minute=0, second=0, microsecond=0),
        "since-next-hour": SINCE.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1),
        "since-next-hour-less": SINCE.replace(minute=0, second=0, microsecond=0)
        + timedelta(hours=1)
        - US,
        "yesterday-end": NOW.replace(hour=0, minute=0, second=0, microsecond=0) - US,
        "today-start": NOW.replace(hour=0, minute=0, second=0, microsecond=0),
        "an-hour-ago": NOW - timedelta(hours=1),
        "hour-start": HOUR_START,
        "hour-start-less": HOUR_START - US,
        "until-less": NOW - US,
        "at-until": NOW,  # the range is half-open: not in it
        "after-until": NOW + timedelta(milliseconds=300),
        "hour-end-less": NEXT_HOUR - US,
        "next-hour": NEXT_HOUR,
    }
    return [
        _record(
            f"edge-{name}",
            moment,
            app_id=("bot", "ops")[i % 2],
            model=("gpt-4o-mini", "o3")[i % 3 % 2],
            key_id=f"key-{i % 3}",
            status_code=(200, 200, 429, 500)[i % 4],
            decision=("allowed", "allowed", "denied", "error")[i % 4],
            total_tokens=100 + i,
        )
        for i, (name, moment) in enumerate(moments.items())
    ]


async def test_a_range_ending_now_counts_every_row_in_it_whatever_the_fold_did(
    conn: asyncpg.Connection,
) -> None:
    records = _boundary_rows()
    # The read at ``until`` itself, and planned a little and a long while after it
    # (the admin API parses ``until`` before it plans; a console's range is read again
    # later by whoever checks it): the plan differs, the answer may not.
    reads = [NOW, NOW + timedelta(milliseconds=300), NOW + timedelta(hours=2)]
    # Read at ``until``, the current hour is read whole (what is pending in it too) and
    # the rows from ``until`` to its end subtracted; read later, it stops at the hour.
    pending = [
        [p for p in plan_parts(SINCE, NOW, now=now) if p.source == "pending"] for now in reads
    ]
    assert [p.until for [p] in pending] == [NEXT_HOUR, NEXT_HOUR, HOUR_START]
    # Nothing folded; everything; half of it, with the rest written after the fold.
    await _write(conn, records[::2])
    for now in reads:
        await _assert_exact(conn, SINCE, NOW, now=now, what=f"pending only, read at {now}")
    assert await conn.fetchval("SELECT usage_rollups_fold(3)") == 3  # one fold, part of it
    await _write(conn, records[1::2])
    for now in reads:
        await _assert_exact(conn, SINCE, NOW, now=now, what=f"half folded, read at {now}")
    assert await fold(conn) == len(records) - 3
    assert await conn.fetchval("SELECT count(*) FROM usage_rollup_pending") == 0
    for now in reads:
        await _assert_exact(conn, SINCE, NOW, now=now, what=f"all folded, read at {now}")
    # And what that is: every row from ``since`` (included) to ``until`` (excluded).
    [(total, _, _)] = (await _rollup_says(conn, [], SINCE, NOW, now=NOW)).values()
    inside = [r for r in records if SINCE <= r.created_at < NOW]
    assert total == len(inside) == 9


async def test_a_request_is_in_a_range_only_if_it_started_before_the_range_ends(
    conn: asyncpg.Connection,
) -> None:
    # A request that started at 10:17:42.5 is in a range that ends at the next whole
    # second, not in one that ends at the second it started in: a range ending at "now
    # floored to the second" leaves out the requests of that second.
    await _write(conn, [_record("this-second", NOW)])
    await fold(conn)
    whole_second = NOW.replace(microsecond=0)
    for until, expected in ((whole_second, 0), (whole_second + timedelta(seconds=1), 1)):
        answer = await _rollup_says(conn, ["app_id"], until - timedelta(days=1), until, now=NOW)
        assert sum(requests for requests, _, _ in answer.values()) == expected, until


# --- the fold running while others read and write ---


async def test_a_fold_is_seen_whole_or_not_at_all(
    conn: asyncpg.Connection, migrated_url: str
) -> None:
    await _write(conn, [_record(f"r-{i}", NOW - US - timedelta(minutes=7 * i)) for i in range(40)])
    folder, writer = await asyncpg.connect(migrated_url), await asyncpg.connect(migrated_url)
    try:
        # A fold not committed yet: the read sees the rows still pending (the fold's
        # DELETE is not visible), none added twice.
        fold_tx = folder.transaction()
        await fold_tx.start()
        assert await folder.fetchval("SELECT usage_rollups_fold(100000)") == 40
        await _assert_exact(conn, SINCE, NOW, now=NOW, what="fold in flight")
        # A writer's batch not committed yet: in neither the rows nor the pending changes.
        write_tx = writer.transaction()
        await write_tx.start()
        await _write(writer, [_record("late", HOUR_START + timedelta(minutes=3))])
        await _write(writer, [_record("r-0", NOW - US, recorded_by="response")])  # ranks lower
        await _assert_exact(conn, SINCE, NOW, now=NOW, what="fold and write in flight")
        await fold_tx.commit()
        await _assert_exact(conn, SINCE, NOW, now=NOW, what="fold committed, write in flight")
        # A fold that starts while that write is open leaves it for the next one.
        assert await fold(conn) == 0
        await write_tx.commit()
        await _assert_exact(conn, SINCE, NOW, now=NOW, what="write committed after the fold")
        assert await conn.fetchval("SELECT count(*) FROM usage_rollup_pending") == 1
        assert await fold(conn) == 1
        await _assert_exact(conn, SINCE, NOW, now=NOW, what="folded again")
    finally:
        await folder.close()
        await writer.close()
    [(total, _, _)] = (await _rows_say(conn, [], SINCE, NOW)).values()
    assert total == 41


async def test_rows_written_late_for_hours_already_folded_are_counted(
    conn: asyncpg.Connection,
) -> None:
    # Rows reach the table a little after their request started (batches, spool
    # replays, fallback records): their hour may have been folded already. The fold
    # keeps no watermark; what was folded and what arrives later add up.
    hours = [HOUR_START - timedelta(hours=h) for h in (0, 1, 5, 23)]
    await _write(
        conn, [_record(f"early-{i}", hour + timedelta(minutes=1)) for i, hour in enumerate(hours)]
    )
    assert await fold(conn) == len(hours)
    late = [_record(f"late-{i}", hour + timedelta(minutes=16)) for i, hour in enumerate(hours)]
    late.append(_record("late-before-since", SINCE - timedelta(minutes=1)))
    late.append(_record("late-since-hour", SINCE + timedelta(seconds=1)))
    await _write(conn, late)
    await _assert_exact(conn, SINCE, NOW, now=NOW, what="late rows pending")
    assert await fold(conn) == len(late)
    await _assert_exact(conn, SINCE, NOW, now=NOW, what="late rows folded")
    [(total, _, _)] = (await _rows_say(conn, [], SINCE, NOW)).values()
    assert total == 2 * len(hours) + 1


# --- a record replaced by a higher-ranked one ---


@pytest.mark.parametrize(
    "fold_after",
    [pytest.param(p, id="-".join(map(str, p))) for p in product((False, True), repeat=3)],
)
async def test_a_replaced_record_counts_once_with_the_kept_values(
    conn: asyncpg.Connection, fold_after: tuple[bool, bool, bool]
) -> None:
    """The usage-log fallback's row, replaced by the owner's record (an UPDATE by the
    writer's upsert, in a batch that also inserts), then a lower-ranked record that
    changes nothing; a fold after each step or not."""
    started = NOW - timedelta(seconds=3)
    fallback = _record(
        "req-1",
        started,
        recorded_by="access_log_fallback",
        status_code=502,
        decision="error",
        completion_tokens=0,
        total_tokens=10,
        tokens_estimated=True,
        cost_usd=Decimal("0.0000030"),
    )
    owner = replace(fallback, recorded_by="access_log", status_code=200, decision="allowed")
    owner = replace(owner, completion_tokens=5, total_tokens=15, tokens_estimated=False)
    owner = replace(owner, cost_usd=Decimal("0.0000045"), key_id="key-2")
    steps: list[list[UsageRecord]] = [
        [fallback],
        [owner, _record("req-2", started + timedelta(milliseconds=1))],
        [replace(fallback, recorded_by="response", total_tokens=1)],
    ]
    for step, (batch, folded) in enumerate(zip(steps, fold_after, strict=True)):
        await _write(conn, batch)
        if folded:
            await fold(conn)
        await _assert_exact(conn, SINCE, NOW, now=NOW, what=f"step {step}, folded {folded}")
    kept = await conn.fetchrow(
        "SELECT recorded_by, status_code, total_tokens FROM usage_records "
        "WHERE request_id = 'req-1'"
    )
    assert tuple(kept) == ("access_log", 200, 15)
    by_status = await _rollup_says(conn, ["status_class"], SINCE, NOW, now=NOW)
    assert by_status == {("2xx",): (2, 30, Decimal("0.0000090000"))}
