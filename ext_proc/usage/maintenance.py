"""Keeping usage data in shape: partitions ahead, retention, rollup folds.

``usage_records`` is partitioned by UTC day (``schema/0007_usage_partitions.sql``):
``usage_records_pYYYYMMDD`` partitions and a DEFAULT partition that takes the rows of a
day that has none, so no row is ever refused. ``maintain`` (the usage writer runs it at
start and every hour) creates the next ``days_ahead`` days and moves any day found in
the DEFAULT partition into a partition of its own; with a retention set it drops the
partitions whose whole day is older than the retention, and the rollup rows older than
the rollup retention. ``ext-proc usage prune`` does the dropping on demand.

``fold`` (the usage writer runs it every few seconds) moves the changes waiting in
``usage_rollup_pending`` into the hourly and daily rollups (all three levels of them:
per org, per app and model, and in full detail). Readers add what is still pending, so
the fold's pace changes how fast queries are, never what they answer.

Several processes may run this at once: each change is one transaction holding an
advisory lock, taken without waiting (whoever does not get it leaves the work to the
one that did), and with a short ``lock_timeout``, so a long query on ``usage_records``
delays a change instead of making writers queue behind it. Creating a partition only
locks out other DDL and readers of the DEFAULT partition (it is attached, not created
in place); moving a day's rows out of DEFAULT, and dropping a partition, take the
table's exclusive lock for a moment (a reader waiting for a move must not plan with the
partitions of before it: it would miss the rows moved, see
``schema/0008_partition_move_locks_table.sql``).

Dropping partitions never touches the rollups (the triggers see no DELETE): usage
totals of dropped days stay available from the hourly and daily rollups until the
rollup retention removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key of partition changes ("usage_pt" as a big-endian int).
_LOCK_KEY = int.from_bytes(b"usage_pt", "big")
# How long a change waits for a table lock before giving up until the next run.
LOCK_TIMEOUT = "2s"
DAYS_AHEAD = 7
MAINTENANCE_INTERVAL = 3600.0  # seconds between two partition runs in the server
FOLD_INTERVAL = 5.0  # seconds between two folds in the server
FOLD_ROWS = 100_000  # pending rows one fold statement takes at most
# Tries at one day's partition: a second one follows a serialization_failure (rows of
# the day arriving mid-creation), which cannot recur once the rows are there.
_CREATE_ATTEMPTS = 3


class PartitionBusy(RuntimeError):
    """Another process holds the partition lock: it is doing this work now."""


@dataclass(frozen=True, slots=True)
class MaintenancePolicy:
    """What the server keeps doing to ``usage_records`` (see the module's doc)."""

    days_ahead: int = DAYS_AHEAD
    retention: timedelta | None = None  # None: raw rows are kept forever
    rollup_retention: timedelta | None = None  # None: rollups are kept forever
    interval: float = MAINTENANCE_INTERVAL
    fold_interval: float = FOLD_INTERVAL

    def __post_init__(self) -> None:
        if self.days_ahead < 1:
            raise ValueError("days_ahead must be at least 1")
        if self.interval <= 0 or self.fold_interval <= 0:
            raise ValueError("the maintenance intervals must be positive")
        check_retentions(self.retention, self.rollup_retention)


def check_retentions(retention: timedelta | None, rollup_retention: timedelta | None) -> None:
    """ValueError unless both are positive and the rollups outlive the rows: a range
    still held as rows is read partly from the rollups."""
    for name, value in (("retention", retention), ("rollup retention", rollup_retention)):
        if value is not None and value <= timedelta(0):
            raise ValueError(f"the usage {name} must be positive, got {value}")
    if retention is not None and rollup_retention is not None and rollup_retention < retention:
        raise ValueError(
            f"the rollup retention ({rollup_retention}) must not be shorter than the "
            f"usage retention ({retention})"
        )
    if rollup_retention is not None and retention is None:
        raise ValueError("a rollup retention needs a usage retention at least as short")


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    since: datetime | None  # None: the DEFAULT partition (or an unbounded one)
    until: datetime | None
    is_default: bool
    rows: int | None  # Postgres's estimate; None before the first ANALYZE
    bytes: int  # with its indexes


@dataclass(slots=True)
class PruneReport:
    before: datetime  # what ended before this was (or would be) dropped
    partitions: list[Partition] = field(default_factory=list)
    default_rows: int = 0  # rows of such days found in the DEFAULT partition
    rollup_before: datetime | None = None
    hourly_rows: int = 0  # rollup rows deleted, every level (dry run: that would be)
    daily_rows: int = 0
    weekly_rows: int = 0


@dataclass(slots=True)
class MaintenanceReport:
    created: list[str] = field(default_factory=list)
    pruned: PruneReport | None = None


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def is_partitioned(conn: asyncpg.Connection) -> bool:
    """Whether the database has migration 0007 (partitions and rollups)."""
    found = await conn.fetchval(
        "SELECT to_regprocedure('usage_records_create_partition(date)') IS NOT NULL"
    )
    return bool(found)


async def list_partitions(conn: asyncpg.Connection) -> list[Partition]:
    """Every partition of ``usage_records``, the DEFAULT one first, then by day."""
    rows = await conn.fetch(
        """
        SELECT p.name, p.lo, p.hi, p.is_default, c.reltuples,
               pg_total_relation_size(p.partition) AS bytes
        FROM usage_records_partitions p JOIN pg_class c ON c.oid = p.partition
        ORDER BY p.is_default DESC, p.lo NULLS FIRST, p.name
        """
    )
    return [
        Partition(
            name=r["name"],
            since=r["lo"],
            until=r["hi"],
            is_default=r["is_default"],
            rows=int(r["reltuples"]) if r["reltuples"] >= 0 else None,
            bytes=int(r["bytes"]),
        )
        for r in rows
    ]


async def days_in_default(conn: asyncpg.Connection) -> list[date]:
    """The UTC days that have rows in the DEFAULT partition (one index probe per day)."""
    rows = await conn.fetch(
        """
        WITH RECURSIVE days AS (
            SELECT date_trunc('day', min(created_at), 'UTC') AS first
            FROM usage_records_default
            UNION ALL
            SELECT (SELECT date_trunc('day', min(d.created_at), 'UTC')
                    FROM usage_records_default d
                    WHERE d.created_at >= days.first + interval '24 hours')
            FROM days WHERE days.first IS NOT NULL
        )
        SELECT (first AT TIME ZONE 'UTC')::date AS day FROM days WHERE first IS NOT NULL
        """
    )
    return [r["day"] for r in rows]


async def _locked(conn: asyncpg.Connection) -> None:
    """In a transaction: bound lock waits and take the partition lock, or PartitionBusy."""
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY):
        raise PartitionBusy("another process is changing usage_records' partitions")


