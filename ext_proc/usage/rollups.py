"""Usage rollups: totals of ``usage_records`` grouped by org, app, key, environment,
model, provider, deployment, decision, status class and hour/day, over a time range (the
admin API and ``ext-proc usage``).

Where the totals come from (``schema/0007_usage_partitions.sql``): rollup tables hold
totals per UTC hour and day (and week) at three levels of detail, per org
(``usage_rollup_org_*``), per org, app, model and provider (``usage_rollup_app_*``) and
per every group key (``usage_rollup_hourly`` / ``_daily`` / ``_weekly``); what changed in
``usage_records`` since the last fold waits in ``usage_rollup_pending`` (appended by
triggers in the writer's transaction). A query reads the smallest level that has every
key it groups and filters by (``rollup_level``): a time chart per org reads a few rows
per hour, whatever the number of keys.

A range is read in whole buckets from the boundary nearest to each of its ends, each
correction taken from the next finer source with a sign (``plan_parts``): ``--since
30d`` at 10:17 reads the hour 10:00-11:00 whole and subtracts the rows of 10:00-10:17;
whole days (weeks) are corrected by at most 12 hours (3.5 days) of the finer rollup; a
range ending now reads the current hour, day and week whole, as nothing later has
happened. What is pending counts for every whole hour read. Every measure is a sum, so
the parts add up (and subtract) exactly; they are added in one query, one snapshot, so
the totals are exact whenever the fold last ran. A database not migrated that far yet is
read from its rows alone.

Only identifiers from the fixed ``GROUP_KEYS`` table reach the SQL text; every value
(times, filters, limit) is a query parameter. Hours and days are UTC buckets.

``cost_usd`` is summed exactly (``numeric``) over the rows that have a cost; it is None
for a group none of whose rows has one (models without a price, requests denied before
routing). As JSON it is a string (``"0.0123450000"``): a JSON number would go through a
double.

Counts, tokens, cost and average latency equal what the rows add up to. The p95 latency
is read from a latency histogram (four buckets per doubling, each 19% wide): the
bucket holding the 95th percentile is exact, and within it the bucket's latencies are
taken as evenly spread, so the value is within that bucket's width of the exact
percentile (a few percent, typically).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import asyncpg

# group key -> SQL expression over usage_records (fixed text, never user input)
GROUP_KEYS: dict[str, str] = {
    "org_id": "org_id",
    "app_id": "app_id",
    "key_id": "key_id",
    "environment": "environment",
    "model": "model",
    "provider": "provider",
    "deployment": "deployment",
    "decision": "decision",
    "hour": "date_trunc('hour', created_at, 'UTC')",
    "day": "date_trunc('day', created_at, 'UTC')",
    "status_class": "((status_code / 100)::text || 'xx')",  # '2xx', '4xx', ...
}
TIME_KEYS = frozenset({"hour", "day"})
MAX_LIMIT = 100_000

# The same keys over the rollup tables (whose ``bucket`` is the UTC hour, day or week).
_HOURLY_KEYS = {**{k: k for k in GROUP_KEYS}, "hour": "bucket"}
_HOURLY_KEYS["day"] = "date_trunc('day', bucket, 'UTC')"
_DAILY_KEYS = {**{k: k for k in GROUP_KEYS}, "day": "bucket"}
del _DAILY_KEYS["hour"]  # a day's totals have no hours: grouping by hour reads hourly
_WEEKLY_KEYS = {k: v for k, v in _DAILY_KEYS.items() if k != "day"}

# The latency histogram (usage_latency_bucket, usage_latency_unit in the schema).
BUCKETS_PER_DOUBLING = 4
LAST_BUCKET = 81  # 2^20 ms and over
_FIELD_DIGITS = 16  # one bucket's count per 16 decimal digits of the packed histogram
_EMPTY_FIELD = "0" * _FIELD_DIGITS
_FIELDS = re.compile(f"[0-9]{{{_FIELD_DIGITS}}}")
# 4 / ln(2), written as in usage_latency_bucket: the same double, so a latency on a
# bucket's edge falls on the same side here and there.
_BUCKETS_PER_LN = 5.770780163555854
P95 = 0.95

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)  # from Monday 00:00 UTC, as date_trunc('week', ...) counts
ZERO = timedelta(0)
_UNITS: dict[str, timedelta] = {"hourly": HOUR, "daily": DAY, "weekly": WEEK}

# The rollup levels, smallest first: the group keys each has, and its time buckets
# (schema 0007: usage_rollup_{org_,app_,}{hourly,daily}, usage_rollup_weekly). A query
# reads the first level that has every key it groups and filters by.
Level = Literal["org", "app", "full"]
Grain = Literal["hourly", "daily", "weekly"]
LEVELS: dict[Level, tuple[frozenset[str], tuple[Grain, ...]]] = {
    "org": (frozenset({"org_id", "hour", "day"}), ("hourly", "daily")),
    "app": (
        frozenset({"org_id", "app_id", "model", "provider", "hour", "day"}),
        ("hourly", "daily"),
    ),
    "full": (frozenset(GROUP_KEYS), ("hourly", "daily", "weekly")),
}
_ROLLUP_TABLES = (
    *(
        f"usage_rollup_{'' if level == 'full' else level + '_'}{grain}"
        for level, (_, grains) in LEVELS.items()
        for grain in grains
    ),
    "usage_rollup_pending",
)

# Each part of a range yields these partial sums (name, expression); the outer query
# adds them up. A part that is subtracted yields them negated.
_RAW_MEASURES: tuple[tuple[str, str], ...] = (
    ("requests", "count(*)"),
    ("prompt_tokens", "sum(prompt_tokens)"),
    ("completion_tokens", "sum(completion_tokens)"),
    ("total_tokens", "sum(total_tokens)"),
    ("cached_tokens", "sum(cached_tokens)"),
    ("cache_creation_tokens", "sum(cache_creation_tokens)"),
    ("reasoning_tokens", "sum(reasoning_tokens)"),
    ("cost_usd", "sum(cost_usd)"),
    ("cost_rows", "count(cost_usd)"),
    ("estimated_rows", "count(*) FILTER (WHERE tokens_estimated)"),
    ("errors", "count(*) FILTER (WHERE decision = 'error')"),
    ("denied", "count(*) FILTER (WHERE decision = 'denied')"),
    ("latency_rows", "count(usage_latency(latency_ms))"),
    ("latency_sum_ms", "sum(usage_latency(latency_ms)::numeric)"),
    (
        "latency_histogram",
        "count(usage_latency(latency_ms)) * usage_latency_unit(usage_latency_bucket(latency_ms))",
    ),
)
_PENDING_MEASURES: tuple[tuple[str, str], ...] = (
    ("requests", "sum(weight)"),
    ("prompt_tokens", "sum(weight * prompt_tokens)"),
    ("completion_tokens", "sum(weight * completion_tokens)"),
    ("total_tokens", "sum(weight * total_tokens)"),
    ("cached_tokens", "sum(weight * cached_tokens)"),
    ("cache_creation_tokens", "sum(weight * cache_creation_tokens)"),
    ("reasoning_tokens", "sum(weight * reasoning_tokens)"),
    ("cost_usd", "sum(weight * cost_usd)"),
    ("cost_rows", "sum(weight) FILTER (WHERE cost_usd IS NOT NULL)"),
    ("estimated_rows", "sum(weight) FILTER (WHERE tokens_estimated)"),
    ("errors", "sum(weight) FILTER (WHERE decision = 'error')"),
    ("denied", "sum(weight) FILTER (WHERE decision = 'denied')"),
    ("latency_rows", "sum(weight) FILTER (WHERE usage_latency(latency_ms) IS NOT NULL)"),
    ("latency_sum_ms", "sum(weight * usage_latency(latency_ms)::numeric)"),
    (
        "latency_histogram",
        "sum(weight) FILTER (WHERE usage_latency(latency_ms) IS NOT NULL)"
        " * usage_latency_unit(usage_latency_bucket(latency_ms))",
    ),
)
# The rollup tables' measure columns, summed.
_ROLLUP_MEASURES: tuple[tuple[str, str], ...] = tuple(
    (name, f"sum({name})") for name, _ in _RAW_MEASURES
)
_TOTALS = """
    coalesce(sum(requests), 0)::bigint AS requests,
    coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
    coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
    coalesce(sum(total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(cached_tokens), 0)::bigint AS cached_tokens,
    coalesce(sum(cache_creation_tokens), 0)::bigint AS cache_creation_tokens,
    coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens,
    CASE WHEN sum(cost_rows) > 0 THEN sum(cost_usd) END AS cost_usd,
    coalesce(sum(estimated_rows), 0)::bigint AS estimated_rows,
    coalesce(sum(errors), 0)::bigint AS errors,
    coalesce(sum(denied), 0)::bigint AS denied,
    (sum(latency_sum_ms) / nullif(sum(latency_rows), 0))::float8 AS avg_latency_ms,
    sum(latency_histogram)::text AS latency_histogram
"""
# Before migration 0007 (no rollup tables): everything from the rows, p95 exact.
_LEGACY_TOTALS = """
    count(*) AS requests,
    coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
    coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
    coalesce(sum(total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(cached_tokens), 0)::bigint AS cached_tokens,
    coalesce(sum(cache_creation_tokens), 0)::bigint AS cache_creation_tokens,
    coalesce(sum(reasoning_tokens), 0)::bigint AS reasoning_tokens,
    sum(cost_usd) AS cost_usd,
    count(*) FILTER (WHERE tokens_estimated) AS estimated_rows,
    count(*) FILTER (WHERE decision = 'error') AS errors,
    count(*) FILTER (WHERE decision = 'denied') AS denied,
    avg(latency_ms) AS avg_latency_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms
"""


@dataclass(frozen=True, slots=True)
class RollupRow:
    keys: dict[str, Any]  # group key -> value (str | None; datetime for hour/day)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int  # prompt tokens read from the provider's cache (part of prompt)
    cache_creation_tokens: int  # prompt tokens written to it (part of prompt)
    reasoning_tokens: int  # part of completion
    cost_usd: Decimal | None  # exact; None when no row of the group has a cost
    estimated_rows: int  # rows whose tokens the gateway estimated
    errors: int
    denied: int
    avg_latency_ms: float | None  # None when no row of the group has a latency
    p95_latency_ms: float | None  # from the latency histogram (see the module's doc)

    def as_dict(self) -> dict[str, Any]:
        """Keys and measures flat, datetimes as ISO strings, cost as a decimal string
        (for JSON)."""
        out: dict[str, Any] = {
            k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.keys.items()
        }
        for name in _MEASURES:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Decimal) else value
        return out


# The measures, in column order: every field but the group keys (named as in _TOTALS).
_MEASURES: tuple[str, ...] = tuple(f.name for f in fields(RollupRow) if f.name != "keys")
_SQL_MEASURES: tuple[str, ...] = _MEASURES[: _MEASURES.index("p95_latency_ms")]


def validate_group_by(group_by: Sequence[str]) -> list[str]:
    """``group_by`` as a list, or ValueError naming the allowed keys."""
    if isinstance(group_by, str):
        raise ValueError("group_by must be a sequence of key names, not one string")
    unknown = [key for key in group_by if key not in GROUP_KEYS]
    if unknown:
        raise ValueError(
            f"unknown group_by key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(GROUP_KEYS)}"
        )
    if len(set(group_by)) != len(group_by):
        raise ValueError(f"group_by lists a key twice: {', '.join(group_by)}")
    return list(group_by)


# --- the latency histogram ---


def latency_bucket(ms: float) -> int:
    """The histogram bucket of a latency, as ``usage_latency_bucket`` computes it."""
    if ms < 1:
        return 0
    return min(1 + _floor_log(ms), LAST_BUCKET)


def _floor_log(ms: float) -> int:
    return math.floor(math.log(ms) * _BUCKETS_PER_LN)


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """The latencies (ms) bucket ``bucket`` holds: [low, high); high is inf for the last."""
    if bucket == 0:
        return 0.0, 1.0
    low = 2.0 ** ((bucket - 1) / BUCKETS_PER_DOUBLING)
    if bucket >= LAST_BUCKET:
        return low, float("inf")
    return low, 2.0 ** (bucket / BUCKETS_PER_DOUBLING)


def unpack_histogram(packed: str | Decimal | int | None) -> list[int]:
    """Bucket counts (index = bucket) of a packed histogram (``usage_latency_unit``), as
    Postgres writes it (the rollup query sends it as text) or as a number."""
    if packed is None:
        return []
    # Sliced from the decimal digits: repeated divmod, or int(), on a number of hundreds
    # of digits costs ~0.1-0.2 ms (an answer by hour over 30 days has 720 of them).
    if isinstance(packed, str):
        digits = packed.strip()
    elif isinstance(packed, Decimal):
        digits = format(packed, "f")
    else:
        digits = str(packed)
    if digits.startswith("-"):
        raise ValueError(f"a latency histogram cannot be negative: {packed}")
    if not digits.isdigit():
        raise ValueError(f"a latency histogram is a whole number: {packed}")
    digits = digits.lstrip("0")
    width = -(-len(digits) // _FIELD_DIGITS) * _FIELD_DIGITS
    fields = _FIELDS.findall(digits.zfill(width))
    return [0 if field == _EMPTY_FIELD else int(field) for field in reversed(fields)]


def histogram_percentile(counts: Sequence[int], q: float = P95) -> float | None:
    """The ``q`` quantile of the latencies a histogram counts, as ``percentile_cont``
    would give it if each bucket's latencies were evenly spread over the bucket: the
    estimates of the two ranks around ``q * (n - 1)``, interpolated linearly."""
    total = sum(counts)
    if total == 0:
        return None
    position = q * (total - 1)  # 0-based rank among the sorted latencies
    below = math.floor(position)
    low_value = _rank_estimate(counts, below)
    if position == below:
        return low_value
    high_value = _rank_estimate(counts, below + 1)
    return low_value + (position - below) * (high_value - low_value)


def _rank_estimate(counts: Sequence[int], rank: int) -> float:
    """The latency of 0-based ``rank``: the middle of its slice of its bucket (the
    bucket's ``count`` latencies spread evenly); the last bucket, unbounded, gives its
    floor."""
    before = 0
    for bucket, count in enumerate(counts):
        if count and rank < before + count:
            low, high = bucket_bounds(bucket)
            if high == float("inf"):
                return low
            return low + (rank - before + 0.5) / count * (high - low)
        before += count
    return bucket_bounds(len(counts) - 1)[0]


# --- which table answers which part of a range ---

Source = Literal["raw", "pending", "hourly", "daily", "weekly"]


@dataclass(frozen=True, slots=True)
class Part:
    source: Source
    since: datetime | None  # None: unbounded
    until: datetime | None
    sign: int = 1  # -1: subtracted (rows of a bucket read whole that are outside the range)


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken as UTC (as Postgres takes it)."""
    return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _floor(moment: datetime, unit: timedelta) -> datetime:
    floor = _utc(moment).replace(minute=0, second=0, microsecond=0)
    if unit == HOUR:
        return floor
    floor = floor.replace(hour=0)
    return floor - timedelta(days=floor.weekday()) if unit == WEEK else floor


def _ceil(moment: datetime, unit: timedelta) -> datetime:
    floor = _floor(moment, unit)
    return floor if floor == _utc(moment) else floor + unit


def _past(lo: datetime, hi: datetime, now: datetime) -> timedelta:
    """How much of the span between ``lo`` and ``hi`` (either order) lies before ``now``:
    what reading it costs (there are no rows of the future to read)."""
    lo, hi = min(lo, hi), max(lo, hi)
    return max(min(hi, now) - lo, timedelta(0))


def _edges(
    since: datetime | None, until: datetime | None, unit: timedelta, now: datetime
) -> tuple[datetime | None, datetime | None, timedelta]:
    """The bucket boundaries (``unit``) nearest to ``since`` and ``until`` with the least
    time between them and the ends to read from a finer source, and that time; None
    boundaries for unbounded ends. ``since`` is not before ``until``'s boundary when no
    pair leaves a bucket between them: then (None, None, timedelta.max)."""
    starts = [None] if since is None else [_ceil(since, unit), _floor(since, unit)]
    ends = [None] if until is None else [_floor(until, unit), _ceil(until, unit)]
    best: tuple[datetime | None, datetime | None, timedelta] = (None, None, timedelta.max)
    for lo in starts:
        for hi in ends:
            if lo is not None and hi is not None and lo >= hi:
                continue
            cost = (_past(since, lo, now) if since is not None and lo is not None else ZERO) + (
                _past(hi, until, now) if until is not None and hi is not None else ZERO
            )
            if cost < best[2]:  # ties: the first, inside the range
                best = (lo, hi, cost)
    return best


def _between(
    source: Source, outer: datetime | None, inner: datetime | None, *, start: bool
) -> list[Part]:
    """The part that turns a read ending at bucket boundary ``outer`` into one ending at
    ``inner`` (the range's own end, or a boundary of finer buckets): added when
    ``inner`` lies outside ``outer`` (more is wanted), subtracted when inside."""
    if outer is None or inner is None or outer == inner:
        return []
    lo, hi = min(outer, inner), max(outer, inner)
    wanted = inner < outer if start else inner > outer
    return [Part(source, lo, hi, 1 if wanted else -1)]


def plan_parts(
    since: datetime | None,
    until: datetime | None,
    *,
    grains: Sequence[Grain] = ("hourly", "daily"),
    now: datetime | None = None,
) -> list[Part]:
    """The reads that add up to ``[since, until)`` (None: unbounded), each a span of one
    source with a sign, using the rollups of ``grains`` (finest first, hourly always).

    Each rollup is read in whole buckets from the boundary nearest to each end of what
    it covers, and the difference to that end comes from the next finer source: added
    when the boundary falls inside, subtracted when outside. So ``--since 30d`` at 10:17
    reads the hour 10:00-11:00 whole and subtracts the rows of 10:00-10:17 rather than
    reading the 43 minutes after it; days are read whole the same way, corrected by at
    most 12 hours of the hourly rollup each end, and weeks by at most 3.5 days of the
    daily one. A range ending now ends at the next boundary, past which nothing has
    happened yet (``now``: when that is; only the cost depends on it, never the
    answer). The changes not folded yet count for every whole hour read. A coarser
    grain is used only when what it needs correcting is shorter than what it replaces;
    a range shorter than what the hourly rollup would need correcting: the rows alone.
    """
    now = _utc(now) if now is not None else datetime.now(UTC)
    since = _utc(since) if since is not None else None
    until = _utc(until) if until is not None else None
    lo, hi, correction = _edges(since, until, HOUR, now)
    if since is not None and until is not None and correction >= _past(since, until, now):
        return [Part("raw", since, until)]  # not worth a rollup read (or not one hour)
    parts = _between("raw", lo, since, start=True)
    parts += _between("raw", hi, until, start=False)
    parts.append(Part("pending", lo, hi))
    source: Source = "hourly"
    for grain in grains[1:]:
        coarse_lo, coarse_hi, correction = _edges(lo, hi, _UNITS[grain], now)
        if correction == timedelta.max or (
            lo is not None and hi is not None and correction >= _past(lo, hi, now)
        ):
            break
        parts += _between(source, coarse_lo, lo, start=True)
        parts += _between(source, coarse_hi, hi, start=False)
        lo, hi, source = coarse_lo, coarse_hi, grain
    parts.append(Part(source, lo, hi))
    return parts


def rollup_level(keys: Sequence[str], filters: dict[str, str | None]) -> Level:
    """The smallest rollups that have every key of the grouping and the filters."""
    needed = set(keys) | {column for column, value in filters.items() if value is not None}
    return next(level for level, (has, _) in LEVELS.items() if needed <= has)


def rollup_grains(keys: Sequence[str], level: Level) -> tuple[Grain, ...]:
    """The time buckets of ``level`` a grouping can read: hours only when grouped by
    hour, no weeks when grouped by day."""
    grains = LEVELS[level][1]
    if "hour" in keys:
        return ("hourly",)
    return tuple(g for g in grains if g != "weekly") if "day" in keys else grains


def _rollup_table(grain: str, level: Level) -> str:
    return f"usage_rollup_{'' if level == 'full' else level + '_'}{grain}"


_KEY_EXPRS: dict[str, dict[str, str]] = {
    "hourly": _HOURLY_KEYS,
    "daily": _DAILY_KEYS,
    "weekly": _WEEKLY_KEYS,
}


def _build_query(
    keys: list[str],
    *,
    since: datetime | None,
    until: datetime | None,
    filters: dict[str, str | None],
    limit: int,
    rollups: bool = True,
    parts: Sequence[Part] | None = None,
    level: Level | None = None,
    now: datetime | None = None,
) -> tuple[str, list[Any]]:
    """The query and its parameters; ``parts`` replaces the plan and ``level`` the choice
    of rollups (tests and benchmarks compare each way's answer with the rows' own)."""
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    def where(time_column: str, lo: datetime | None, hi: datetime | None) -> str:
        conditions = []
        if lo is not None:
            conditions.append(f"{time_column} >= {param(lo)}")
        if hi is not None:
            conditions.append(f"{time_column} < {param(hi)}")
        conditions += [f"{column} = {param(v)}" for column, v in filters.items() if v is not None]
        return " WHERE " + " AND ".join(conditions) if conditions else ""

    def signed(measures: tuple[tuple[str, str], ...], sign: int) -> str:
        return ",\n    ".join(
            f"{expr} AS {name}" if sign > 0 else f"-({expr}) AS {name}" for name, expr in measures
        )

    if not rollups:
        select = [f"{GROUP_KEYS[k]} AS {k}" for k in keys]
        sql = f"SELECT {', '.join([*select, _LEGACY_TOTALS])} FROM usage_records"
        sql += where("created_at", since, until)
    else:
        members = []
        if level is None:
            level = rollup_level(keys, filters)
        if parts is None:
            parts = plan_parts(since, until, grains=rollup_grains(keys, level), now=now)
        for part in parts:
            if part.source in ("raw", "pending"):
                table, measures = (
                    ("usage_records", _RAW_MEASURES)
                    if part.source == "raw"
                    else ("usage_rollup_pending", _PENDING_MEASURES)
                )
                select = [f"{GROUP_KEYS[k]} AS {k}" for k in keys]
                grouping = [GROUP_KEYS[k] for k in keys] + ["usage_latency_bucket(latency_ms)"]
                members.append(
                    f"SELECT {', '.join([*select, signed(measures, part.sign)])} FROM {table}"
                    + where("created_at", part.since, part.until)
                    + f" GROUP BY {', '.join(grouping)}"
                )
            else:
                # Each part totals its own groups first: a big part aggregates in
                # parallel workers, and the outer query adds a few rows per group.
                exprs = _KEY_EXPRS[part.source]
                select = [f"{exprs[k]} AS {k}" for k in keys]
                member = (
                    f"SELECT {', '.join([*select, signed(_ROLLUP_MEASURES, part.sign)])} "
                    f"FROM {_rollup_table(part.source, level)}"
                    + where("bucket", part.since, part.until)
                )
                if keys:
                    member += f" GROUP BY {', '.join(exprs[k] for k in keys)}"
                members.append(member)
        union = "\n    UNION ALL\n    ".join(members)
        sql = f"SELECT {', '.join([*keys, _TOTALS])} FROM (\n    {union}\n) parts"
    if keys:
        positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
        # Time buckets in order; within one, the biggest consumers first; then the keys
        # themselves so equal totals come out in a stable order.
        order = [f"{k} ASC" for k in keys if k in TIME_KEYS]
        order += ["total_tokens DESC", "requests DESC"]
        order += [f"{k} ASC NULLS LAST" for k in keys if k not in TIME_KEYS]
        sql += f" GROUP BY {positions}"
        if rollups:  # a group whose rows all moved to another group nets to nothing
            sql += " HAVING sum(requests) > 0"
        sql += f" ORDER BY {', '.join(order)}"
    sql += f" LIMIT {param(limit)}"
    return sql, params


async def has_rollups(pool: asyncpg.Pool | asyncpg.Connection) -> bool:
    """Whether the database has the rollup tables (migration 0007)."""
    found = await pool.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL",
        list(_ROLLUP_TABLES),
    )
    return bool(found == len(_ROLLUP_TABLES))


async def _fetch_without_jit(
    pool: asyncpg.Pool | asyncpg.Connection, sql: str, params: list[Any]
) -> list[asyncpg.Record]:
    """The query's rows, with JIT compilation off: over 50 million rows Postgres
    estimated a 30-day query above jit_above_cost and spent 300 ms of its 700 compiling
    the expressions of a few tens of thousands of rollup rows."""
    if isinstance(pool, asyncpg.Pool):
        async with pool.acquire() as conn:
            return await _fetch_without_jit(conn, sql, params)
    if not isinstance(pool, asyncpg.Connection):  # a stand-in that only answers fetch()
        return list(await pool.fetch(sql, *params))
    async with pool.transaction():
        await pool.execute("SET LOCAL jit = off")
        return list(await pool.fetch(sql, *params))


async def rollup(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    group_by: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
    org_id: str | None = None,
    app_id: str | None = None,
    model: str | None = None,
    limit: int = 1000,
) -> list[RollupRow]:
    """Usage totals per group over ``[since, until)``, optionally for one org/app/model.

    An empty ``group_by`` gives one row of grand totals.
    """
    keys = validate_group_by(group_by)
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if since is not None and until is not None and since >= until:
        raise ValueError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    rollups = await has_rollups(pool)
    sql, params = _build_query(
        keys,
        since=since,
        until=until,
        filters={"org_id": org_id, "app_id": app_id, "model": model},
        limit=limit,
        rollups=rollups,
    )
    rows = await (_fetch_without_jit(pool, sql, params) if rollups else pool.fetch(sql, *params))
    return [
        RollupRow(
            keys={k: row[k] for k in keys},
            **{m: row[m] for m in _SQL_MEASURES},
            p95_latency_ms=row["p95_latency_ms"]
            if not rollups
            else histogram_percentile(unpack_histogram(row["latency_histogram"])),
        )
        for row in rows
    ]


# --- text table ---

_HEADERS = {
    "requests": "requests",
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "total_tokens": "total",
    "cached_tokens": "cached",
    "cache_creation_tokens": "cache-write",
    "reasoning_tokens": "reasoning",
    "cost_usd": "cost_usd",
    "estimated_rows": "estimated",
    "errors": "errors",
    "denied": "denied",
    "avg_latency_ms": "avg ms",
    "p95_latency_ms": "p95 ms",
}
# Averages and percentiles do not add up across groups: the totals line leaves them blank.
_SUMMED: tuple[str, ...] = tuple(
    m for m in _MEASURES if m not in ("avg_latency_ms", "p95_latency_ms")
)


def _format_key(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d") if key == "day" else value.strftime("%Y-%m-%d %H:00Z")
    return str(value)


def _format_measure(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value:,.6f}"  # dollars to the micro-dollar; JSON keeps every digit
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


def _total(values: list[Any]) -> Any:
    """The sum of the known values; None when none is known (a cost no row has)."""
    known = [v for v in values if v is not None]
    return sum(known) if known or not values else None


def format_table(rows: Sequence[RollupRow], group_by: Sequence[str]) -> str:
    """An aligned text table: a header, one line per row, a totals line.

    The totals line sums the counts over the rows shown; averages and percentiles do
    not add up across groups, so it leaves them blank.
    """
    keys = validate_group_by(group_by)
    header = [*keys, *_HEADERS.values()]
    body = [
        [_format_key(k, row.keys.get(k)) for k in keys]
        + [_format_measure(getattr(row, m)) for m in _HEADERS]
        for row in rows
    ]
    totals = {m: _total([getattr(row, m) for row in rows]) for m in _SUMMED}
    label = ["total"] + [""] * (len(keys) - 1) if keys else []
    total_line = label + [_format_measure(totals[m]) if m in totals else "" for m in _HEADERS]

    widths = [len(h) for h in header]
    for line in [*body, total_line]:
        widths = [max(w, len(cell)) for w, cell in zip(widths, line, strict=True)]

    def render(cells: list[str]) -> str:
        out = [
            cell.ljust(width) if i < len(keys) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [render(header), rule, *(render(line) for line in body), rule, render(total_line)]
    return "\n".join(lines)
