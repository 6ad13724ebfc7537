"""Usage rollups at scale: 50 million synthetic rows over 30 days, then the queries.

Run: ``DATABASE_URL=postgresql://... .venv/bin/python -m bench.usage_rollups`` (not part
of ``make test``; takes tens of minutes and about 25 GB on the Postgres server).

1. Makes a throwaway database on that server, migrates it (daily partitions, rollups),
   creates the partitions of the 30 days, and generates ``--rows`` rows with
   ``INSERT ... SELECT ... FROM generate_series`` through ``usage_records`` itself, one
   statement per hour of data (about 69,000 rows), so the triggers queue every row for
   the rollups as the writer's batches do; every ``--fold-every`` hours it folds the
   queue into the hourly and daily rollups, as the server does. The spread: 25 orgs,
   150 applications (a few large, many small), 4 keys each in prod/staging/dev, 12
   models on 4 providers, 92% allowed / 4% denied / 4% errors with their status codes,
   log-normal latencies, prices per model (one self-hosted model without), a daily
   traffic curve. Raw partitions are UNLOGGED unless ``--logged`` (the rows are
   throwaway; this spares the shared server's WAL); the rollups are logged.
2. ``VACUUM ANALYZE``, then times ``ext-proc usage``'s own query (``rollup()``) for
   ``--since 30d`` (a partial hour at each end, read from the rows) by several
   groupings: cold (a new connection, shared buffers filled with another table, the
   OS page cache dropped when this process may) and warm (median of 5).
3. Checks one answer against the same totals computed from the rows alone (the old
   query) and times that too.
4. ``--migration-rows N``: instead, measures migration 0007 on an unpartitioned table
   holding N rows (the shape of migrations 0001-0006).

``--keep`` leaves the database for another look; ``--database NAME`` runs the queries on
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_proc.stores.postgres import SCHEMA_DIR, migrate
from ext_proc.usage.maintenance import fold
from ext_proc.usage.rollups import Part, _build_query, plan_parts, rollup

GROUPINGS = [
    ["org_id", "model"],
    ["app_id"],
    ["key_id"],
    ["provider", "deployment", "status_class"],
    ["day", "org_id"],
    ["hour"],
]

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
"""


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


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


async def generate(
    conn: asyncpg.Connection, *, rows: int, days: int, logged: bool, fold_every: int
) -> None:
    now = datetime.now(UTC)
    first_day = (now - timedelta(days=days)).date()
    for n in range((now.date() - first_day).days + 8):
        await conn.execute("SELECT usage_records_create_partition($1)", first_day + timedelta(n))
    if not logged:
        for name in await conn.fetch(
            "SELECT name FROM usage_records_partitions WHERE NOT is_default"
        ):
            await conn.execute(f'ALTER TABLE "{name["name"]}" SET UNLOGGED')
        await conn.execute("ALTER TABLE usage_rollup_pending SET UNLOGGED")
    slices = _hours(now, days)
    weights = _weights(slices)
    scale = rows / sum(weights)
    counts = [round(w * scale) for w in weights]
    counts[-1] += rows - sum(counts)
    started = time.perf_counter()
    insert_s = fold_s = 0.0
    next_id = 1
    for i, ((at, length), count) in enumerate(zip(slices, counts, strict=True)):
        t0 = time.perf_counter()
        await conn.execute(GENERATE, next_id, count, at, length)
        insert_s += time.perf_counter() - t0
        next_id += count
        if i % fold_every == fold_every - 1 or i == len(slices) - 1:
            t0 = time.perf_counter()
            await fold(conn)
            fold_s += time.perf_counter() - t0
        if i % 24 == 23 or i == len(slices) - 1:
            elapsed = time.perf_counter() - started
            print(
                f"  {next_id - 1:>11,} rows, {at:%Y-%m-%d %H:00}: {elapsed:7.0f} s "
                f"(inserts {insert_s:.0f} s, folds {fold_s:.0f} s)",
                flush=True,
            )
    print(
        f"generated {rows:,} rows in {time.perf_counter() - started:.0f} s: inserts through "
        f"the triggers {insert_s:.0f} s ({rows / insert_s:,.0f} rows/s), folds {fold_s:.0f} s"
    )


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


