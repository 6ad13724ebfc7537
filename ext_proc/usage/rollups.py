"""Usage rollups: totals of ``usage_records`` grouped by org, app, key, environment,
model, provider, deployment, decision and hour/day, over a time range (the admin API and
``ext-proc usage``).

Only identifiers from the fixed ``GROUP_KEYS`` table reach the SQL text; every value
(times, filters, limit) is a query parameter. Hours and days are UTC buckets.

``cost_usd`` is summed exactly (``numeric``) over the rows that have a cost; it is None
for a group none of whose rows has one (models without a price, requests denied before
routing). As JSON it is a string (``"0.0123450000"``): a JSON number would go through a
double.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

# group key -> SQL expression (fixed text, never user input)
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
}
TIME_KEYS = frozenset({"hour", "day"})
MAX_LIMIT = 100_000

_AGGREGATES = """
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
    p95_latency_ms: float | None

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


# The measures, in column order: every field but the group keys (named as in _AGGREGATES).
_MEASURES: tuple[str, ...] = tuple(f.name for f in fields(RollupRow) if f.name != "keys")


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


def _build_query(
    keys: list[str],
    *,
    since: datetime | None,
    until: datetime | None,
    filters: dict[str, str | None],
    limit: int,
) -> tuple[str, list[Any]]:
    params: list[Any] = []
    where: list[str] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if since is not None:
        where.append(f"created_at >= {param(since)}")
    if until is not None:
        where.append(f"created_at < {param(until)}")
    for column, value in filters.items():
        if value is not None:
            where.append(f"{column} = {param(value)}")

    select = [f"{GROUP_KEYS[k]} AS {k}" for k in keys]
    sql = f"SELECT {', '.join([*select, _AGGREGATES])} FROM usage_records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if keys:
        positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
        # Time buckets in order; within one, the biggest consumers first; then the keys
        # themselves so equal totals come out in a stable order.
        order = [f"{k} ASC" for k in keys if k in TIME_KEYS]
        order += ["total_tokens DESC", "requests DESC"]
        order += [f"{k} ASC NULLS LAST" for k in keys if k not in TIME_KEYS]
        sql += f" GROUP BY {positions} ORDER BY {', '.join(order)}"
    sql += f" LIMIT {param(limit)}"
    return sql, params


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
    sql, params = _build_query(
        keys,
        since=since,
        until=until,
        filters={"org_id": org_id, "app_id": app_id, "model": model},
        limit=limit,
    )
    rows = await pool.fetch(sql, *params)
    return [
        RollupRow(keys={k: row[k] for k in keys}, **{m: row[m] for m in _MEASURES}) for row in rows
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
