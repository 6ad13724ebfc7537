"""Upstream fallback through the real Envoy: a model's targets tried in order.

The fake providers are the mock upstream behind providers whose static headers make it
fail (``x-mock-status``: 503, or 429 with ``retry-after``) or stall
(``x-mock-latency-ms``), and a port nothing listens on (connection refused). Each
provider also sends ``x-target-tag`` so the mock's request history tells them apart.
The apps are the stock openai SDK (and httpx for the load); the ledger is Postgres.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from ext_proc.dev import free_port
from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

EJECT_FOR = 5.0  # seconds a failing target stays out (Envoy outlier detection)

CONFIG = """
providers:
  dead:    {type: openai, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_DEAD,
            headers: {x-mock-status: "503", x-target-tag: dead}, retries: {attempts: 0}}
  limited: {type: openai, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_LIMITED,
            headers: {x-mock-status: "429", x-target-tag: limited}}
  slow:    {type: openai, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_SLOW,
            headers: {x-mock-latency-ms: "5000", x-target-tag: slow}}
  refused: {type: openai, base_url: "http://127.0.0.1:{closed}", api_key_env: FB_KEY_REFUSED}
  live:    {type: openai, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_LIVE,
            headers: {x-target-tag: live}}
  west:    {type: azure_openai, base_url: "http://127.0.0.1:{mock}", api_version: "2024-10-21",
            api_key_env: FB_KEY_WEST, headers: {x-target-tag: west}}
  flaky:   {type: openai, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_DEAD,
            headers: {x-mock-status: "503", x-target-tag: flaky}}
  primary: {type: openai, base_url: "http://127.0.0.1:{killable}", api_key_env: FB_KEY_LIVE}
  claude:  {type: anthropic, base_url: "http://127.0.0.1:{mock}", api_key_env: FB_KEY_CLAUDE,
            headers: {x-target-tag: claude}}
models:
  chained:
    provider: dead
    fallbacks:
      - {provider: refused}
      - {provider: live, deployment: gpt-4o-mini, price: {input: 1, output: 2}}
  limited:
    provider: limited
    deployment: gpt-4o
    fallbacks: [{provider: west, deployment: gpt-4o-west}]
  slow:
    provider: slow
    attempt_timeout: 0.5s
    fallbacks: [{provider: live, deployment: gpt-4o-mini}]
  to-claude:
    provider: dead
    fallbacks: [{provider: claude, deployment: claude-sonnet-4-5}]
  spread:
    provider: live
    deployment: gpt-4o-mini
    weight: 3
    fallbacks: [{provider: west, deployment: gpt-4o-west, priority: 0, weight: 1}]
  ejecting:
    provider: flaky
    deployment: gpt-4o
    fallbacks: [{provider: live, deployment: gpt-4o-mini}]
  resilient:
    provider: primary
    deployment: gpt-4o-mini
    fallbacks: [{provider: live, deployment: gpt-4o-mini}]
applications:
  fb-app: {org: fb}
"""

KEYS = {
    "FB_KEY_DEAD": "sk-dead-0000",
    "FB_KEY_LIMITED": "sk-limited-0000",
    "FB_KEY_SLOW": "sk-slow-0000",
    "FB_KEY_REFUSED": "sk-refused-0000",
    "FB_KEY_LIVE": "sk-live-0000",
    "FB_KEY_WEST": "azure-west-0000",
    "FB_KEY_CLAUDE": "sk-ant-claude-0000",
}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def killable() -> Iterator[subprocess.Popen[bytes]]:
    """A second mock upstream, the primary of model ``resilient``: killed under load."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_proc", "mock-upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the second mock upstream did not start"
            time.sleep(0.1)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
async def own(
    databases: DatabaseFactory,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    killable: subprocess.Popen[bytes],
) -> AsyncIterator[OwnStack]:
    config = CONFIG.replace("{closed}", str(free_port()))
    stack = await OwnStack.start(
        databases,
        tmp_path_factory.mktemp("fallback"),
        config.replace("{killable}", str(killable.port)),  # type: ignore[attr-defined]
        redis_url=redis_url,
        redis_prefix=unique_prefix("fallback"),
        key_app="fb-app",
        label="fallback",
        extra_env=KEYS,
        envoy_overrides={"eject_for": EJECT_FOR, "eject_after": 3},
    )
    try:
        yield stack
    finally:
        await stack.stop()


