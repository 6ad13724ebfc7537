"""Redis killed mid-run, through the real Envoy + ext_proc + mock: each limit keeps the
behaviour its policy declares, nothing waits on the dead socket, and Redis is used
again once it is back.

The stack is this module's own: its own database, a private redis-server on a spare
port (SIGKILLed and restarted on the same port; the machine's shared Redis is never
touched) and two ext_proc processes, so every check is made on each replica (each has
its own circuit breaker and its own in-process fallback limiter).

- ``fail-open`` is bound to a rate limit with ``on_error: allow`` (the default): while
  Redis is down it is decided by the in-process limiter (fallback action ``local``).
- ``fail-closed`` is bound to one with ``on_error: deny``: 503 ``policy_unavailable``.
- ``tiny`` (3 per hour, ``on_error: allow``) shows the fallback still enforces the limit,
  per process.
- A frozen Redis (SIGSTOP: calls hang instead of being refused) costs a request one
  socket timeout at most before the breakers open.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import DatabaseFactory, poll_async
from tests.e2e.stack_helpers import OwnStack, metric_sum, unique_prefix
from tests.private_redis import PrivateRedis

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", timeout: 30s, retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
policies:
  open-limit: {type: rate_limit, requests: 1000, window: 1h}
  closed-limit: {type: rate_limit, requests: 1000, window: 1h, on_error: deny}
  tiny-limit: {type: rate_limit, requests: 3, window: 1h}
applications:
  fail-open: {org: resilience, policies: [open-limit]}
  fail-closed: {org: resilience, policies: [closed-limit]}
  tiny: {org: resilience, policies: [tiny-limit]}
"""

PROCESSES = 2
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
# The longest any request may take while Redis is dead or coming back: the Redis socket
# timeout is 0.25 s and a killed server refuses at once; after 3 failures the breaker
# answers without I/O. 1.5 s leaves room for a loaded 2-core machine.
OUTAGE_LATENCY_BOUND = 1.5
CIRCUIT_CLOSED, CIRCUIT_OPEN = 0.0, 2.0


@dataclass
class Answer:
    status: int
    code: str | None
    request_id: str
    seconds: float
    headers: dict[str, str]
    error: openai.APIStatusError | None = None


async def call(client: openai.AsyncOpenAI) -> Answer:
    """One chat completion through Envoy, as the stock SDK sees it (no retries)."""
    started = time.monotonic()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO
        )
    except openai.APIStatusError as exc:
        took = time.monotonic() - started
        headers = dict(exc.response.headers)
        return Answer(exc.status_code, exc.code, headers["x-request-id"], took, headers, exc)
    took = time.monotonic() - started
    raw.parse()  # a valid completion body
    return Answer(raw.status_code, None, raw.headers["x-request-id"], took, dict(raw.headers))


