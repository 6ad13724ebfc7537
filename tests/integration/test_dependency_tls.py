"""TLS to Postgres and Redis, with nothing but the URLs (README, "TLS").

A private Postgres and a private redis-server that accept TLS only, and only from a
client certificate the test CA signed (``tests.tls_services``): the gateway's own code
paths (``ext-proc migrate`` as a user runs it, the connection pool, the Redis client)
connect with the URL parameters the README documents (``sslmode=verify-full``,
``sslrootcert``, ``sslcert``, ``sslkey``; ``rediss://`` with ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``), and refuse a server whose certificate the CA did not
sign. Nothing else is needed in the code: asyncpg and redis-py read those parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from ext_proc.stores.postgres import create_pool
from ext_proc.stores.redis import create_redis
from tests.tls_certs import PKI, make_pki
from tests.tls_services import ServiceUnavailable, TLSPostgres, TLSRedis


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    # The `postgres` user (the private server's, when the tests run as root) reads the
    # client files only through the client; the server gets copies of its own.
    return make_pki(folder)


@pytest.fixture(scope="module")
def tls_postgres(pki: PKI) -> Iterator[TLSPostgres]:
    server = TLSPostgres(pki)
    try:
        server.start()
    except ServiceUnavailable as exc:
        pytest.skip(f"no TLS Postgres: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_redis(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    server = TLSRedis(pki, tmp_path_factory.mktemp("tls-redis"))
    try:
        server.start()
    except ServiceUnavailable as exc:
        pytest.skip(f"no TLS Redis: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _ext_proc(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


# --------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------


async def test_migrate_and_pool_over_verified_tls_with_a_client_certificate(
    tls_postgres: TLSPostgres,
) -> None:
    name = await tls_postgres.create_database(f"gw_tls_{uuid.uuid4().hex[:8]}")
    url = tls_postgres.url(name)
    result = _ext_proc("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stdout + result.stderr

    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        row = await pool.fetchrow(
            "SELECT s.ssl, s.version, s.client_dn, current_setting('application_name') AS app "
            "FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
        )
        assert row is not None
        assert row["ssl"] is True
        assert row["version"] in ("TLSv1.2", "TLSv1.3")
        assert row["client_dn"] == "/CN=test-client"  # our client certificate was used
        assert row["app"] == "ext-proc"
        # The schema the migration wrote over TLS is there.
        assert await pool.fetchval("SELECT to_regclass('usage_records') IS NOT NULL")
    finally:
        await pool.close()


async def test_postgres_server_signed_by_another_ca_is_refused(
    tls_postgres: TLSPostgres, pki: PKI
) -> None:
    url = tls_postgres.url(rootcert=pki.other_ca)
    result = _ext_proc("migrate", env={"DATABASE_URL": url})
    assert result.returncode != 0
    assert "certificate verify failed" in result.stdout + result.stderr
    with pytest.raises((OSError, asyncpg.InterfaceError, asyncpg.PostgresError)):
        await create_pool(url, min_size=1, max_size=1, connect_timeout=5)


async def test_postgres_refuses_plain_text_and_missing_client_certificates(
    tls_postgres: TLSPostgres,
) -> None:
    # Without TLS: pg_hba's `hostnossl ... reject`.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(tls_postgres.url(sslmode="disable", client=False), timeout=5)
    # TLS, but no client certificate: `clientcert=verify-ca`.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="client certificate"):
        await asyncpg.connect(tls_postgres.url(client=False), timeout=5)


async def test_verify_full_checks_the_host_name(tls_postgres: TLSPostgres) -> None:
    # The server also listens on 127.0.0.2, a name its certificate does not carry
    # (localhost, 127.0.0.1): verify-ca accepts it (the CA signed it), verify-full not.
    other_host = tls_postgres.url(sslmode="verify-ca").replace("@localhost:", "@127.0.0.2:")
    conn = await asyncpg.connect(other_host, timeout=5)
    await conn.close()
    with pytest.raises((OSError, asyncpg.InterfaceError), match=r"127\.0\.0\.2"):
        await asyncpg.connect(other_host.replace("verify-ca", "verify-full"), timeout=5)


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


async def test_redis_client_over_tls_with_a_client_certificate(tls_redis: TLSRedis) -> None:
    client = create_redis(tls_redis.url())
    try:
        key = f"gwtest:tls:{uuid.uuid4().hex}"
        assert await client.set(key, b"1", ex=60)
        assert await client.get(key) == b"1"
        # The server has no plain-text port: this answer came over TLS.
        config = await client.config_get("port")
        assert config["port"] == "0"
    finally:
        await client.aclose()


async def test_redis_server_signed_by_another_ca_is_refused(tls_redis: TLSRedis, pki: PKI) -> None:
    client = create_redis(tls_redis.url(ca=pki.other_ca))
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            await client.ping()
    finally:
        await client.aclose()


async def test_redis_refuses_clients_without_a_certificate(tls_redis: TLSRedis) -> None:
    client = create_redis(tls_redis.url(client=False))
    try:
        # Redis refuses the handshake: the client sees the TLS alert ("certificate
        # required") or, when the server closes first, a reset - never a PONG.
        with pytest.raises(
            redis.ConnectionError, match=r"certificate required|reset by peer|Connection closed"
        ):
            await client.ping()
    finally:
        await client.aclose()
    plain = aioredis.from_url(f"redis://127.0.0.1:{tls_redis.port}/0", socket_timeout=2)
    try:
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            await plain.ping()
    finally:
        await plain.aclose()
