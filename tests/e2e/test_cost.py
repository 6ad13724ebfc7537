"""Cost and budgets end to end: the usage row's ``cost_usd`` is what the price says for
the tokens on that row (a price from gateway.yaml, or the public table), and an app
whose ``budget`` is spent gets 429 ``budget_exceeded`` with ``retry-after``."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

HELLO: list[Any] = [{"role": "user", "content": "Hello there"}]
MILLION = Decimal(1_000_000)


def by_hand(row: dict[str, Any], input_: str, cached: str, output: str) -> Decimal:
    """The row's cost computed from its own token counts: uncached prompt at the input
    price, cached prompt at the cached price, completion (reasoning included) at output."""
    prompt, hit = row["prompt_tokens"], row["cached_tokens"] or 0
    total = (
        (prompt - hit) * Decimal(input_)
        + hit * Decimal(cached)
        + row["completion_tokens"] * Decimal(output)
    )
    return total / MILLION


async def test_cost_of_a_model_priced_in_the_file(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(
        marker,
        **{
            "x-mock-completion-tokens": "30",
            "x-mock-cached-tokens": "4",
            "x-mock-reasoning-tokens": "12",
        },
    )
    spent = e2e.metric("ext_proc_cost_usd_total", gen_ai_request_model="priced-4o")
    raw = await client.chat.completions.with_raw_response.create(
        model="priced-4o", messages=HELLO, max_tokens=50
    )
    assert raw.status_code == 200
    row = await e2e.usage_row(raw.headers["x-request-id"])
    # The same cost, live in Prometheus by org, app, provider and model.
    spent_now = e2e.metric("ext_proc_cost_usd_total", gen_ai_request_model="priced-4o")
    assert spent_now == pytest.approx(spent + 0.0004375, rel=1e-9)
    assert e2e.metric("ext_proc_cost_usd_total", app=row["app_id"], org=row["org_id"]) > 0
    assert row["deployment"] == "gpt-4o" and not row["tokens_estimated"]
    # 9 prompt tokens (4 of them cached), 30 + 12 reasoning completion tokens:
    # 5 x 2.5 + 4 x 1.25 + 42 x 10 = 12.5 + 5 + 420 = 437.5 per million.
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (9, 4, 42)
    assert row["reasoning_tokens"] == 12
    assert row["cost_usd"] == Decimal("0.0004375") == by_hand(row, "2.5", "1.25", "10")


async def test_cost_from_the_public_table_and_null_without_a_price(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(marker, **{"x-mock-completion-tokens": "10"})
    # gpt-4o-mini has no price in the file: the public table's ($0.15 / $0.60 per million).
    mini = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    row = await e2e.usage_row(mini.headers["x-request-id"])
    assert row["cost_usd"] == by_hand(row, "0.15", "0.075", "0.6") == Decimal("0.00000735")
    # A denial before any model was resolved has no price and no cost; an error answer
    # from a priced model cost nothing.
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    unknown = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert unknown["cost_usd"] is None
    failing = e2e.sdk(marker, **{"x-mock-status": "500"})
    with pytest.raises(openai.InternalServerError) as failed:
        await failing.chat.completions.create(model="priced-4o", messages=HELLO)
    errored = await e2e.usage_row(failed.value.response.headers["x-request-id"])
    assert errored["decision"] == "error" and errored["cost_usd"] == 0


async def test_spent_budget_is_429_budget_exceeded_with_retry_after(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(
        marker,
        key=await e2e.create_key("spender-app"),
        **{"x-mock-completion-tokens": "20"},
    )
    # Each call reserves 9 x 2.5 + 50 x 10 = 522.5 per million ($0.0005225; max_tokens
    # 50) and costs 9 x 2.5 + 20 x 10 = $0.0002225 once settled. The budget is $0.001 a
    # month: a few pass, then it is spent.
    allowed: list[str] = []
    denial: openai.RateLimitError | None = None
    for _ in range(10):  # bounded: at most 4 can fit in $0.001
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="priced-4o", messages=HELLO, max_tokens=50
            )
        except openai.RateLimitError as exc:
            denial = exc
            break
        allowed.append(raw.headers["x-request-id"])
        # Settlement runs when the answer is recorded: wait for the row before the next.
        await e2e.usage_row(allowed[-1])
    assert denial is not None, "the budget never ran out"
    assert 1 <= len(allowed) <= 4
    assert denial.status_code == 429 and denial.code == "budget_exceeded"
    assert "tenth-of-a-cent" in denial.message
    # Retry when the calendar month (UTC) ends.
    now = datetime.now(UTC)
    month_end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    retry = int(denial.response.headers["retry-after"])
    assert 0 < retry <= math.ceil((month_end - now).total_seconds()) + 1
    assert retry >= (month_end - now).total_seconds() - 60

    rows = [await e2e.usage_row(request_id) for request_id in allowed]
    spent = sum(r["cost_usd"] for r in rows)
    assert all(r["cost_usd"] == Decimal("0.0002225") for r in rows)
    assert spent <= Decimal("0.001") < spent + Decimal("0.0005225")  # spent, nothing wasted
    refused = await e2e.usage_row(denial.response.headers["x-request-id"])
    assert (refused["decision"], refused["status_code"], refused["policy"]) == (
        "denied",
        429,
        "tenth-of-a-cent",
    )
    assert refused["error_code"] == "budget_exceeded" and refused["cost_usd"] == 0
    assert "x-ratelimit-limit-tokens" not in denial.response.headers  # dollars are not tokens
