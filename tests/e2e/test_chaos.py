"""Chaos under steady load, through the real Envoy + two ext_proc processes + the mock:
Postgres stopped for 90 s, Postgres frozen for 25 s, Redis frozen, Redis killed.

A load of about 20 requests a second (the ``openai`` SDK, one key used before every
outage) runs through each; every test asserts what a user would check:

- the key keeps working throughout: every request is answered 200 (no 401, no 503
  ``auth_unavailable``) and none waits anywhere near Envoy's 2 s ext_proc timeout;
- afterwards there is exactly one usage row per request (counted in Postgres);
- and prints the numbers (``-s`` shows them): statuses, latency, stale key answers,
  and the recovery times: until every process's ``/readyz`` says the dependency is back,
  and until the usage rows of every request sent before the recovery are in Postgres.

Postgres sits behind a TCP proxy of the test's own (``tests/integration/tcp_proxy.py``):
the stack's DATABASE_URL points at it, so "stopped" is the proxy refusing connections
and resetting open ones, "frozen" is it accepting and holding them. Redis is a private
redis-server (SIGSTOP, SIGKILL). The shared servers are never touched.

``CHAOS_PG_OUTAGE_SECONDS`` lengthens the Postgres outage for a run by hand (e.g. 600
for ten minutes, with ``--timeout 900``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from ext_proc.dev import free_port
from tests.conftest import DatabaseFactory, poll_async
from tests.e2e.stack_helpers import OwnStack, metric_sum, new_stack, unique_prefix
from tests.integration.tcp_proxy import TcpProxy
from tests.private_redis import PrivateRedis

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", timeout: 30s, retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
policies:
  generous: {type: rate_limit, requests: 1000000, window: 1h}
applications:
  chaos-app: {org: chaos, policies: [generous]}
"""

PROCESSES = 2
RATE = 20.0  # requests a second
PG_OUTAGE = float(os.environ.get("CHAOS_PG_OUTAGE_SECONDS", "90"))
PG_FREEZE = 25.0
REDIS_OUTAGE = 6.0
WARMUP = 2.0
AFTER = 4.0  # load kept on after the dependency is back
# Far below Envoy's 2 s ext_proc message timeout (a 504 past it): the key lookup
# deadline is 0.4 s, a Redis call 0.25 s.
LATENCY_BOUND = 1.5


@dataclass
class Answer:
    sent: float
    status: int  # 0: no HTTP answer
    code: str | None
    request_id: str | None
    seconds: float


@dataclass
class Load:
    """Sends ``RATE`` requests a second (each its own task, so a slow answer does not
    slow the rate) until stopped; keeps every answer."""

    client: openai.AsyncOpenAI
    answers: list[Answer] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[Answer]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._pending:
            await asyncio.wait(self._pending, timeout=60)
        return self.answers

    async def _run(self) -> None:
        started = time.monotonic()
        sent = 0
        while True:
            task = asyncio.create_task(self._one())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / RATE - time.monotonic()))

    async def _one(self) -> None:
        sent = time.monotonic()
        self.sent.append(sent)
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
            )
            raw.parse()
            answer = Answer(sent, raw.status_code, None, raw.headers.get("x-request-id"), 0.0)
        except openai.APIStatusError as exc:
            answer = Answer(
                sent, exc.status_code, exc.code, exc.response.headers.get("x-request-id"), 0.0
            )
        except openai.APIConnectionError as exc:
            answer = Answer(sent, 0, type(exc).__name__, None, 0.0)
        answer.seconds = time.monotonic() - sent
        self.answers.append(answer)


@dataclass
class Chaos:
    gw: OwnStack
    proxy: TcpProxy
    redis: PrivateRedis
    admin_ports: list[int]
    requests: int = 0  # sent by every test so far (the table's expected row count)


