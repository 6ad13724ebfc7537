"""``/readyz`` of a real ``ext-proc serve`` process (in this test's event loop), its
Postgres and Redis each behind a TCP proxy we cut or freeze: every check says what the
dependency does now, 200 ``degraded`` while the declared fallbacks let it serve, 503
when it cannot, and a hung dependency does not hang the probe."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ext_proc.apply import apply, plan
from ext_proc.auth.store import create_key
from ext_proc.config import parse_config
from ext_proc.server.app import ServeOptions, Service
from ext_proc.settings import Settings
from tests.conftest import poll_async
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

GATEWAY = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:8001"}
models:
  gpt-4o-mini: {provider: mock}
policies:
  open-limit: {type: rate_limit, requests: 100, window: 60s}
  closed-limit: {type: rate_limit, requests: 100, window: 60s, on_error: deny}
applications:
  lenient: {org: acme, policies: [open-limit]}
  strict: {org: acme, policies: [closed-limit]}
"""

ALL_STRICT = GATEWAY.replace(
    "lenient: {org: acme, policies: [open-limit]}", "lenient: {org: acme, policies: [closed-limit]}"
)


@pytest.fixture
def gateway_yaml() -> str:
    return GATEWAY


@pytest.fixture
def proxies(pg_server_url: str, redis_url: str) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    pg, redis = TcpProxy.for_url(pg_server_url), TcpProxy.for_url(redis_url)
    pg.start()
    redis.start()
    try:
        yield pg, redis
    finally:
        pg.close()
        redis.close()


@pytest.fixture
async def service(
    pool: asyncpg.Pool,
    migrated_url: str,
    redis_url: str,
    redis_prefix: str,
    proxies: tuple[TcpProxy, TcpProxy],
    tmp_path: Path,
) -> AsyncIterator[Service]:
    pg, redis = proxies
    settings = Settings(
        database_url=pg.url(migrated_url),
        redis_url=redis.url(redis_url),
        grpc_port=0,
        admin_port=0,
        metrics_port=0,
        spool_dir=tmp_path / "spool",
        usage_log=tmp_path / "usage-log" / "envoy.jsonl",
        redis_prefix=redis_prefix,
    )
    service = Service(settings, ServeOptions(config_path=None))
    await service.start()
    try:
        yield service
    finally:
        pg.thaw()
        redis.thaw()
        await service.stop()


async def readyz(service: Service) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{service.admin_port}/readyz")
    return response.status_code, response.json(), time.monotonic() - started


async def wait_ready(
    service: Service,
    status: str,
    postgres: bool | None = None,
    redis: bool | None = None,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """Poll /readyz (bounded) until its status is ``status`` (and the checks say
    ``postgres`` / ``redis`` when given); returns the body."""
    last: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal last
        _, last, _ = await readyz(service)
        checks = last["checks"]
        return (
            last["status"] == status
            and postgres in (None, checks["postgres"]["ok"])
            and redis in (None, checks["redis"]["ok"])
        )

    assert await poll_async(check, timeout=timeout, interval=0.2), last
    return last


async def test_readiness_follows_the_dependencies(
    service: Service,
    pool: asyncpg.Pool,
    proxies: tuple[TcpProxy, TcpProxy],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg, redis = proxies
    code, body, _ = await readyz(service)
    assert code == 200 and body["status"] == "ok", body
    checks = body["checks"]
    assert set(checks) == {"postgres", "redis", "config"}
    assert checks["postgres"]["ok"] is True and checks["redis"]["ok"] is True
    assert checks["config"] == {
        "ok": True,
        "source": "postgres",
        "grpc_port": service.grpc_port,
        "fingerprint": checks["config"]["fingerprint"],
    }

    # Postgres stops: nothing cached yet, but Redis may hold keys: degraded.
    pg.cut()
    body = await wait_ready(service, "degraded", postgres=False, redis=True)
    assert "spooled" in body["checks"]["postgres"]["detail"]

    # Redis stops too: no key can be checked at all: 503.
    redis.cut()
    body = await wait_ready(service, "unavailable")
    assert body["reasons"] == ["Postgres is down and no API key is cached: none can be checked"]
    code, _, _ = await readyz(service)
    assert code == 503

    # With a key in the cache (a request authenticated before the outage) it serves it.
    pg.restore()
    redis.restore()
    await wait_ready(service, "ok")
    new = await create_key(pool, "lenient")
    assert service.gateway is not None
    await service.gateway.auth.authenticate({"authorization": f"Bearer {new.key}"})
    pg.cut()
    redis.cut()
    body = await wait_ready(service, "degraded", postgres=False, redis=False)
    assert body["checks"]["postgres"]["keys_cached"] == 1

    # Redis down, Postgres up: one app fails closed, the other is served: degraded.
    pg.restore()
    body = await wait_ready(service, "degraded", postgres=True, redis=False)
    assert body["checks"]["redis"]["fail_closed_policies"] == ["closed-limit"]

    # Every application fails closed while Redis is down: it cannot serve: 503.
    await apply(pool, await plan(pool, parse_config(ALL_STRICT), prune=False))
    await service.reload()
    body = await wait_ready(service, "unavailable")
    assert body["reasons"] == ["Redis is down and every application has a fail-closed limit"]

    redis.restore()
    await wait_ready(service, "ok")

    # Hung rather than stopped: the probes are bounded, they do not hang the answer.
    pg.freeze()
    redis.freeze()
    await wait_ready(service, "unavailable", postgres=False, redis=False)
    code, body, took = await readyz(service)
    assert code == 503
    assert body["checks"]["postgres"]["error"].startswith("no answer within")
    assert "Timeout" in body["checks"]["redis"]["error"]  # its own 250 ms socket timeout
    assert took < 1.5
    with capsys.disabled():
        print(f"\n/readyz, Postgres and Redis hung: {body['status']} in {1000 * took:.0f} ms")