async def create_partitions(conn: asyncpg.Connection, days: Iterable[date]) -> list[str]:
    """A partition for each of ``days`` that has none (moving its rows out of the DEFAULT
    partition), one transaction each; the names of those created."""
    created: list[str] = []
    for day in sorted(set(days)):
        name = await _create_partition(conn, day)
        if name is not None:
            created.append(name)
    return created


async def _create_partition(conn: asyncpg.Connection, day: date) -> str | None:
    """One day's partition, in its own transaction; its name, or None if it exists."""
    attempt = 1
    while True:
        try:
            async with conn.transaction():
                await _locked(conn)
                name: str | None = await conn.fetchval(
                    "SELECT usage_records_create_partition($1)", day
                )
                return name
        except asyncpg.SerializationError:
            # Rows of the day reached DEFAULT while it was being created without the
            # table's lock; the next attempt sees them and moves them under that lock.
            if attempt >= _CREATE_ATTEMPTS:
                raise
            attempt += 1
            log.info("usage_records: rows of %s arrived while creating it; retrying", day)


async def ensure_partitions(conn: asyncpg.Connection, *, today: date, days_ahead: int) -> list[str]:
    """Partitions for ``today`` and the ``days_ahead`` days after it, and for every day
    whose rows wait in the DEFAULT partition; the names of those created."""
    days = [today + timedelta(days=n) for n in range(days_ahead + 1)]
    return await create_partitions(conn, [*days, *await days_in_default(conn)])


