"""Budget accuracy under concurrency, through the real Envoy + two ext_proc processes +
mock (as ``test_accuracy.py`` does for token limits): 64 concurrent clients race for one
dollar budget, and the money admitted never exceeds it.

The bound: a request is admitted only if the budget, minus what is spent and what the
requests in flight have reserved, still holds its whole reservation. So the spend of the
admitted requests (the sum of their rows' ``cost_usd``) is at most the budget plus what
in-flight requests may cost beyond their reservations; here the mock never answers more
than the reservation covers, so spend <= budget exactly, whatever the interleaving
across processes (only Redis makes them agree).

- ``rolling`` (a 30-day GCRA window) reserves exactly what each call costs (prompt
  estimate = the mock's count, max_tokens = the completion the mock produces), so no
  settlement moves anything: spend is within one request of the budget.
- ``monthly`` (a calendar-month counter) reserves max_tokens = 40 for answers of 20
  tokens, so every call is settled down after it: reservations held by calls in flight
  refuse some requests that would have fit, and the spend is lower, but never above.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import DatabaseFactory, poll_async
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

PROCESSES = 2
CLIENTS = 64
BUDGET = Decimal("0.06")
MILLION = Decimal(1_000_000)
# Prices of the model (USD per million tokens) and the request every client sends.
INPUT, OUTPUT = Decimal("2.5"), Decimal("10")
PROMPT_TOKENS = 9  # "Hello there" as a chat message, as the mock and the estimator count it
HELLO: list[Any] = [{"role": "user", "content": "Hello there"}]

CONFIG = f"""
providers:
  mock: {{type: openai, base_url: "http://127.0.0.1:{{mock}}", timeout: 30s,
         retries: {{attempts: 0}}}}
models:
  priced: {{provider: mock, deployment: gpt-4o, price: {{input: {INPUT}, output: {OUTPUT}}}}}
policies:
  rolling-budget: {{type: budget, usd: {BUDGET}, window: 30d}}
  monthly-budget: {{type: budget, usd: {BUDGET}, period: month}}
applications:
  rolling: {{org: budgets, policies: [rolling-budget]}}
  monthly: {{org: budgets, policies: [monthly-budget]}}
"""


def cost(completion: int) -> Decimal:
    return (PROMPT_TOKENS * INPUT + completion * OUTPUT) / MILLION


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("budget-accuracy")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("budget-accuracy"),
        key_app="rolling",
        processes=PROCESSES,
        label="budgets",
    )
    try:
        yield stack
    finally:
        await stack.stop()


async def storm(
    client: openai.AsyncOpenAI, total: int, max_tokens: int
) -> tuple[Counter[Any], float]:
    """``CLIENTS`` concurrent loops sending ``total`` requests in all: (status, error
    code) counts and the wall time."""
    answers: Counter[Any] = Counter()
    remaining = total

    async def one_client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await client.chat.completions.create(
                    model="priced", messages=HELLO, max_tokens=max_tokens
                )
            except openai.APIStatusError as exc:
                answers[(exc.status_code, exc.code)] += 1
            else:
                answers[(200, None)] += 1

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return answers, time.monotonic() - started


@pytest.mark.parametrize(
    ("app", "max_tokens", "answer_tokens"), [("rolling", 20, 20), ("monthly", 40, 20)]
)
async def test_admitted_spend_never_exceeds_the_budget(
    gw: OwnStack, app: str, max_tokens: int, answer_tokens: int
) -> None:
    reserved, spent_each = cost(max_tokens), cost(answer_tokens)
    sent = int(BUDGET / spent_each) + 150  # enough to run the budget dry
    client = openai.AsyncOpenAI(
        base_url=gw.base_url,
        api_key=await gw.create_key(app),
        max_retries=0,
        default_headers={"x-mock-completion-tokens": str(answer_tokens)},
    )
    try:
        answers, took = await storm(client, sent, max_tokens)
    finally:
        await client.close()
    admitted, denied = answers[(200, None)], answers[(429, "budget_exceeded")]
    assert admitted + denied == sent, answers

    rows = await gw.wait_rows("app_id = $1", (app,), sent)
    assert len(rows) == sent  # one row per request
    allowed = [r for r in rows if r["decision"] == "allowed"]
    assert len(allowed) == admitted
    assert {r["cost_usd"] for r in allowed} == {spent_each}  # every call cost the same
    assert all(r["prompt_tokens"] == PROMPT_TOKENS for r in allowed)
    spend = sum(r["cost_usd"] for r in allowed)
    print(
        f"\nbudget ${BUDGET} ({app}), {PROCESSES} ext_proc x {CLIENTS} clients: sent {sent}, "
        f"admitted {admitted}, denied {denied}; spend ${spend} of ${BUDGET} "
        f"({spend / BUDGET:.1%}); reserved ${reserved} / cost ${spent_each} a call; "
        f"{took:.2f} s, {sent / took:.0f} req/s"
    )
    assert spend <= BUDGET  # the bound: never more than the budget
    if reserved == spent_each:
        # Nothing to settle: a request is refused only when it no longer fits.
        assert BUDGET - spent_each < spend
    else:
        # Refused while calls in flight held their reservations: at the last refusal the
        # admitted calls' reservations filled the budget, each of which then cost less.
        assert (BUDGET - reserved) * spent_each / reserved < spend
    # Each refusal's row names the budget. (With two processes the other one may write a
    # stand-in row from Envoy's log first; the refusing process's own row replaces it.)
    refusals: set[tuple[Any, ...]] = set()

    async def refusals_final() -> bool:
        nonlocal refusals
        denied_rows = await gw.fetch(
            "SELECT status_code, policy, error_code FROM usage_records "
            "WHERE app_id = $1 AND decision = 'denied'",
            app,
        )
        refusals = {tuple(r.values()) for r in denied_rows}
        return len(denied_rows) == denied and all(r["policy"] for r in denied_rows)

    await poll_async(refusals_final, timeout=20.0)
    assert refusals == {(429, f"{app}-budget", "budget_exceeded")}