def sdk(gw: OwnStack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(Path(tmp_path_factory.mktemp("private-redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory,
    private_redis: PrivateRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("resilience")),
        CONFIG,
        redis_url=private_redis.url,
        redis_prefix=unique_prefix("resilience"),
        key_app="fail-open",
        processes=PROCESSES,
        label="resilience",
    )
    try:
        yield stack
    finally:
        await stack.stop()


async def circuit_states(gw: OwnStack) -> list[float]:
    return [
        metric_sum(samples, "ext_proc_circuit_state", dependency="redis")
        for samples in await gw.scrape_all()
    ]


async def recover(gw: OwnStack, client: openai.AsyncOpenAI) -> list[Answer]:
    """Send requests (bounded) until every process's breaker is closed again; each
    process's half-open probe is a request. Returns the answers seen meanwhile."""
    answers: list[Answer] = []

    async def closed_everywhere() -> bool:
        answers.append(await call(client))
        return all(state == CIRCUIT_CLOSED for state in await circuit_states(gw))

    assert await poll_async(closed_everywhere, timeout=20.0), (
        f"circuit still not closed on every process: {await circuit_states(gw)}"
    )
    return answers


async def test_redis_killed_mid_run_each_policy_keeps_its_declared_behaviour(
    gw: OwnStack, private_redis: PrivateRedis
) -> None:
    fail_open = sdk(gw, gw.api_key)
    fail_closed = sdk(gw, await gw.create_key("fail-closed"))

    # Healthy: both apps are served, limits are counted in Redis, breakers closed.
    for _ in range(2 * PROCESSES):
        assert (await call(fail_open)).status == 200
        assert (await call(fail_closed)).status == 200
    assert await circuit_states(gw) == [CIRCUIT_CLOSED] * PROCESSES
    probe = redis.Redis.from_url(private_redis.url)
    try:
        prefix = gw.stack.options.redis_prefix
        assert probe.keys(f"{prefix}lim:requests:closed-limit:*"), "limits are not in Redis"
    finally:
        probe.close()

    private_redis.kill()
    outage: list[tuple[str, Answer]] = []
    try:
        # Until every process has opened its breaker and has used both fallbacks, keep
        # sending (a period of 3 so round-robin over 2 processes cannot alias one app
        # onto one process).
        clients = itertools.cycle(
            [("fail-open", fail_open), ("fail-closed", fail_closed), ("fail-closed", fail_closed)]
        )

        async def degraded_everywhere() -> bool:
            for _ in range(3):
                app, client = next(clients)
                outage.append((app, await call(client)))
            return all(
                metric_sum(s, "ext_proc_circuit_state", dependency="redis") == CIRCUIT_OPEN
                and metric_sum(
                    s, "ext_proc_policy_fallback_total", policy="open-limit", action="local"
                )
                > 0
                and metric_sum(
                    s, "ext_proc_policy_fallback_total", policy="closed-limit", action="deny"
                )
                > 0
                for s in await gw.scrape_all()
            )

        assert await poll_async(degraded_everywhere, timeout=15.0), (
            f"breakers did not all open: {await circuit_states(gw)}"
        )
        # With the breakers open: more of the same, answered without touching Redis.
        for _ in range(2 * PROCESSES):
            outage.append(("fail-open", await call(fail_open)))
            outage.append(("fail-closed", await call(fail_closed)))

        # Authentication does not need Redis: a key created during the outage (so in no
        # cache) is read from Postgres; an unknown key is still refused with 401.
        fresh = sdk(gw, await gw.create_key("fail-open"))
        outage.append(("fail-open", await call(fresh)))
        unknown = await call(sdk(gw, "gwk_not-a-real-key"))
        assert (unknown.status, unknown.code) == (401, "invalid_api_key")

        samples = await gw.scrape_all()
        for index, s in enumerate(samples):
            where = f"ext_proc process {index + 1}"
            assert metric_sum(s, "ext_proc_circuit_state", dependency="redis") == CIRCUIT_OPEN
            assert metric_sum(s, "ext_proc_dependency_up", dependency="redis") == 0, where
            local = metric_sum(
                s, "ext_proc_policy_fallback_total", policy="open-limit", action="local"
            )
            deny = metric_sum(
                s, "ext_proc_policy_fallback_total", policy="closed-limit", action="deny"
            )
            assert local > 0 and deny > 0, where
            # The fail-open policy never fails closed and the reverse.
            assert metric_sum(s, "ext_proc_policy_fallback_total", policy="open-limit") == local
            assert metric_sum(s, "ext_proc_policy_fallback_total", policy="closed-limit") == deny
            assert (
                metric_sum(
                    s,
                    "ext_proc_requests_total",
                    decision="denied",
                    policy="closed-limit",
                    status_code="503",
                )
                > 0
            ), where
    finally:
        if not private_redis.running:
            private_redis.start()  # same port, empty

    # What the apps saw during the outage: never a 401 or 429, never a long wait.
    opened = [a for app, a in outage if app == "fail-open"]
    closed = [a for app, a in outage if app == "fail-closed"]
    assert [a.status for a in opened] == [200] * len(opened)
    assert [(a.status, a.code) for a in closed] == [(503, "policy_unavailable")] * len(closed)
    for answer in closed:
        assert isinstance(answer.error, openai.InternalServerError)  # what the SDK raises
        assert "closed-limit" in answer.error.message
    slowest = max(a.seconds for _, a in outage)
    print(
        f"\noutage: {len(opened)} fail-open 200s, {len(closed)} fail-closed 503s, "
        f"slowest request {slowest * 1000:.0f} ms"
    )
    assert slowest < OUTAGE_LATENCY_BOUND

    # Every request has its usage row; the 503s name the policy that failed closed.
    rows = await gw.rows_for([a.request_id for _, a in outage] + [unknown.request_id])
    assert len(rows) == len(outage) + 1
    assert (rows[unknown.request_id]["status_code"], rows[unknown.request_id]["decision"]) == (
        401,
        "denied",
    )
    for answer in closed:
        row = rows[answer.request_id]
        assert (row["status_code"], row["decision"], row["policy"], row["error_code"]) == (
            503,
            "denied",
            "closed-limit",
            "policy_unavailable",
        )
        assert row["app_id"] == "fail-closed" and row["key_id"] is not None
    for answer in opened:
        row = rows[answer.request_id]
        assert (row["status_code"], row["decision"], row["app_id"]) == (200, "allowed", "fail-open")

    # Redis is back on the same port: within open_seconds each breaker probes, closes,
    # and fail-closed requests are served again (from Redis, which lost its counters).
    restarted = time.monotonic()
    during = await recover(gw, fail_closed)
    print(f"recovered in {time.monotonic() - restarted:.2f} s ({len(during)} requests)")
    assert max(a.seconds for a in during) < OUTAGE_LATENCY_BOUND
    assert {a.status for a in during} <= {200, 503}
    after = [await call(fail_closed) for _ in range(2 * PROCESSES)]
    assert [a.status for a in after] == [200] * len(after)
    assert (await call(fail_open)).status == 200
    for index, s in enumerate(await gw.scrape_all()):
        assert metric_sum(s, "ext_proc_dependency_up", dependency="redis") == 1, index
    probe = redis.Redis.from_url(private_redis.url)
    try:
        assert probe.keys(f"{prefix}lim:requests:closed-limit:*"), "Redis not used again"
    finally:
        probe.close()


async def test_fail_open_limit_is_still_enforced_locally_per_process(
    gw: OwnStack, private_redis: PrivateRedis
) -> None:
    """on_error: allow does not mean unlimited: each process's in-process limiter applies
    the limit (3 per hour) on its own, so the 4th request a process sees is a 429."""
    tiny = sdk(gw, await gw.create_key("tiny"))

    async def local_fallbacks() -> list[float]:
        return [
            metric_sum(s, "ext_proc_policy_fallback_total", policy="tiny-limit", action="local")
            for s in await gw.scrape_all()
        ]

    private_redis.kill()
    per_process: dict[int, list[Answer]] = {i: [] for i in range(PROCESSES)}
    try:
        for _ in range(40):  # round robin: ~4 per process needed; bounded
            before = await local_fallbacks()
            answer = await call(tiny)
            after = await local_fallbacks()
            served = [i for i in range(PROCESSES) if after[i] > before[i]]
            # The fallback is counted on the process that decided, before it answers.
            assert len(served) == 1, (before, after)
            per_process[served[0]].append(answer)
            if all(len(answers) >= 5 for answers in per_process.values()):
                break
    finally:
        if not private_redis.running:
            private_redis.start()

    for index, answers in per_process.items():
        statuses = [a.status for a in answers]
        print(f"\nprocess {index + 1} during the outage: {statuses}")
        assert len(statuses) >= 5, f"process {index + 1} got too few requests: {statuses}"
        assert statuses == [200, 200, 200] + [429] * (len(statuses) - 3)
        for denied in answers[3:]:
            assert denied.code == "rate_limit_exceeded"
            # 3 per hour: the next unit is ~20 min away.
            assert 1000 < int(denied.headers["retry-after"]) <= 1200
            assert denied.headers["x-ratelimit-remaining-requests"] == "0"
        assert max(a.seconds for a in answers) < OUTAGE_LATENCY_BOUND
    every = [a for answers in per_process.values() for a in answers]
    rows = await gw.rows_for([a.request_id for a in every])
    assert len(rows) == len(every)
    assert Counter((r["status_code"], r["decision"], r["policy"]) for r in rows.values()) == {
        (200, "allowed", None): 3 * PROCESSES,
        (429, "denied", "tiny-limit"): len(every) - 3 * PROCESSES,
    }

    # Back on Redis (restarted empty): one bucket shared by both processes again, where
    # the exhausted local limiters would now refuse everything.
    await recover(gw, sdk(gw, gw.api_key))
    shared = [(await call(tiny)).status for _ in range(5)]
    assert shared == [200, 200, 200, 429, 429]


async def test_frozen_redis_costs_at_most_a_socket_timeout(
    gw: OwnStack, private_redis: PrivateRedis
) -> None:
    """A Redis that hangs (SIGSTOP: connections open, no replies) instead of refusing: a
    burst of concurrent requests each waits one socket timeout (0.25 s) at most, then
    the breakers are open and nothing waits; each policy still gets its on_error."""
    fail_open = sdk(gw, gw.api_key)
    fail_closed = sdk(gw, await gw.create_key("fail-closed"))
    assert (await call(fail_closed)).status == 200  # Redis answers, the key is cached

    private_redis.freeze()
    try:
        burst = await asyncio.gather(*(call(client) for client in [fail_open, fail_closed] * 12))
        opened, closed = burst[0::2], burst[1::2]
        following = [await call(client) for client in [fail_open, fail_closed] * PROCESSES]
        states = await circuit_states(gw)
    finally:
        private_redis.thaw()

    waits = [a.seconds for a in burst]
    print(f"\nfrozen Redis: burst of {len(burst)} waited {min(waits):.3f}..{max(waits):.3f} s")
    assert max(waits + [a.seconds for a in following]) < OUTAGE_LATENCY_BOUND
    assert [a.status for a in opened + following[0::2]] == [200] * (len(opened) + PROCESSES)
    assert {(a.status, a.code) for a in closed + following[1::2]} == {(503, "policy_unavailable")}
    assert states == [CIRCUIT_OPEN] * PROCESSES
    rows = await gw.rows_for([a.request_id for a in burst + following])
    assert len(rows) == len(burst) + len(following)

    during = await recover(gw, fail_closed)
    assert max(a.seconds for a in during) < OUTAGE_LATENCY_BOUND
    assert (await call(fail_closed)).status == 200
