"""Limit accuracy under concurrency, through the real Envoy + two ext_proc processes + mock:
64 concurrent clients (the stock ``openai`` SDK, no retries) race for one bucket, and the
shared Redis counters admit exactly what the limit allows: never more (no overshoot
across processes or concurrent requests), and no fewer than the limit minus 0.1%.

The stack is this module's own (own database, the shared Redis under a private key
prefix) with ``ext_proc_processes=2``: Envoy spreads the requests over both processes,
which only agree through Redis.

Why the bounds are exact here: limits are GCRA buckets that refill continuously at
``limit / window``. ``1000 requests / 24h`` refills one request every 86.4 s, so during
a test of a few seconds nothing refills and the admitted count must be exactly 1000 (the
issue's bound "admitted <= limit and >= limit - 0.1%" is met with no slack at all).
``20000 tokens / 30d`` refills 0.0077 tokens/s (under one token in two minutes), so the
allowed requests' tokens must sum to at most 20000 and, every request costing the same
C tokens, to more than 20000 - C (a request is refused only when it no longer fits).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import DatabaseFactory, poll_async
from tests.e2e.stack_helpers import OwnStack, metric_sum, unique_prefix

pytestmark = pytest.mark.e2e

RATE_LIMIT = 1000
RATE_WINDOW = 24 * 3600.0
TOKEN_LIMIT = 20_000
TOKEN_WINDOW = 30 * 86400.0

CONFIG = f"""
providers:
  mock: {{type: openai, base_url: "http://127.0.0.1:{{mock}}", timeout: 30s,
         retries: {{attempts: 0}}}}
models:
  gpt-4o-mini: {{provider: mock}}
policies:
  thousand-a-day: {{type: rate_limit, requests: {RATE_LIMIT}, window: 24h}}
  token-budget: {{type: token_limit, tokens: {TOKEN_LIMIT}, window: 30d}}
applications:
  counted: {{org: accuracy, policies: [thousand-a-day]}}
  metered: {{org: accuracy, policies: [token-budget]}}
