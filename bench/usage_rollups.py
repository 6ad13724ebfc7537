"""Usage rollups at scale: 50 million synthetic rows over 30 days, then the queries.

Run: ``DATABASE_URL=postgresql://... .venv/bin/python -m bench.usage_rollups`` (not part
of ``make test``; about 45 minutes and 25 GB on the Postgres server for 50 million rows
on a 2-core machine).

1. Makes a throwaway database on that server and migrates it (daily partitions,
   rollups). The spread of the rows: 25 orgs, 150 applications (a few large, many
   small), 4 keys each in prod/staging/dev, 12 models on 6 providers, 92% allowed / 4%
   denied / 4% errors with their status codes, log-normal latencies, prices per model
   (one self-hosted model without), a daily traffic curve; one ``INSERT ... SELECT ...
   FROM generate_series`` per hour of data.
   - **The most recent ``--trigger-rows`` rows (1.5 million) go the way the gateway's
     go**: through ``usage_records`` itself, in statements of ``--batch`` rows (5,000:
     5 s at 1,000 requests/s), so the triggers queue every row in usage_rollup_pending,
     each statement followed by the server's fold (``maintenance.fold``) into every
     rollup table. Their rate is the write path's, measured on rollup tables already
     holding the earlier days.
   - **The earlier days are bulk-loaded, a path for this benchmark only** (the
     triggers' per-row queue and the folds would take two hours for 50 million rows
     here): each UTC day is generated into a table of its own without indexes, indexed
     once, attached as that day's partition (no trigger fires: they are statement
     triggers on usage_records), and counted into the hourly and daily rollups by
     ``usage_rollups_count_sql``, the statement ``usage_rollups_rebuild`` (and so the
     migration) runs, built by the same ``usage_rollups_add_sql`` as the fold: one pass
     over the day's rows, the totals the fold would have made (step 3 checks them).
     ``--jobs`` days at a time; then ``usage_rollups_rebuild_weeks`` sums the weeks.
   Raw partitions are UNLOGGED unless ``--logged`` (the rows are throwaway; this spares
   the shared server's WAL); the rollups and the pending queue are logged.
2. ``VACUUM ANALYZE``, then times ``ext-proc usage``'s own query (``rollup()``) for
   ``--since 30d`` by several groupings and filters, naming the rollups each reads:
   cold (a new connection, shared buffers filled with another table, the OS page cache
   dropped when this process may) and warm (median of 5).
3. Checks the answers by org and model, and by key, against totals computed from the
   rows by plain SQL, and times that too. Exits 1 if they differ.
4. ``--migration-rows N``: instead, measures migration 0007 on an unpartitioned table
   holding N rows (the shape of migrations 0001-0006).

``--keep`` leaves the database for another look; ``--database NAME`` runs steps 2-3 on
a database kept earlier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_proc.stores.postgres import SCHEMA_DIR, migrate
from ext_proc.usage.maintenance import fold
from ext_proc.usage.rollups import LEVELS, Grain, plan_parts, rollup, rollup_level

# What is timed: --by, and the filters (rollup()'s keyword arguments).
GROUPINGS: list[tuple[list[str], dict[str, str]]] = [
    (["org_id", "model"], {}),
    (["app_id"], {}),
    (["provider"], {}),
    (["day", "org_id"], {}),
    (["hour"], {}),
    (["hour"], {"org_id": "org-3"}),
    (["day", "model"], {"org_id": "org-3"}),
    (["key_id"], {}),
    (["environment"], {}),
    (["provider", "deployment", "status_class"], {}),
    (["day", "decision"], {}),
    (["key_id"], {"app_id": "app-7"}),
]
ROLLUP_TABLES = (
    "usage_rollup_org_hourly",
    "usage_rollup_org_daily",
    "usage_rollup_app_hourly",
    "usage_rollup_app_daily",
    "usage_rollup_hourly",
    "usage_rollup_daily",
    "usage_rollup_weekly",
    "usage_rollup_pending",
)

# One row per model: name, provider, deployment, input and output USD per million tokens
# (NULL: self-hosted, no price), median latency in ms, reasoning model.
MODELS = """
    (VALUES (0, 'gpt-4o-mini', 'azure-eastus', 'gpt-4o-mini-prod', 0.15, 0.60, 700, false),
            (1, 'gpt-4o', 'azure-eastus', 'gpt-4o-prod', 2.5, 10.0, 1400, false),
            (2, 'gpt-4.1', 'openai', 'gpt-4.1', 2.0, 8.0, 1600, false),
            (3, 'o3-mini', 'openai', 'o3-mini', 1.1, 4.4, 6000, true),
            (4, 'o4-mini', 'openai', 'o4-mini', 1.1, 4.4, 5000, true),
            (5, 'claude-sonnet-4', 'anthropic', 'claude-sonnet-4-20250514', 3.0, 15.0, 2500, false),
            (6, 'claude-haiku', 'anthropic', 'claude-3-5-haiku', 0.8, 4.0, 900, false),
            (7, 'gemini-2.5-flash', 'gemini', 'gemini-2.5-flash', 0.3, 2.5, 1100, false),
            (8, 'gemini-2.5-pro', 'gemini', 'gemini-2.5-pro', 1.25, 10.0, 3000, true),
            (9, 'text-embedding-3-small', 'openai', 'text-embedding-3-small', 0.02, 0, 80, false),
            (10, 'gpt-4.1-nano', 'azure-westus', 'gpt-4.1-nano', 0.1, 0.4, 400, false),
            (11, 'llama-3.1-70b', 'vllm', 'llama-70b-local', NULL, NULL, 1800, false))
    AS m(i, name, provider, deployment, price_in, price_out, median_ms, reasoning)
