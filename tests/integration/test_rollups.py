"""Usage rollups and ``ext-proc usage`` against the real Postgres."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest

from ext_proc.admin.app import create_app
from ext_proc.stores.postgres import create_pool, migrate
from ext_proc.usage.cli import add_usage_arguments, parse_time, run_usage
from ext_proc.usage.record import COLUMNS, UsageRecord, record_row
from ext_proc.usage.rollups import RollupRow, format_table, rollup

pytestmark = pytest.mark.integration

DAY1 = datetime(2025, 5, 1, tzinfo=UTC)
DAY2 = datetime(2025, 5, 2, tzinfo=UTC)
_INSERT = (
    f"INSERT INTO usage_records ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
)


def _records() -> list[UsageRecord]:
    # acme / support-bot / gpt-4o-mini: 100 requests on day 1, 10:00-10:59 UTC,
    # latencies 1..100 ms, 10 prompt + 5 completion tokens each, $0.0000045 each; half
    # of them with 4 cached tokens, through two keys (key_a: even, key_b: odd), in prod.
    bot = [
        UsageRecord(
            request_id=f"a-{i}",
            created_at=DAY1 + timedelta(hours=10, seconds=30 * i),
            org_id="acme",
            app_id="support-bot",
            key_id="key_a" if i % 2 == 0 else "key_b",
            environment="prod",
            model="gpt-4o-mini",
            provider="azure-eastus",
            deployment="gpt-4o-mini-prod",
            prompt_tokens=10,
            completion_tokens=5,
            total_tokens=15,
            cached_tokens=4 if i % 2 == 0 else 0,
            tokens_estimated=i < 3,
            latency_ms=float(i + 1),
            cost_usd=Decimal("0.0000045"),
        )
        for i in range(100)
    ]
    # acme / search / gpt-4.1: 10 requests at 11:xx on day 1; 2 denied (no tokens, no
    # latency, no cost), 1 error; prompt 100, completion 50 of which 20 reasoning,
    # $0.0007 each (the error too: it was billed).
    decisions = ["denied", "denied", "error", *["allowed"] * 7]
    search = [
        UsageRecord(
            request_id=f"b-{i}",
            created_at=DAY1 + timedelta(hours=11, minutes=i),
            org_id="acme",
            app_id="search",
            model="gpt-4.1",
            provider="openai",
            deployment="gpt-4.1",
            decision=decision,  # type: ignore[arg-type]
            prompt_tokens=None if decision == "denied" else 100,
            completion_tokens=None if decision == "denied" else 50,
            total_tokens=None if decision == "denied" else 150,
            reasoning_tokens=None if decision == "denied" else 20,
            latency_ms=None if decision == "denied" else 200.0,
            cost_usd=None if decision == "denied" else Decimal("0.0007"),
        )
        for i, decision in enumerate(decisions)
    ]
    # globex / other / gpt-4o-mini: 5 requests on day 2, no latency known, a self-hosted
    # deployment without a price (no cost), 3 prompt tokens written to a cache each.
    other = [
        UsageRecord(
            request_id=f"c-{i}",
            created_at=DAY2 + timedelta(hours=3, minutes=i),
            org_id="globex",
            app_id="other",
            model="gpt-4o-mini",
            provider="azure-eastus",
            deployment="local-mini",
            prompt_tokens=1,
            completion_tokens=1,
            total_tokens=2,
            cache_creation_tokens=3,
        )
        for i in range(5)
    ]
    return bot + search + other


@pytest.fixture
async def seeded_url(database_url: str) -> str:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(_INSERT, [record_row(r) for r in _records()])
    finally:
        await conn.close()
    return database_url


@pytest.fixture
async def pool(seeded_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(seeded_url)
    yield pool
    await pool.close()


def _by(rows: list[RollupRow], *keys: str) -> dict[tuple[Any, ...], RollupRow]:
    return {tuple(row.keys[k] for k in keys): row for row in rows}


async def test_sums_counts_and_latency_percentiles_by_app_and_model(pool: asyncpg.Pool) -> None:
    rows = await rollup(pool, group_by=["app_id", "model"])
    assert [tuple(r.keys.values()) for r in rows] == [
        ("support-bot", "gpt-4o-mini"),  # most tokens first
        ("search", "gpt-4.1"),
        ("other", "gpt-4o-mini"),
    ]
    bot = _by(rows, "app_id", "model")[("support-bot", "gpt-4o-mini")]
    assert (bot.requests, bot.prompt_tokens, bot.completion_tokens, bot.total_tokens) == (
        100,
        1000,
        500,
        1500,
    )
    assert bot.estimated_rows == 3 and bot.errors == 0 and bot.denied == 0
    assert bot.avg_latency_ms == pytest.approx(50.5)
    # p95 from the latency histogram: within a bucket (19%) of percentile_cont of 1..100
    assert bot.p95_latency_ms == pytest.approx(95.05, rel=0.19)

    search = _by(rows, "app_id", "model")[("search", "gpt-4.1")]
    assert (search.requests, search.denied, search.errors) == (10, 2, 1)
    assert search.prompt_tokens == 800 and search.total_tokens == 1200  # NULLs add nothing
    assert search.avg_latency_ms == pytest.approx(200.0)

    other = _by(rows, "app_id", "model")[("other", "gpt-4o-mini")]
    assert other.avg_latency_ms is None and other.p95_latency_ms is None


async def test_sums_cost_exactly_and_cached_cache_write_and_reasoning_tokens(
    pool: asyncpg.Pool,
) -> None:
    rows = _by(await rollup(pool, group_by=["app_id"]), "app_id")
    bot, search, other = rows[("support-bot",)], rows[("search",)], rows[("other",)]
    assert bot.cost_usd == Decimal("0.00045")  # 100 x 0.0000045, no float drift
    assert isinstance(bot.cost_usd, Decimal)
    assert search.cost_usd == Decimal("0.0056")  # 8 billed x 0.0007; denied rows add nothing
    assert other.cost_usd is None  # no row of the group has a price: unknown, not $0
    assert (bot.cached_tokens, bot.cache_creation_tokens, bot.reasoning_tokens) == (200, 0, 0)
    assert (search.reasoning_tokens, other.cache_creation_tokens) == (160, 15)
    [total] = await rollup(pool, group_by=[])
    assert total.cost_usd == Decimal("0.00605")
    # As JSON the cost is a decimal string (every digit kept), tokens are integers.
    assert bot.as_dict()["cost_usd"] == "0.0004500000"
    assert other.as_dict()["cost_usd"] is None


async def test_grouping_by_key_environment_and_deployment(pool: asyncpg.Pool) -> None:
    keys = await rollup(pool, group_by=["key_id"], app_id="support-bot")
    assert {r.keys["key_id"]: (r.requests, r.cached_tokens, r.cost_usd) for r in keys} == {
        "key_a": (50, 200, Decimal("0.000225")),
        "key_b": (50, 0, Decimal("0.000225")),
    }
    environments = await rollup(pool, group_by=["environment"])
    assert {r.keys["environment"]: r.requests for r in environments} == {"prod": 100, None: 15}
    deployments = await rollup(pool, group_by=["provider", "deployment"])
    assert {(r.keys["provider"], r.keys["deployment"]): r.requests for r in deployments} == {
        ("azure-eastus", "gpt-4o-mini-prod"): 100,
        ("openai", "gpt-4.1"): 10,
        ("azure-eastus", "local-mini"): 5,
    }


async def test_grouping_by_hour_and_day_in_utc(pool: asyncpg.Pool) -> None:
    hours = await rollup(pool, group_by=["hour"])
    assert [(r.keys["hour"], r.requests) for r in hours] == [
        (DAY1 + timedelta(hours=10), 100),
        (DAY1 + timedelta(hours=11), 10),
        (DAY2 + timedelta(hours=3), 5),
    ]
    days = await rollup(pool, group_by=["day", "org_id"])
    assert [(r.keys["day"], r.keys["org_id"], r.requests, r.total_tokens) for r in days] == [
        (DAY1, "acme", 110, 2700),
        (DAY2, "globex", 5, 10),
    ]
    assert all(r.keys["day"].tzinfo is not None for r in days)
    totals = await rollup(pool, group_by=[])
    assert len(totals) == 1 and totals[0].requests == 115 and totals[0].keys == {}


async def test_filters_and_time_range(pool: asyncpg.Pool) -> None:
    acme = await rollup(pool, group_by=["org_id"], org_id="acme")
    assert [(r.keys["org_id"], r.requests) for r in acme] == [("acme", 110)]

    mini = await rollup(pool, group_by=["org_id", "provider"], model="gpt-4o-mini")
    assert {(r.keys["org_id"], r.keys["provider"]): r.requests for r in mini} == {
        ("acme", "azure-eastus"): 100,
        ("globex", "azure-eastus"): 5,
    }
    assert await rollup(pool, group_by=["app_id"], app_id="search", model="gpt-4o-mini") == []

    # until is exclusive, since inclusive: exactly the 11:00 hour of day 1.
    hour = await rollup(
        pool,
        group_by=["decision"],
        since=DAY1 + timedelta(hours=11),
        until=DAY1 + timedelta(hours=12),
    )
    assert {r.keys["decision"]: r.requests for r in hour} == {
        "allowed": 7,
        "denied": 2,
        "error": 1,
    }
    assert len(await rollup(pool, group_by=["app_id", "model"], limit=2)) == 2


async def test_filter_values_are_parameters_not_sql(pool: asyncpg.Pool) -> None:
    rows = await rollup(pool, group_by=["org_id"], org_id="acme' OR '1'='1")
    assert rows == []


async def test_invalid_arguments_are_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match=r"'org_id; DROP TABLE x'.*allowed: org_id, app_id"):
        await rollup(pool, group_by=["org_id; DROP TABLE x"])
    with pytest.raises(ValueError, match="twice"):
        await rollup(pool, group_by=["model", "model"])
    with pytest.raises(ValueError, match="sequence of key names"):
        await rollup(pool, group_by="model")
    with pytest.raises(ValueError, match="limit"):
        await rollup(pool, group_by=["model"], limit=0)
    with pytest.raises(ValueError, match="must be before"):
        await rollup(pool, group_by=["model"], since=DAY2, until=DAY1)


async def test_format_table_aligns_and_totals(pool: asyncpg.Pool) -> None:
    rows = await rollup(pool, group_by=["day", "app_id"])
    lines = format_table(rows, ["day", "app_id"]).splitlines()
    assert lines[0].split() == [
        "day",
        "app_id",
        "requests",
        "prompt",
        "completion",
        "total",
        "cached",
        "cache-write",
        "reasoning",
        "cost_usd",
        "estimated",
        "errors",
        "denied",
        "avg",
        "ms",
        "p95",
        "ms",
    ]
    assert lines[2].split()[:6] == ["2025-05-01", "support-bot", "100", "1,000", "500", "1,500"]
    assert lines[2].split()[-2:] == ["50.5", f"{rows[0].p95_latency_ms:.1f}"]  # one decimal
    assert lines[4].split()[:2] == ["2025-05-02", "other"]
    assert lines[4].split()[-2:] == ["-", "-"]  # no latency known
    assert lines[2].split()[9] == "0.000450"  # dollars, to the micro-dollar
    assert lines[4].split()[9] == "-"  # no cost known
    assert lines[-1].split() == [
        "total",
        "115",
        "1,805",
        "905",
        "2,710",
        "200",
        "15",
        "160",
        "0.006050",
        "3",
        "1",
        "2",
    ]
    # Columns line up: every line has the "requests" column ending at the same place.
    end = lines[0].index("requests") + len("requests")
    assert all(line[end - 1] != " " for line in lines[2:5])
    assert lines[1].startswith("----------")

    empty = format_table([], ["model"]).splitlines()
    assert empty[0].split()[0] == "model" and empty[-1].split() == ["total", *["0"] * 11]


# --- ext-proc usage ---


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ext-proc usage")
    add_usage_arguments(parser)
    return parser.parse_args(list(argv))


async def test_cli_prints_json(seeded_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _parse("--by", "org_id,day", "--since", "2025-05-01", "--until", "2025-05-03", "--json")
    assert await asyncio.to_thread(run_usage, ns, seeded_url) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["group_by"] == ["org_id", "day"]
    assert document["since"] == "2025-05-01T00:00:00+00:00"
    assert [(r["org_id"], r["day"], r["requests"]) for r in document["rows"]] == [
        ("acme", "2025-05-01T00:00:00+00:00", 110),
        ("globex", "2025-05-02T00:00:00+00:00", 5),
    ]
    # 8 of 108 latencies are 200: p95 is in 200's histogram bucket
    assert document["rows"][0]["p95_latency_ms"] == pytest.approx(200.0, rel=0.19)
    assert document["rows"][0]["cost_usd"] == "0.0060500000"  # exact, as a string
    assert document["rows"][1]["cost_usd"] is None


async def test_cli_prints_a_table_with_filters(
    seeded_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = _parse("--since", "2025-04-30", "--until", "2025-05-05", "--app", "search")
    assert ns.by == ["app_id", "model"]  # the default grouping
    assert await asyncio.to_thread(run_usage, ns, seeded_url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "usage from 2025-04-30 00:00 to 2025-05-05 00:00 UTC"
    assert out[3].split()[:3] == ["search", "gpt-4.1", "10"]
    assert out[-1].split()[:2] == ["total", "10"]


async def test_cli_default_window_is_the_last_24h(
    seeded_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await asyncio.to_thread(run_usage, _parse("--json"), seeded_url) == 0
    document = json.loads(capsys.readouterr().out)
    since = datetime.fromisoformat(document["since"])
    until = datetime.fromisoformat(document["until"])
    assert until - since == timedelta(hours=24)
    assert document["rows"] == []  # the seeded rows are from 2025


async def test_cli_unmigrated_or_unreachable_database_exits_2(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await asyncio.to_thread(run_usage, _parse(), database_url) == 2
    assert "run `ext-proc migrate`" in capsys.readouterr().err

    closed = "postgresql://postgres:hunter2@127.0.0.1:1/nowhere"
    assert await asyncio.to_thread(run_usage, _parse(), closed) == 2
    err = capsys.readouterr().err
    assert "cannot query the database at postgresql://postgres:***@127.0.0.1:1/nowhere" in err
    assert "ext-proc migrate" in err and "hunter2" not in err


def test_cli_time_and_grouping_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime(2025, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_time("24h", now=now) == now - timedelta(hours=24)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert parse_time("now", now=now) == now
    assert parse_time("2025-05-01") == DAY1
    assert parse_time("2025-05-01T10:30") == DAY1 + timedelta(hours=10, minutes=30)
    assert parse_time("2025-05-01T12:00+02:00") == DAY1 + timedelta(hours=10)
    assert parse_time("2025-05-01T10:00Z") == DAY1 + timedelta(hours=10)
    with pytest.raises(argparse.ArgumentTypeError, match="24h, 7d"):
        parse_time("yesterday")

    assert _parse("--by", " model , hour ").by == ["model", "hour"]
    with pytest.raises(SystemExit):
        _parse("--by", "model,colour")
    assert (
        "allowed: org_id, app_id, key_id, environment, model, provider, deployment, "
        "decision, hour, day" in capsys.readouterr().err
    )
    assert _parse("--by", "key_id,environment,deployment").by == [
        "key_id",
        "environment",
        "deployment",
    ]


# --- the admin API's GET /v1/usage ---


async def test_admin_usage_endpoint_serves_cost_as_a_decimal_string(pool: asyncpg.Pool) -> None:
    service = SimpleNamespace(settings=SimpleNamespace(admin_token="t"), pool=pool)
    transport = httpx.ASGITransport(app=create_app(service))  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin", headers={"authorization": "Bearer t"}
    ) as api:
        response = await api.get(
            "/v1/usage",
            params={"by": "org_id,deployment", "since": "2025-05-01", "until": "2025-05-03"},
        )
        bad = await api.get("/v1/usage", params={"by": "colour"})
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["group_by"] == ["org_id", "deployment"]
    by_group = {(r["org_id"], r["deployment"]): r for r in document["rows"]}
    assert by_group[("acme", "gpt-4o-mini-prod")]["cost_usd"] == "0.0004500000"
    assert by_group[("acme", "gpt-4.1")]["reasoning_tokens"] == 160
    assert by_group[("globex", "local-mini")]["cost_usd"] is None
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"