def client(own: OwnStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=own.base_url, api_key=own.api_key, max_retries=0)


async def received(own: OwnStack, tag: str) -> list[dict[str, Any]]:
    """What the mock received from the provider with this tag."""
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(
            f"http://127.0.0.1:{own.stack.mock_port}/_mock/requests",
            params={"header": f"x-target-tag:{tag}"},
        )
    answer.raise_for_status()
    records: list[dict[str, Any]] = answer.json()
    return records


async def one(own: OwnStack, model: str, **extra: Any) -> tuple[Any, dict[str, Any], float]:
    """(answer, its usage row, seconds) of one chat completion."""
    started = time.perf_counter()
    raw = await client(own).chat.completions.with_raw_response.create(
        model=model, messages=HELLO, **extra
    )
    elapsed = time.perf_counter() - started
    request_id = raw.headers["x-request-id"]
    rows = await own.rows_for([request_id])
    return raw.parse(), rows[request_id], elapsed


async def test_503_then_refused_then_served_by_the_third_target(own: OwnStack) -> None:
    answer, row, _ = await one(own, "chained")
    assert answer.choices[0].message.content
    assert answer.model == "gpt-4o-mini"
    assert (row["provider"], row["deployment"], row["attempts"]) == ("live", "gpt-4o-mini", 3)
    assert (row["status_code"], row["decision"], row["tokens_estimated"]) == (200, "allowed", False)
    # Billed at the price of the target that served (input 1, output 2 USD per million).
    expected = (row["prompt_tokens"] * 1 + row["completion_tokens"] * 2) / 1_000_000
    assert float(row["cost_usd"]) == pytest.approx(expected)
    _, again, elapsed = await one(own, "chained")
    assert again["attempts"] == 3
    print(f"\n[fallback] 503 -> refused -> served: {elapsed * 1000:.0f} ms")


async def test_429_with_retry_after_falls_through_at_once(own: OwnStack) -> None:
    before = len(await received(own, "limited"))
    answer, row, elapsed = await one(own, "limited")
    assert answer.choices[0].message.content
    # Azure west served (another provider type: its own path, api-version and key header).
    assert (row["provider"], row["deployment"], row["attempts"]) == ("west", "gpt-4o-west", 2)
    west = (await received(own, "west"))[-1]
    assert west["path"].startswith("/openai/deployments/gpt-4o-west/chat/completions")
    assert west["headers"].get("api-key") == KEYS["FB_KEY_WEST"]
    assert "authorization" not in west["headers"]  # the 429 target's credential is gone
    assert len(await received(own, "limited")) == before + 1
    # The mock's retry-after is 1 s or more: the gateway did not wait for it.
    assert elapsed < 1.0, elapsed


async def test_a_slow_target_times_out_and_the_next_serves(own: OwnStack) -> None:
    answer, row, elapsed = await one(own, "slow")
    assert answer.choices[0].message.content
    assert (row["provider"], row["attempts"], row["status_code"]) == ("live", 2, 200)
    assert 0.5 <= elapsed < 3.0, elapsed