"""

# $1 first request number, $2 rows, $3 start of the hour, $4 length of the slice.
GENERATE = f"""
INSERT INTO usage_records (
    request_id, created_at, org_id, app_id, key_id, environment, endpoint, model,
    response_model, provider, deployment, stream, status_code, decision, policy,
    prompt_tokens, completion_tokens, total_tokens, tokens_estimated, latency_ms, ttft_ms,
    estimated_prompt_tokens, cached_tokens, reasoning_tokens, request_bytes, response_bytes,
    error_code, recorded_by, cost_usd, attempts)
SELECT 'req-' || to_hex(s.n), s.at, 'org-' || (s.app % 25), 'app-' || s.app,
       'key-' || s.key, (ARRAY['prod', 'prod', 'prod', 'staging', 'dev'])[1 + s.key % 5],
       CASE WHEN m.i = 9 THEN '/v1/embeddings' ELSE '/v1/chat/completions' END, m.name,
       CASE WHEN d.decision = 'allowed' THEN m.name || '-2025-01-01' END,
       m.provider, m.deployment, m.i <> 9 AND s.r_stream < 0.3, s.status, d.decision,
       CASE s.status WHEN 429 THEN 'sixty-per-minute' WHEN 403 THEN 'mini-only' END,
       t.prompt, t.completion, t.prompt + t.completion, d.decision = 'error', l.latency,
       CASE WHEN d.decision = 'allowed' THEN l.latency * 0.2 END,
       t.prompt, t.cached, t.reasoning, 200 + 4 * coalesce(t.prompt, 100),
       CASE WHEN d.decision = 'allowed' THEN 300 + 4 * t.completion ELSE 120 END,
       CASE s.status WHEN 429 THEN 'rate_limit_exceeded' WHEN 403 THEN 'model_not_allowed'
                     WHEN 200 THEN NULL ELSE 'upstream_error' END,
       'access_log',
       CASE WHEN d.decision <> 'denied' THEN
           ((coalesce(t.prompt, 0) * m.price_in + coalesce(t.completion, 0) * m.price_out)
            / 1000000)::numeric(20, 10) END,
       CASE WHEN d.decision = 'denied' THEN NULL WHEN s.status >= 500 THEN 2 ELSE 1 END