async def queries(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        raw_rows = await conn.fetchval("SELECT count(*) FROM usage_records")
        sizes = await conn.fetch(
            """
            SELECT 'usage_records' AS t, sum(pg_total_relation_size(partition))::bigint AS b,
                   (SELECT count(*) FROM usage_records_partitions) AS n
            FROM usage_records_partitions
            UNION ALL SELECT 'usage_rollup_hourly', pg_total_relation_size('usage_rollup_hourly'),
                   (SELECT count(*) FROM usage_rollup_hourly)
            UNION ALL SELECT 'usage_rollup_daily', pg_total_relation_size('usage_rollup_daily'),
                   (SELECT count(*) FROM usage_rollup_daily)
            UNION ALL SELECT 'usage_rollup_pending', pg_total_relation_size('usage_rollup_pending'),
                   (SELECT count(*) FROM usage_rollup_pending)
            """
        )
        print(f"\n{raw_rows:,} rows in usage_records")
        for s in sizes:
            print(f"  {s['t']:<22} {s['b'] / 2**30:8.2f} GiB  ({s['n']:,} partitions/rows)")
    finally:
        await conn.close()

    now = datetime.now(UTC)
    since, until = now - timedelta(days=30), now
    print(f"\nranges: --since 30d = [{since:%Y-%m-%d %H:%M:%S}, {until:%Y-%m-%d %H:%M:%S}) UTC")
    for part in plan_parts(since, until, by_hour=False):
        print(f"  {part.source:<8} {part.since} .. {part.until}")
    print(f"\n{'--by':<36} {'groups':>7} {'cold ms':>9} {'warm ms':>9}")
    dropped = False
    for keys in GROUPINGS:
        conn = await asyncpg.connect(url)
        try:
            await _evict_shared_buffers(conn)
        finally:
            await conn.close()
        dropped = _drop_os_cache()
        conn = await asyncpg.connect(url)
        try:
            t0 = time.perf_counter()
            rows = await rollup(conn, group_by=keys, since=since, until=until, limit=100_000)
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(5):
                t0 = time.perf_counter()
                await rollup(conn, group_by=keys, since=since, until=until, limit=100_000)
                warm.append(time.perf_counter() - t0)
        finally:
            await conn.close()
        print(
            f"{','.join(keys):<36} {len(rows):>7,} {cold * 1e3:>9.0f} "
            f"{statistics.median(warm) * 1e3:>9.0f}",
            flush=True,
        )
    print(
        "cold: new connection, shared_buffers filled with another table, "
        + ("OS page cache dropped" if dropped else "OS page cache NOT dropped (not permitted)")
    )

    # The same answer from the rows alone (what ext-proc usage did before the rollups).
    conn = await asyncpg.connect(url)
    try:
        keys = ["org_id", "model"]
        fast = await rollup(conn, group_by=keys, since=since, until=until, limit=100_000)
        sql, params = _build_query(
            keys,
            since=since,
            until=until,
            filters={},
            limit=100_000,
            parts=[Part("raw", since, until)],
        )
        await conn.execute("SET statement_timeout = 0")
        t0 = time.perf_counter()
        raw = await conn.fetch(sql, *params)
        raw_s = time.perf_counter() - t0
    finally:
        await conn.close()
    by_key = {tuple(r[k] for k in keys): r for r in raw}
    same = len(fast) == len(raw) and all(
        (
            row.requests,
            row.total_tokens,
            row.cached_tokens,
            row.reasoning_tokens,
            row.cost_usd,
            row.errors,
            row.denied,
        )
        == (
            by_key[tuple(row.keys.values())]["requests"],
            by_key[tuple(row.keys.values())]["total_tokens"],
            by_key[tuple(row.keys.values())]["cached_tokens"],
            by_key[tuple(row.keys.values())]["reasoning_tokens"],
            by_key[tuple(row.keys.values())]["cost_usd"],
            by_key[tuple(row.keys.values())]["errors"],
            by_key[tuple(row.keys.values())]["denied"],
        )
        for row in fast
    )
    print(
        f"\n--by org_id,model from the rows alone: {raw_s * 1e3:,.0f} ms (warm); "
        f"rollup answer {'equals' if same else 'DIFFERS FROM'} it"
    )


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
    parser.add_argument("--fold-every", type=int, default=1, help="hours of data per fold")
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
        await queries(_with_database(server, args.database))
        return
    name = f"bench_usage_rollups_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server, name)
    print(f"database {name}")
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await generate(
                conn, rows=args.rows, days=args.days, logged=args.logged, fold_every=args.fold_every
            )
            t0 = time.perf_counter()
            await conn.execute("VACUUM ANALYZE")
            print(f"VACUUM ANALYZE: {time.perf_counter() - t0:.0f} s")
        finally:
            await conn.close()
        await queries(url)
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
