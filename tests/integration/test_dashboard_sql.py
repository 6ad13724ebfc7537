"""The Grafana dashboard's PostgreSQL queries (cost by application and model, budget
burn), run against the real schema: every migration applied, a catalog with budget
policies applied from a gateway.yaml, and usage rows whose sums are known.

Grafana's macros are expanded here as its PostgreSQL data source expands them
(``$__timeFilter``, ``$__timeGroupAlias``, ``$__interval``), so a renamed column, a
wrong join or a type error fails here rather than on an SRE's screen.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.integration.test_deploy import dashboard_sql


@pytest.fixture
def gateway_yaml() -> str:
    return """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
models:
  gpt-4o-mini: {provider: mock}
policies:
  monthly: {type: budget, usd: 10, period: month}
  daily:   {type: budget, usd: 1, period: day}
  weekly-org: {type: budget, usd: 100, window: 7d, scope: org}
  per-minute: {type: rate_limit, requests: 60, window: 60s}
applications:
  app-a: {org: acme, policies: [monthly, weekly-org, per-minute]}
  app-b: {org: acme, policies: [daily]}
  app-c: {org: other}
"""


def expand_macros(sql: str) -> str:
    """Grafana's PostgreSQL macros, as its data source expands them, for a 6 h range
    ending now (taken when the query is expanded, not when the module was imported) and
    a 1 minute interval."""
    range_from = datetime.now(UTC) - timedelta(hours=6)
    range_to = datetime.now(UTC) + timedelta(minutes=5)
    sql = sql.replace("$__interval", "'1m'")
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*'1m'\)",
        r'floor(extract(epoch from \1)/60)*60 AS "time"',
        sql,
    )
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        rf"\1 BETWEEN '{range_from.isoformat()}' AND '{range_to.isoformat()}'",
        sql,
    )
    assert "$" not in sql, f"a macro left unexpanded: {sql}"
    return sql


async def _row(
    pool: asyncpg.Pool,
    *,
    app: str,
    org: str,
    cost: str | None,
    ago: timedelta,
    decision: str = "allowed",
) -> None:
    await pool.execute(
        "INSERT INTO usage_records (request_id, created_at, org_id, app_id, endpoint, model,"
        " provider, status_code, decision, prompt_tokens, completion_tokens, total_tokens,"
        " cost_usd) VALUES ($1, $2, $3, $4, '/v1/chat/completions', 'gpt-4o-mini', 'mock',"
        " 200, $5, 10, 5, 15, $6)",
        uuid.uuid4().hex,
        datetime.now(UTC) - ago,
        org,
        app,
        decision,
        None if cost is None else Decimal(cost),
    )


@pytest.fixture
async def seeded(pool: asyncpg.Pool) -> asyncpg.Pool:
    now = timedelta(seconds=1)
    await _row(pool, app="app-a", org="acme", cost="2.5", ago=now)
    await _row(pool, app="app-a", org="acme", cost="1.0", ago=timedelta(days=40))  # last month
    await _row(pool, app="app-b", org="acme", cost="0.5", ago=now)
    await _row(pool, app="app-b", org="acme", cost="0.25", ago=timedelta(days=2))  # not today
    await _row(pool, app="app-b", org="acme", cost=None, ago=now)  # a model without a price
    await _row(pool, app="app-c", org="other", cost="7", ago=now)
    return pool


async def _run(pool: asyncpg.Pool, title: str) -> list[dict[str, Any]]:
    (sql,) = [s for t, _, s in dashboard_sql() if t == title]
    return [dict(r) for r in await pool.fetch(expand_macros(sql))]


def test_the_dashboard_has_cost_and_budget_queries() -> None:
    titles = {title for title, _, _ in dashboard_sql()}
    assert {
        "Cost by application (USD per interval)",
        "Cost by model (USD per interval)",
        "Cost in the time range by application and model",
        "Budget burn (budget policies, current window)",
    } <= titles


async def test_every_dashboard_query_runs_on_the_schema(seeded: asyncpg.Pool) -> None:
    for title, fmt, sql in dashboard_sql():
        rows = await seeded.fetch(expand_macros(sql))
        assert rows, f"{title}: no rows for the seeded usage"
        if fmt == "time_series":  # Grafana's long format: time, metric, value
            assert list(rows[0].keys()) == ["time", "metric", "value"], title


async def test_cost_by_application_and_model(seeded: asyncpg.Pool) -> None:
    rows = await _run(seeded, "Cost in the time range by application and model")
    by_app = {r["application"]: r for r in rows}
    # In the 6 h range only: the 2- and 40-day-old rows are outside it.
    assert by_app["app-a"]["cost_usd"] == Decimal("2.5")
    assert by_app["app-b"]["cost_usd"] == Decimal("0.5")
    assert by_app["app-b"]["unpriced"] == 1 and by_app["app-b"]["requests"] == 2
    assert rows[0]["application"] == "app-c"  # the costliest first
    series = await _run(seeded, "Cost by application (USD per interval)")
    assert sum(r["value"] for r in series if r["metric"] == "app-a") == Decimal("2.5")


async def test_budget_burn_per_policy_window_and_scope(seeded: asyncpg.Pool) -> None:
    rows = {
        (r["policy"], r["application"]): r
        for r in await _run(seeded, "Budget burn (budget policies, current window)")
    }
    assert set(rows) == {("monthly", "app-a"), ("weekly-org", "app-a"), ("daily", "app-b")}
    monthly = rows["monthly", "app-a"]  # this calendar month: not the 40-day-old row
    assert (monthly["spent_usd"], monthly["budget_usd"]) == (Decimal("2.5"), Decimal("10"))
    assert monthly["burn_percent"] == Decimal("25.0")
    assert rows["daily", "app-b"]["spent_usd"] == Decimal("0.5")  # today only
    # scope org, rolling 7 days: every application of the org (a and b), 2 days ago too.
    weekly = rows["weekly-org", "app-a"]
    assert weekly["scope"] == "org"
    assert weekly["spent_usd"] == Decimal("3.25")
    assert weekly["window_start"] < datetime.now(UTC) - timedelta(days=6)