@pytest.fixture(scope="module")
def pg_proxy(pg_server_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy.for_url(pg_server_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(Path(tmp_path_factory.mktemp("chaos-redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def chaos(
    databases: DatabaseFactory,
    pg_proxy: TcpProxy,
    private_redis: PrivateRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Chaos]:
    database_url = await databases.create("chaos")
    mock_port = free_port()
    stack = new_stack(
        Path(tmp_path_factory.mktemp("chaos")),
        CONFIG.replace("{mock}", str(mock_port)),
        mock_port,
        key_app="chaos-app",
        database_url=pg_proxy.url(database_url),  # every ext_proc reaches it through the proxy
        redis_url=private_redis.url,
        redis_prefix=unique_prefix("chaos"),
        ext_proc_processes=PROCESSES,
    )
    await asyncio.to_thread(stack.start)
    gw = OwnStack(stack, database_url)  # the test reads rows directly, not through the proxy
    chaos = Chaos(gw, pg_proxy, private_redis, [ports[2] for ports in stack.ext_proc_ports])
    try:
        # A first request per process (cold caches, first connections) before any timing.
        async with openai.AsyncOpenAI(
            base_url=gw.base_url, api_key=gw.api_key, max_retries=0, timeout=30
        ) as client:
            for _ in range(2 * PROCESSES):
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
                )
                chaos.requests += 1
        yield chaos
    finally:
        pg_proxy.thaw()
        pg_proxy.restore()
        private_redis.thaw()
        if not private_redis.running:
            private_redis.start()
        await gw.stop()


async def ready_checks(chaos: Chaos) -> list[dict[str, object]]:
    """Each ext_proc process's /readyz body."""
    async with httpx.AsyncClient(timeout=5) as client:
        bodies = []
        for port in chaos.admin_ports:
            response = await client.get(f"http://127.0.0.1:{port}/readyz")
            bodies.append(response.json())
    return bodies


async def dependency_back(chaos: Chaos, dependency: str) -> bool:
    return all(
        body["checks"][dependency]["ok"] is True  # type: ignore[index]
        for body in await ready_checks(chaos)
    )


async def stale_answers(chaos: Chaos) -> float:
    return sum(
        metric_sum(samples, "ext_proc_cache_stale_served_total", cache="keys")
        for samples in await chaos.gw.scrape_all()
    )


async def measure_recovery(
    chaos: Chaos, load: Load, dependency: str, ended: float
) -> tuple[float, float]:
    """Seconds from the dependency's return until every process's /readyz says it is
    back, and until the rows of every request sent before then are in Postgres (the
    spool replayed), measured while the load goes on."""
    back: list[float] = []

    async def ready_again() -> bool:
        if await dependency_back(chaos, dependency):
            back.append(time.monotonic())
            return True
        return False

    assert await poll_async(ready_again, timeout=60, interval=0.1), await ready_checks(chaos)
    before = [t for t in load.sent if t < back[0]]
    assert await poll_async(
        lambda: sum(1 for a in load.answers if a.sent < back[0]) == len(before),
        timeout=30,
        interval=0.05,
    )
    ids = [a.request_id for a in load.answers if a.sent < back[0] and a.request_id]

    async def rows_in() -> bool:
        rows = await chaos.gw.fetch(
            "SELECT count(*) AS n FROM usage_records WHERE request_id = ANY($1::text[])", ids
        )
        return bool(rows[0]["n"] == len(before))

    assert await poll_async(rows_in, timeout=90, interval=0.1)
    return back[0] - ended, time.monotonic() - ended


async def run_outage(
    chaos: Chaos,
    name: str,
    dependency: str,
    seconds: float,
    begin: Callable[[], None],
    end: Callable[[], None],
    capsys: pytest.CaptureFixture[str],
) -> dict[str, float]:
    """Load, ``begin()``, ``seconds`` of outage, ``end()``, load on for at least
    ``AFTER`` s and until recovered; then check and print. Returns the numbers."""
    client = openai.AsyncOpenAI(
        base_url=chaos.gw.base_url, api_key=chaos.gw.api_key, max_retries=0, timeout=30
    )
    stale_before = await stale_answers(chaos)
    load = Load(client)
    load.start()
    await asyncio.sleep(WARMUP)  # the key is in use before the outage
    began = time.monotonic()
    begin()
    await asyncio.sleep(seconds)
    end()
    ended = time.monotonic()
    ready_after, rows_after = await measure_recovery(chaos, load, dependency, ended)
    await asyncio.sleep(max(0.0, ended + AFTER - time.monotonic()))
    answers = await load.stop()
    await client.close()

    ids = [a.request_id for a in answers if a.request_id]
    rows = await chaos.gw.rows_for(ids, timeout=60)
    chaos.requests += len(answers)
    total = (await chaos.gw.fetch("SELECT count(*) AS n FROM usage_records"))[0]["n"]

    statuses = Counter((a.status, a.code) for a in answers)
    during = [a.seconds for a in answers if began <= a.sent <= ended]
    everything = sorted(a.seconds for a in answers)
    stale = await stale_answers(chaos) - stale_before
    with capsys.disabled():
        print(
            f"\n{name}: {seconds:.0f}s outage, {len(answers)} requests at {RATE:.0f}/s, "
            f"statuses {dict(statuses)}; latency p50 {1000 * statistics.median(everything):.1f} "
            f"ms, p99 {1000 * statistics.quantiles(everything, n=100)[98]:.1f} ms, max during "
            f"the outage {1000 * max(during):.0f} ms; rows {len(rows)} = requests "
            f"{len(answers)} (table {total} for {chaos.requests} sent by this module); key "
            f"answered from a stale entry {stale:.0f}x; recovery: /readyz {dependency} ok "
            f"{ready_after:.2f}s after it came back, rows of every request sent until then "
            f"in Postgres {rows_after:.2f}s after"
        )
        slowest = sorted(answers, key=lambda a: a.seconds)[-3:]
        print(
            "  slowest: "
            + ", ".join(f"{1000 * a.seconds:.0f} ms at t{a.sent - began:+.1f}s" for a in slowest)
            + f" (outage from t+0 to t+{ended - began:.1f}s)"
        )
    # The key kept working: no 401, no 503 auth_unavailable, nothing failed.
    assert statuses == {(200, None): len(answers)}, statuses
    assert max(everything) < LATENCY_BOUND
    assert len(rows) == len(answers) == len(set(ids))
    assert total == chaos.requests
    return {"stale_key_answers": stale, "ready_after": ready_after, "rows_after": rows_after}


async def test_postgres_stopped_for_90_s_under_load(
    chaos: Chaos, capsys: pytest.CaptureFixture[str]
) -> None:
    numbers = await run_outage(
        chaos,
        "Postgres stopped",
        "postgres",
        PG_OUTAGE,
        chaos.proxy.cut,
        chaos.proxy.restore,
        capsys,
    )
    if PG_OUTAGE > 60:  # past the 60 s of freshness: answered from its stale entry
        assert numbers["stale_key_answers"] > 0


async def test_postgres_frozen_for_25_s_under_load(
    chaos: Chaos, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_outage(
        chaos,
        "Postgres frozen",
        "postgres",
        PG_FREEZE,
        chaos.proxy.freeze,
        chaos.proxy.thaw,
        capsys,
    )


async def test_redis_frozen_under_load(chaos: Chaos, capsys: pytest.CaptureFixture[str]) -> None:
    await run_outage(
        chaos, "Redis frozen", "redis", REDIS_OUTAGE, chaos.redis.freeze, chaos.redis.thaw, capsys
    )


async def test_redis_killed_under_load(chaos: Chaos, capsys: pytest.CaptureFixture[str]) -> None:
    await run_outage(
        chaos, "Redis killed", "redis", REDIS_OUTAGE, chaos.redis.kill, chaos.redis.start, capsys
    )