FROM (
    SELECT g.n, g.app, g.app * 4 + floor(4 * random() ^ 2)::int AS key,
           $3::timestamptz + random() * $4::interval AS at,
           (g.app * 7 + floor(4 * random() ^ 3)::int) % 12 AS model_i,
           CASE WHEN g.x < 0.92 THEN 200 WHEN g.x < 0.95 THEN 429 WHEN g.x < 0.96 THEN 403
                WHEN g.x < 0.975 THEN 502 WHEN g.x < 0.985 THEN 504 WHEN g.x < 0.99 THEN 500
                ELSE 499 END AS status,
           random() AS r_stream, random() AS r_tokens, random() AS r_cache,
           random() AS r_denied,
           -- log-normal spread around the model's median latency (Box-Muller)
           exp(0.75 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())) AS spread
    FROM (SELECT n, floor(150 * random() ^ 2.2)::int AS app, random() AS x
          FROM generate_series($1::bigint, $1::bigint + $2 - 1) n) g
) s
JOIN {MODELS} ON m.i = s.model_i
CROSS JOIN LATERAL (
    SELECT CASE WHEN s.status = 200 THEN 'allowed' WHEN s.status IN (403, 429) THEN 'denied'
                ELSE 'error' END AS decision
) d
CROSS JOIN LATERAL (  -- a denial is answered at once
    SELECT CASE WHEN d.decision = 'denied' THEN 0.3 + 3 * s.r_denied
                ELSE m.median_ms * s.spread END AS latency
) l
CROSS JOIN LATERAL (
    SELECT p.prompt,
           CASE WHEN d.decision = 'allowed' AND m.i <> 9 THEN floor(900 * s.r_tokens)::int
                WHEN d.decision = 'error' THEN 0 END AS completion,
           CASE WHEN d.decision = 'allowed' AND s.r_cache < 0.3 THEN p.prompt / 2 END AS cached,
           CASE WHEN d.decision = 'allowed' AND m.reasoning
                THEN floor(600 * s.r_tokens)::int END AS reasoning
    FROM (SELECT CASE WHEN d.decision = 'denied' THEN NULL
                      ELSE 40 + floor(3500 * s.r_cache ^ 2)::int END AS prompt) p
) t
ORDER BY s.at  -- in time order, as the gateway writes them (an hour's rows share pages)
"""


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Slice:
    """One statement's rows: ``count`` rows numbered from ``first_id``, spread over
    ``[at, at + length)`` (never across a UTC day)."""

    first_id: int
    count: int
    at: datetime
    length: timedelta

    @property
    def day(self) -> date:
        return self.at.astimezone(UTC).date()


def _hours(now: datetime, days: int) -> list[tuple[datetime, timedelta]]:
    """Hour slices covering [now - days, now): (start, length)."""
    start = (now - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
    slices = []
    at = start
    while at < now:
        slices.append((at, min(timedelta(hours=1), now - at)))
        at += timedelta(hours=1)
    return slices


def _weights(slices: list[tuple[datetime, timedelta]]) -> list[float]:
    """A daily curve: quiet at 04:00 UTC, busy at 16:00, weighted by slice length."""
    return [
        (0.35 + math.sin(math.pi * ((at.hour + 20) % 24) / 24) ** 2) * (length / timedelta(hours=1))
        for at, length in slices
    ]


def plan_slices(now: datetime, *, rows: int, days: int) -> list[Slice]:
    """``rows`` rows over the hours of ``[now - days, now)``, following the daily curve."""
    hours = _hours(now, days)
    weights = _weights(hours)
    scale = rows / sum(weights)
    counts = [round(w * scale) for w in weights]
    counts[-1] += rows - sum(counts)
    slices, next_id = [], 1
    for (at, length), count in zip(hours, counts, strict=True):
        slices.append(Slice(next_id, count, at, length))
        next_id += count
    return slices


def split_slices(slices: list[Slice], trigger_rows: int) -> tuple[list[Slice], list[Slice]]:
    """(bulk, through the triggers): the trailing hours holding at most ``trigger_rows``
    rows go through the triggers (the most recent ones, where the live write path is)."""
    first, total = len(slices), 0
    while first > 0 and total + slices[first - 1].count <= trigger_rows:
        first -= 1
        total += slices[first].count
    return slices[:first], slices[first:]


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass(slots=True)
class Clock:
    """Seconds spent per phase, summed over the jobs (which overlap in wall time)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


async def _index_columns(conn: asyncpg.Connection) -> tuple[str, list[str]]:
    """The column lists of usage_records' primary key and of its other indexes, as the
    migrations declare them: a bulk-loaded day must have the same for ATTACH to adopt
    its indexes instead of building new ones."""
    rows = await conn.fetch(
        "SELECT indisprimary, pg_get_indexdef(indexrelid) AS def FROM pg_index "
        "WHERE indrelid = 'usage_records'::regclass"
    )
    pk, others = "", []
    for row in rows:
        columns = row["def"].split("USING btree (", 1)[1].removesuffix(")")
        if row["indisprimary"]:
            pk = columns
        else:
            others.append(columns)
    return pk, sorted(others)


async def _bulk_day(
    conn: asyncpg.Connection,
    day: date,
    slices: list[Slice],
    *,
    logged: bool,
    indexes: tuple[str, list[str]],
    clock: Clock,
) -> None:
    """One UTC day bulk-loaded (bench only, see the module's doc): a table of its own
    filled without indexes, its indexes built once, attached as the day's partition,
    then counted into the hourly and daily rollups by usage_rollups_count_sql (what
    usage_rollups_rebuild runs)."""
    name = f"usage_records_p{day:%Y%m%d}"
    lo, hi = _day_start(day), _day_start(day + timedelta(days=1))
    with clock.phase("generate"):
        await conn.execute(
            f"CREATE {'' if logged else 'UNLOGGED '}TABLE {name} (LIKE usage_records "
            "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)"
        )
        insert = GENERATE.replace("INSERT INTO usage_records (", f"INSERT INTO {name} (", 1)
        for s in slices:
            await conn.execute(insert, s.first_id, s.count, s.at, s.length)
    with clock.phase("index"):
        pk, others = indexes
        await conn.execute(f"ALTER TABLE {name} ADD PRIMARY KEY ({pk})")
        for columns in others:
            await conn.execute(f"CREATE INDEX ON {name} ({columns})")
        # The bounds proven by a constraint: ATTACH need not scan the rows.
        bounds = f"created_at >= '{lo.isoformat()}' AND created_at < '{hi.isoformat()}'"
        await conn.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_bounds CHECK ({bounds})")
        await conn.execute(
            f"ALTER TABLE usage_records ATTACH PARTITION {name} "
            f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
        )
        await conn.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bounds")
        built = await conn.fetchval(
            "SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass", name
        )
        if built != 1 + len(others):
            raise RuntimeError(f"ATTACH built indexes of its own on {name}: the bench is wrong")
    with clock.phase("vacuum"):
        await conn.execute(f"VACUUM (ANALYZE) {name}")
    with clock.phase("rollups"):
        # The rebuild's own statement, on this day's partition: its hours and days are
        # new to the rollups (and no other job's), so jobs count days side by side.
        count = await conn.fetchval("SELECT usage_rollups_count_sql($1::regclass)", name)
        counted = await conn.fetchval(count, lo, hi)
        if counted != sum(s.count for s in slices):
            raise RuntimeError(f"{name}: {counted} rows counted into the rollups")


async def bulk_load(
    url: str, slices: list[Slice], *, logged: bool, jobs: int, work_mem: str
) -> Clock:
    """The bulk-loaded days, ``jobs`` days at a time (each on its own connection)."""
    days: dict[date, list[Slice]] = {}
    for s in slices:
        days.setdefault(s.day, []).append(s)
    queue: asyncio.Queue[date] = asyncio.Queue()
    for day in days:
        queue.put_nowait(day)
    clock = Clock()
    started = time.perf_counter()
    done: list[int] = []

    async def job() -> None:
        conn = await asyncpg.connect(url, command_timeout=None)
        try:
            await conn.execute(f"SET work_mem = '{work_mem}'")
            await conn.execute(f"SET maintenance_work_mem = '{work_mem}'")
            indexes = await _index_columns(conn)
            while not queue.empty():
                day = queue.get_nowait()
                await _bulk_day(conn, day, days[day], logged=logged, indexes=indexes, clock=clock)
                done.append(sum(s.count for s in days[day]))
                print(
                    f"  {day}: {len(done)}/{len(days)} days, {sum(done):>11,} rows, "
                    f"{time.perf_counter() - started:6.0f} s",
                    flush=True,
                )
        finally:
            await conn.close()

    await asyncio.gather(*(job() for _ in range(min(jobs, len(days)))))
    with clock.phase("rollups"):
        conn = await asyncpg.connect(url, command_timeout=None)
        try:
            first, last = min(days), max(days) + timedelta(days=1)
            await conn.execute(
                "SELECT usage_rollups_rebuild_weeks($1, $2)", _day_start(first), _day_start(last)
            )
        finally:
            await conn.close()
    clock.seconds["wall"] = time.perf_counter() - started
    return clock


async def through_triggers(conn: asyncpg.Connection, slices: list[Slice], *, batch: int) -> Clock:
    """The live write path: statements of ``batch`` rows through usage_records itself
    (its triggers queue each row in usage_rollup_pending), each followed by the server's
    fold (``maintenance.fold``), as the writer and its fold loop do."""
    clock = Clock()
    started = time.perf_counter()
    written = 0
    for i, s in enumerate(slices):
        parts = max(1, math.ceil(s.count / batch))
        for p in range(parts):
            first = s.first_id + s.count * p // parts
            count = s.first_id + s.count * (p + 1) // parts - first
            with clock.phase("insert"):
                await conn.execute(
                    GENERATE, first, count, s.at + s.length * p / parts, s.length / parts
                )
            with clock.phase("fold"):
                await fold(conn)
            written += count
        if i % 6 == 5 or i == len(slices) - 1:
            print(
                f"  {s.at:%Y-%m-%d %H:00}: {written:>11,} rows through the triggers, "
                f"{time.perf_counter() - started:6.0f} s",
                flush=True,
            )
    return clock


async def generate(
    url: str,
    *,
    rows: int,
    days: int,
    logged: bool,
    trigger_rows: int,
    batch: int,
    jobs: int,
    work_mem: str,
) -> None:
    now = datetime.now(UTC)
    slices = plan_slices(now, rows=rows, days=days)
    bulk, live = split_slices(slices, trigger_rows)
    bulk_days = {s.day for s in bulk}
    print(
        f"{sum(s.count for s in bulk):,} rows bulk-loaded ({len(bulk_days)} days), "
        f"{sum(s.count for s in live):,} through the triggers ({len(live)} hours)",
        flush=True,
    )
    if bulk:
        seconds = (await bulk_load(url, bulk, logged=logged, jobs=jobs, work_mem=work_mem)).seconds
        loaded = sum(s.count for s in bulk)
        print(
            f"bulk: {loaded:,} rows in {seconds['wall']:.0f} s wall ({jobs} jobs; summed over "
            f"them: generate {seconds['generate']:.0f} s = {loaded / seconds['generate']:,.0f} "
            f"rows/s, indexes {seconds['index']:.0f} s, vacuum {seconds['vacuum']:.0f} s, "
            f"rollups counted {seconds['rollups']:.0f} s = "
            f"{loaded / seconds['rollups']:,.0f} rows/s)",
            flush=True,
        )
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        # The days the live path writes to, and a week ahead, as the server makes them.
        last = now.date() + timedelta(days=7)
        day = max(bulk_days) + timedelta(days=1) if bulk_days else slices[0].day
        while day <= last:
            name = await conn.fetchval("SELECT usage_records_create_partition($1)", day)
            if name is not None and not logged:
                await conn.execute(f"ALTER TABLE {name} SET UNLOGGED")
            day += timedelta(days=1)
        if live:
            t0 = time.perf_counter()
            seconds = (await through_triggers(conn, live, batch=batch)).seconds
            written = sum(s.count for s in live)
            print(
                f"through the triggers: {written:,} rows in {time.perf_counter() - t0:.0f} s "
                f"= {written / (seconds['insert'] + seconds['fold']):,.0f} rows/s "
                f"(statements of {batch:,} rows: inserts {seconds['insert']:.0f} s = "
                f"{written / seconds['insert']:,.0f} rows/s, folds {seconds['fold']:.0f} s = "
                f"{written / seconds['fold']:,.0f} rows/s)",
                flush=True,
            )
        t0 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        print(f"VACUUM ANALYZE: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        await conn.close()


def _drop_os_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


async def _evict_shared_buffers(conn: asyncpg.Connection) -> None:
    """Fill shared_buffers with the biggest raw partition (pg_prewarm into the buffers)."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    biggest = await conn.fetchval(
        "SELECT name FROM usage_records_partitions WHERE NOT is_default "
        "ORDER BY pg_relation_size(partition) DESC LIMIT 1"
    )
    await conn.execute("SELECT pg_prewarm($1, 'buffer')", biggest)


async def _sizes(conn: asyncpg.Connection) -> None:
    raw_rows = await conn.fetchval("SELECT count(*) FROM usage_records")
    partitions = await conn.fetch(
        "SELECT count(*) AS n, sum(pg_total_relation_size(partition))::bigint AS b "
        "FROM usage_records_partitions"
    )
    print(f"\n{raw_rows:,} rows in usage_records")
    print(f"  {'table':<24} {'GiB':>7} {'rows':>12}")
    print(
        f"  {'usage_records':<24} {partitions[0]['b'] / 2**30:7.2f} {raw_rows:>12,}"
        f"  ({partitions[0]['n']} partitions)"
    )
    for table in ROLLUP_TABLES:
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        count = await conn.fetchval(f"SELECT count(*) FROM {table}")
        print(f"  {table:<24} {size / 2**30:7.2f} {count:>12,}")


def _describe(keys: list[str], filters: dict[str, str]) -> str:
    return ",".join(keys) + "".join(f" {k}={v}" for k, v in filters.items())


async def _warm(
    conn: asyncpg.Connection,
    keys: list[str],
    filters: dict[str, str],
    since: datetime,
    until: datetime,
) -> float:
    """Median seconds of 5 runs."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        await rollup(conn, group_by=keys, since=since, until=until, limit=100_000, **filters)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


async def _time_queries(url: str, since: datetime, until: datetime, worst: datetime) -> None:
    print(
        f"\n{'--by':<40} {'rollups':<8} {'groups':>7} {'cold ms':>9} {'warm ms':>9} "
        f"{'warm, :30':>10}"
    )
    dropped = False
    for keys, filters in GROUPINGS:
        conn = await asyncpg.connect(url)
        try:
            await _evict_shared_buffers(conn)
        finally:
            await conn.close()
        dropped = _drop_os_cache()
        conn = await asyncpg.connect(url)
        try:
            t0 = time.perf_counter()
            rows = await rollup(
                conn, group_by=keys, since=since, until=until, limit=100_000, **filters
            )
            cold = time.perf_counter() - t0
            warm = await _warm(conn, keys, filters, since, until)
            warm_worst = await _warm(conn, keys, filters, worst, until)
        finally:
            await conn.close()
        level = rollup_level(keys, {k: v for k, v in filters.items()})
        print(
            f"{_describe(keys, filters):<40} {level:<8} {len(rows):>7,} {cold * 1e3:>9.0f} "
            f"{warm * 1e3:>9.0f} {warm_worst * 1e3:>10.0f}",
            flush=True,
        )
    print(
        "cold: new connection, shared_buffers filled with another table, "
        + ("OS page cache dropped" if dropped else "OS page cache NOT dropped (not permitted)")
        + "; warm: median of 5; warm, :30: the same from "
        + f"{worst:%Y-%m-%d %H:%M} (half an hour of rows to read at the start, the most there is)"
    )


# The check: totals per org, model and key from the rows, by plain SQL written without
# the rollup code.
_FROM_ROWS = """
SELECT org_id, model, key_id, count(*) AS requests,
       coalesce(sum(total_tokens), 0) AS total_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd,
       count(*) FILTER (WHERE decision = 'error') AS errors,
       count(*) FILTER (WHERE decision = 'denied') AS denied
FROM usage_records WHERE created_at >= $1 AND created_at < $2
GROUP BY org_id, model, key_id
"""
_CHECKED = (
    "requests",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "errors",
    "denied",
)


def _totals(rows: list[asyncpg.Record], keys: list[str]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    out: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        sums = out.setdefault(tuple(row[k] for k in keys), [0] * len(_CHECKED))
        for i, name in enumerate(_CHECKED):
            if row[name] is not None:
                sums[i] = sums[i] + row[name]
    return {k: tuple(v) for k, v in out.items()}


async def check(url: str, since: datetime, until: datetime) -> bool:
    """The rollups' answers by org and model (app rollups) and by key (full rollups)
    against the rows' own totals; prints how long the rows took."""
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        answers = {
            keys: await rollup(conn, group_by=list(keys), since=since, until=until, limit=100_000)
            for keys in (("org_id", "model"), ("key_id",))
        }
        t0 = time.perf_counter()
        rows = await conn.fetch(_FROM_ROWS, since, until)
        seconds = time.perf_counter() - t0
    finally:
        await conn.close()
    same = True
    for keys, answer in answers.items():
        expected = _totals(rows, list(keys))
        got = {
            tuple(r.keys[k] for k in keys): tuple(
                (getattr(r, name) or 0) if name == "cost_usd" else getattr(r, name)
                for name in _CHECKED
            )
            for r in answer
        }
        equal = got == expected
        same = same and equal
        print(
            f"--by {','.join(keys)}: {'equals' if equal else 'DIFFERS FROM'} the rows' totals "
            f"({len(expected):,} groups)"
        )
    print(f"the rows' totals by plain SQL: {seconds * 1e3:,.0f} ms")
    return same


async def queries(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        await _sizes(conn)
    finally:
        await conn.close()
    now = datetime.now(UTC)
    since, until = now - timedelta(days=30), now
    print(f"\n--since 30d = [{since:%Y-%m-%d %H:%M:%S}, {until:%Y-%m-%d %H:%M:%S}) UTC, read as:")
    plans: list[tuple[str, tuple[Grain, ...]]] = [
        ("full rollups (key_id, ...)", LEVELS["full"][1]),
        ("org and app rollups", LEVELS["app"][1]),
        ("grouped by hour", ("hourly",)),
    ]
    for title, grains in plans:
        print(f"  {title}:")
        for part in plan_parts(since, until, grains=grains, now=now):
            sign = "+" if part.sign > 0 else "-"
            span = f"{part.since:%Y-%m-%d %H:%M:%S} .. {part.until:%Y-%m-%d %H:%M:%S}"
            print(f"    {sign} {part.source:<8} {span}")
    # The start edge costs most at half past: 30 minutes of rows whichever hour is read.
    worst = since.replace(minute=30, second=0, microsecond=0)
    await _time_queries(url, since, until, worst)
    print()
    return await check(url, since, until)


async def migration(server: str, rows: int) -> None:
    """Migration 0007 on an unpartitioned table of ``rows`` rows spread over 30 days."""
    name = f"bench_usage_migration_{uuid.uuid4().hex[:8]}"
    old_schema = Path(tempfile.mkdtemp(prefix="schema-0006-"))
    for path in sorted(SCHEMA_DIR.glob("*.sql")):
        if int(path.name[:4]) <= 6:
            shutil.copy(path, old_schema / path.name)
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server, name)
    try:
        await migrate(url, old_schema)
        conn = await asyncpg.connect(url)
        try:
            now = datetime.now(UTC)
            slices = _hours(now, 30)
            per = rows // len(slices)
            t0 = time.perf_counter()
            next_id = 1
            for i, (at, length) in enumerate(slices):
                count = per if i < len(slices) - 1 else rows - per * (len(slices) - 1)
                await conn.execute(GENERATE, next_id, count, at, length)
                next_id += count
            await conn.execute("VACUUM ANALYZE usage_records")
            print(f"{rows:,} rows in the unpartitioned table ({time.perf_counter() - t0:.0f} s)")
            size = await conn.fetchval("SELECT pg_total_relation_size('usage_records')")
        finally:
            await conn.close()
        t0 = time.perf_counter()
        applied = await migrate(url)
        seconds = time.perf_counter() - t0
        conn = await asyncpg.connect(url)
        try:
            after = await conn.fetchval("SELECT count(*) FROM usage_records")
            folded = await conn.fetchval(
                "SELECT coalesce(sum(requests), 0) FROM usage_rollup_daily"
            )
        finally:
            await conn.close()
        print(
            f"migration {', '.join(applied)} on {rows:,} rows ({size / 2**20:,.0f} MiB): "
            f"{seconds:.1f} s; rows after: {after:,}; in the rollups: {folded:,}"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(old_schema, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument(
        "--trigger-rows",
        type=int,
        default=1_500_000,
        help="rows (the most recent hours) written through the triggers and folds",
    )
    parser.add_argument("--batch", type=int, default=5_000, help="rows per live statement")
    parser.add_argument("--jobs", type=int, default=2, help="days bulk-loaded at once")
    parser.add_argument("--work-mem", default="256MB", help="work_mem of the bulk load")
    parser.add_argument("--logged", action="store_true", help="logged raw partitions")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--database", help="query this database (kept by --keep) only")
    parser.add_argument("--migration-rows", type=int, help="measure migration 0007 instead")
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL")
    if not server:
        raise SystemExit("set DATABASE_URL to a Postgres server this may create databases on")
    if args.migration_rows:
        await migration(server, args.migration_rows)
        return
    if args.database:
        if not await queries(_with_database(server, args.database)):
            raise SystemExit(1)
        return
    name = f"bench_usage_rollups_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server, name)
    print(f"database {name}")
    try:
        await migrate(url)
        t0 = time.perf_counter()
        await generate(
            url,
            rows=args.rows,
            days=args.days,
            logged=args.logged,
            trigger_rows=args.trigger_rows,
            batch=args.batch,
            jobs=args.jobs,
            work_mem=args.work_mem,
        )
        print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
        if not await queries(url):
            raise SystemExit(1)
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