async def test_cross_type_stream_is_translated_and_counted(own: OwnStack) -> None:
    raw = await client(own).chat.completions.with_raw_response.create(
        model="to-claude",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    request_id = raw.headers["x-request-id"]
    row = (await own.rows_for([request_id]))[request_id]
    assert (row["provider"], row["deployment"], row["attempts"]) == (
        "claude",
        "claude-sonnet-4-5",
        2,
    )
    assert row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["tokens_estimated"] is False
    claude = (await received(own, "claude"))[-1]
    assert claude["path"] == "/v1/messages"
    assert claude["headers"].get("x-api-key") == KEYS["FB_KEY_CLAUDE"]


async def test_weighted_spreading_within_five_percent(own: OwnStack) -> None:
    total = 1000
    ids: list[str] = []
    semaphore = asyncio.Semaphore(16)
    body = {"model": "spread", "messages": HELLO}
    headers = {"authorization": f"Bearer {own.api_key}"}

    async with httpx.AsyncClient(base_url=own.base_url, timeout=30) as http:

        async def send() -> None:
            async with semaphore:
                answer = await http.post("/chat/completions", json=body, headers=headers)
                assert answer.status_code == 200, answer.text
                ids.append(answer.headers["x-request-id"])

        await asyncio.gather(*(send() for _ in range(total)))
    rows = await own.rows_for(ids, timeout=60)
    served = Counter(row["provider"] for row in rows.values())
    print(f"\n[fallback] weights 3:1 over {total} requests: {dict(served)}")
    assert sum(served.values()) == total
    assert abs(served["live"] / total - 0.75) <= 0.05
    assert abs(served["west"] / total - 0.25) <= 0.05


async def test_a_failing_target_is_ejected_for_its_cool_down(own: OwnStack) -> None:
    # Three 503s in a row eject the primary; meanwhile its traffic goes to the next
    # target at once (one attempt), and the primary sees none.
    for _ in range(3):
        _, row, _ = await one(own, "ejecting")
        assert (row["provider"], row["attempts"]) == ("live", 2)
    seen = len(await received(own, "flaky"))
    ejected_at = time.monotonic()
    during = []
    while time.monotonic() - ejected_at < EJECT_FOR - 1.0:
        _, row, _ = await one(own, "ejecting")
        during.append(row)
    assert during and all((r["provider"], r["attempts"]) == ("live", 1) for r in during)
    assert len(await received(own, "flaky")) == seen  # no traffic while ejected
    # Visible in the gateway's metrics and /readyz (read from Envoy's admin every 2 s).
    ejected = await own.metric(
        0, "ext_proc_upstream_target_ejected", model="ejecting", provider="flaky"
    )
    assert ejected == 1
    async with httpx.AsyncClient(timeout=5) as http:
        ready = (await http.get(f"http://127.0.0.1:{own.stack.options.admin_port}/readyz")).json()
    assert ready["status"] == "degraded"
    assert ready["checks"]["targets"]["ejected"] == ["ejecting: flaky/gpt-4o"]
    failed = await own.metric(
        0, "ext_proc_upstream_attempts_total", model="ejecting", provider="flaky", outcome="5xx"
    )
    assert failed == 3
    await asyncio.sleep(EJECT_FOR + 1.5 - (time.monotonic() - ejected_at))
    _, row, _ = await one(own, "ejecting")
    assert len(await received(own, "flaky")) == seen + 1  # tried again after the cool-down
    assert (row["provider"], row["attempts"]) == ("live", 2)


async def test_the_gateway_key_never_reaches_any_target(own: OwnStack) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(f"http://127.0.0.1:{own.stack.mock_port}/_mock/requests")
    records = answer.json()
    assert records
    for record in records:
        for name, value in record["headers"].items():
            assert own.api_key not in value, (name, record["path"])
            assert not name.startswith("x-gateway-"), name


async def test_the_primary_dies_under_load_and_no_app_sees_an_error(
    own: OwnStack, killable: subprocess.Popen[bytes]
) -> None:
    rate, duration, kill_at = 40.0, 6.0, 2.0
    headers = {"authorization": f"Bearer {own.api_key}"}
    plain = {"model": "resilient", "messages": HELLO}
    stream = {**plain, "stream": True}
    statuses: Counter[int] = Counter()
    ids: list[str] = []

    async with httpx.AsyncClient(base_url=own.base_url, timeout=30) as http:

        async def send(index: int) -> None:
            body = stream if index % 4 == 0 else plain
            answer = await http.post("/chat/completions", json=body, headers=headers)
            statuses[answer.status_code] += 1
            ids.append(answer.headers.get("x-request-id", ""))

        async def kill() -> None:
            await asyncio.sleep(kill_at)
            killable.kill()

        killer = asyncio.create_task(kill())
        tasks = []
        started = time.monotonic()
        for index in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            tasks.append(asyncio.create_task(send(index)))
        await asyncio.gather(*tasks, killer)
    rows = await own.rows_for(ids, timeout=60)
    served = Counter(row["provider"] for row in rows.values())
    retried = sum(1 for row in rows.values() if (row["attempts"] or 0) > 1)
    print(
        f"\n[fallback] primary killed at {kill_at:.0f} s of {duration:.0f} s at {rate:.0f}/s: "
        f"{len(ids)} requests, statuses {dict(statuses)}, served by {dict(served)}, "
        f"{retried} needed a second attempt"
    )
    assert statuses == Counter({200: len(ids)}), statuses  # no app saw an error
    assert len(rows) == len(ids)  # one row each
    assert served["primary"] > 0 and served["live"] > 0