"""

PROCESSES = 2
CLIENTS = 64
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


@dataclass
class Answer:
    status: int
    code: str | None
    request_id: str
    retry_after: str | None


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("accuracy")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("accuracy"),
        key_app="counted",
        processes=PROCESSES,
        label="accuracy",
    )
    try:
        yield stack
    finally:
        await stack.stop()  # also deletes the prefix's keys


async def storm(
    client: openai.AsyncOpenAI, total: int, max_tokens: int | None = None
) -> tuple[list[Answer], float]:
    """``CLIENTS`` concurrent loops sending ``total`` requests in all; every answer and
    the wall time."""
    answers: list[Answer] = []
    remaining = total

    async def one_client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini",
                    messages=HELLO,
                    max_tokens=openai.omit if max_tokens is None else max_tokens,
                )
            except openai.APIStatusError as exc:
                headers = exc.response.headers
                answers.append(
                    Answer(
                        exc.status_code,
                        exc.code,
                        headers["x-request-id"],
                        headers.get("retry-after"),
                    )
                )
            else:
                answers.append(Answer(raw.status_code, None, raw.headers["x-request-id"], None))

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return answers, time.monotonic() - started


async def served_per_process(gw: OwnStack) -> list[float]:
    return [metric_sum(s, "ext_proc_requests_total") for s in await gw.scrape_all()]


async def test_rate_limit_admits_exactly_the_limit_across_processes(gw: OwnStack) -> None:
    sent = RATE_LIMIT + RATE_LIMIT // 4  # 1250: a quarter more than the limit allows
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, max_retries=0)
    before = await served_per_process(gw)

    answers, took = await storm(client, sent)

    statuses = Counter(a.status for a in answers)
    admitted, denied = statuses[200], statuses[429]
    print(
        f"\nrate_limit {RATE_LIMIT}/24h, {PROCESSES} ext_proc x {CLIENTS} clients: "
        f"sent {len(answers)}, admitted {admitted}, denied {denied}, "
        f"{took:.2f} s, {len(answers) / took:.0f} req/s"
    )
    assert len(answers) == sent
    # The bound: limit - 0.1% <= admitted <= limit. A 24 h GCRA refills nothing
    # in the test's seconds, so it is met exactly.
    assert RATE_LIMIT - RATE_LIMIT // 1000 <= admitted <= RATE_LIMIT
    assert took < RATE_WINDOW / RATE_LIMIT  # less than one refill interval (86.4 s) ...
    assert admitted == RATE_LIMIT  # ... so exactly the limit
    assert denied == sent - RATE_LIMIT  # everything else is a 429, nothing else
    refused = [a for a in answers if a.status == 429]
    assert {a.code for a in refused} == {"rate_limit_exceeded"}
    assert all(a.retry_after is not None and int(a.retry_after) >= 1 for a in refused)

    # Both processes took their share: only Redis made them agree.
    served: list[float] = []

    async def all_counted() -> bool:  # counted when each request's stream ends
        nonlocal served
        after = await served_per_process(gw)
        served = [a - b for a, b in zip(after, before, strict=True)]
        return sum(served) >= sent

    await poll_async(all_counted, timeout=10.0)
    print(f"requests per ext_proc process: {served}")
    assert all(count > 0 for count in served), served
    assert sum(served) == sent

    rows = await gw.wait_rows("app_id = $1", ("counted",), sent)
    assert len(rows) == sent  # one usage row per request, no more, no fewer
    assert {r["request_id"] for r in rows} == {a.request_id for a in answers}
    decisions = Counter((r["decision"], r["status_code"], r["policy"]) for r in rows)
    assert decisions == {
        ("allowed", 200, None): RATE_LIMIT,
        ("denied", 429, "thousand-a-day"): sent - RATE_LIMIT,
    }


async def test_token_limit_never_overshoots_under_concurrency(gw: OwnStack) -> None:
    max_tokens = 40
    # The mock answers exactly max_tokens completion tokens and counts the prompt the way
    # the estimator does: the reservation (estimate + max_tokens) is the real total, so
    # settlement moves nothing and every allowed request costs the same.
    client = openai.AsyncOpenAI(
        base_url=gw.base_url,
        api_key=await gw.create_key("metered"),
        max_retries=0,
        default_headers={"x-mock-completion-tokens": str(max_tokens)},
    )
    sent = 500  # enough to run the budget dry (a request costs ~50 tokens: ~400 fit)

    answers, took = await storm(client, sent, max_tokens=max_tokens)

    statuses = Counter(a.status for a in answers)
    admitted, denied = statuses[200], statuses[429]
    assert admitted + denied == sent, statuses
    refused = [a for a in answers if a.status == 429]
    assert {a.code for a in refused} == {"rate_limit_exceeded"}
    assert all(a.retry_after is not None for a in refused)

    rows = await gw.wait_rows("app_id = $1", ("metered",), sent)
    assert len(rows) == sent
    allowed = [r for r in rows if r["decision"] == "allowed"]
    assert len(allowed) == admitted
    costs = {r["total_tokens"] for r in allowed}
    assert len(costs) == 1, f"requests should all cost the same: {costs}"
    cost = costs.pop()
    for row in allowed:
        assert row["completion_tokens"] == max_tokens and not row["tokens_estimated"]
        assert row["prompt_tokens"] == row["estimated_prompt_tokens"]  # nothing to settle
    assert {(r["status_code"], r["policy"]) for r in rows if r["decision"] == "denied"} == {
        (429, "token-budget")
    }
    spent = sum(r["total_tokens"] for r in allowed)
    refill = took * TOKEN_LIMIT / TOKEN_WINDOW
    print(
        f"\ntoken_limit {TOKEN_LIMIT}/30d, {PROCESSES} ext_proc x {CLIENTS} clients, "
        f"{cost} tokens a request: admitted {admitted} ({spent} tokens), denied {denied}, "
        f"{took:.2f} s, {sent / took:.0f} req/s"
    )
    assert refill < 1  # the budget did not refill by a single token meanwhile ...
    assert TOKEN_LIMIT - cost < spent <= TOKEN_LIMIT  # ... so: no overshoot, no waste
    assert admitted == TOKEN_LIMIT // cost