async def prune(
    conn: asyncpg.Connection,
    *,
    before: datetime,
    rollups_before: datetime | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Drop the partitions whose day ended by ``before`` (rows of such days waiting in
    the DEFAULT partition are moved to a partition first, and go with it), and delete
    the rollup rows of hours and days that ended by ``rollups_before``. ``dry_run``:
    change nothing, report what would go."""
    report = PruneReport(before=before, rollup_before=rollups_before)
    report.default_rows = int(
        await conn.fetchval(
            "SELECT count(*) FROM usage_records_default WHERE created_at < $1",
            _day_floor(before),
        )
    )
    if not dry_run:
        old_days = [d for d in await days_in_default(conn) if _day_start(d) + _DAY <= before]
        await create_partitions(conn, old_days)
    old = [
        p
        for p in await list_partitions(conn)
        if not p.is_default and p.until is not None and p.until <= before
    ]
    for partition in old:
        if not dry_run:
            async with conn.transaction():
                await _locked(conn)
                # Dropping a partition detaches it; the rollups keep its totals.
                await conn.execute(f"DROP TABLE {_ident(partition.name)}")
            log.info(
                "usage retention: dropped %s (%s, about %s rows, %d bytes)",
                partition.name,
                partition.since.date() if partition.since else "?",
                partition.rows if partition.rows is not None else "?",
                partition.bytes,
            )
        report.partitions.append(partition)
    if rollups_before is not None:
        counts = await _prune_rollups(conn, rollups_before, dry_run=dry_run)
        report.hourly_rows, report.daily_rows = counts["hour"], counts["day"]
        report.weekly_rows = counts["week"]
    return report


_DAY = timedelta(days=1)


def _day_floor(moment: datetime) -> datetime:
    utc = moment.astimezone(UTC)
    return datetime(utc.year, utc.month, utc.day, tzinfo=UTC)


_BUCKET_LENGTHS = {"hour": "1 hour", "day": "24 hours", "week": "7 days"}


async def _prune_rollups(
    conn: asyncpg.Connection, before: datetime, *, dry_run: bool
) -> dict[str, int]:
    """Delete (or count) the rollup rows of buckets that ended by ``before``, in every
    rollup table the schema lists; rows per grain (hour, day, week)."""
    counts = dict.fromkeys(_BUCKET_LENGTHS, 0)
    for table in await conn.fetch("SELECT name, grain FROM usage_rollup_tables()"):
        name, grain = _ident(table["name"]), table["grain"]
        # the bucket ended by `before`
        where = f"bucket <= $1::timestamptz - interval '{_BUCKET_LENGTHS[grain]}'"
        if dry_run:
            sql = f"SELECT count(*) FROM {name} WHERE {where}"
            counts[grain] += int(await conn.fetchval(sql, before))
        else:
            status = await conn.execute(f"DELETE FROM {name} WHERE {where}", before)
            counts[grain] += int(status.rsplit(" ", 1)[-1])
    return counts


async def maintain(
    pool: asyncpg.Pool, policy: MaintenancePolicy, *, now: datetime | None = None
) -> MaintenanceReport | None:
    """One maintenance run (see the module's doc); None when the database has no
    partitions yet (not migrated to 0007) or another process holds the lock."""
    now = now if now is not None else datetime.now(UTC)
    report = MaintenanceReport()
    async with pool.acquire() as conn:
        if not await is_partitioned(conn):
            return None
        try:
            report.created = await ensure_partitions(
                conn, today=now.astimezone(UTC).date(), days_ahead=policy.days_ahead
            )
            if policy.retention is not None:
                report.pruned = await prune(
                    conn,
                    before=now - policy.retention,
                    rollups_before=now - policy.rollup_retention
                    if policy.rollup_retention is not None
                    else None,
                )
        except PartitionBusy:
            return None
    if report.created:
        log.info("usage_records: created partitions %s", ", ".join(report.created))
    return report


async def fold(pool: asyncpg.Pool | asyncpg.Connection, *, max_rows: int = FOLD_ROWS) -> int:
    """Move what waits in ``usage_rollup_pending`` into the rollups, ``max_rows`` per
    transaction; the number of rows moved (0 when another process is folding, or the
    database has no rollups yet)."""
    moved = 0
    while True:
        try:
            step = int(await pool.fetchval("SELECT usage_rollups_fold($1)", max_rows))
        except asyncpg.UndefinedFunctionError:
            return moved  # not migrated to 0007 yet
        if step < 0:
            return moved  # another process holds the fold
        moved += step
        if step < max_rows:
            return moved
