"""TLS end to end: the official ``openai`` SDK over https to the real Envoy, whose
listener the renderer configured for TLS (``ext-proc envoy-config --tls-cert/--tls-key``)
and for mutual TLS (``--tls-client-ca``); and a whole stack whose Postgres and Redis
accept TLS only (client certificates required), configured by nothing but the URLs.

Certificates come from a private CA the suite makes (``tests.tls_certs``). What each
test proves is in its name; every one checks the usage row the request left, so the
request went the whole way, not only through the handshake.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ext_proc.dev import free_port
from tests.conftest import DatabaseFactory, delete_prefix
from tests.e2e.stack_helpers import OwnStack, new_stack, unique_prefix
from tests.tls_certs import PKI, make_pki
from tests.tls_services import ServiceUnavailable, TLSPostgres, TLSRedis

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", timeout: 30s, retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
policies:
  two-per-hour: {type: rate_limit, requests: 2, window: 1h}
applications:
  tls-app: {org: tls}
  limited-app: {org: tls, policies: [two-per-hour]}
"""

MESSAGES = [{"role": "user", "content": "Hello over TLS."}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _context(
    pki: PKI, *, ca: Path | None = None, client: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def _sdk(base_url: str, key: str, context: ssl.SSLContext) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=key,
        max_retries=0,
        timeout=30,
        http_client=openai.DefaultAsyncHttpxClient(verify=context),
    )


def _https(stack: OwnStack) -> str:
    # The server certificate names localhost and 127.0.0.1; the name is verified.
    return f"https://localhost:{stack.stack.options.listener_port}/v1"


# --------------------------------------------------------------------------------------
# TLS on the listener
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls_stack(
    databases: DatabaseFactory, redis_url: str, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("tls-stack")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("tls"),
        key_app="tls-app",
        label="tls",
        envoy_overrides={
            "tls_cert_file": str(pki.server.cert),
            "tls_key_file": str(pki.server.key),
        },
    )
    try:
        yield stack
    finally:
        await stack.stop()


async def test_openai_sdk_over_https_plain_and_streamed(tls_stack: OwnStack, pki: PKI) -> None:
    sdk = _sdk(_https(tls_stack), tls_stack.api_key, _context(pki))
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    completion = raw.parse()
    assert completion.usage is not None
    request_ids = [raw.headers["x-request-id"]]
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and chunks[-1].usage is not None
    async with sdk.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as streamed:
        request_ids.append(streamed.headers["x-request-id"])
        [_ async for _ in streamed.iter_lines()]

    rows = await tls_stack.rows_for(request_ids)
    plain, streamed_row = rows[request_ids[0]], rows[request_ids[1]]
    assert plain["status_code"] == 200 and plain["decision"] == "allowed"
    assert plain["total_tokens"] == completion.usage.total_tokens
    assert plain["tokens_estimated"] is False
    assert streamed_row["stream"] is True and streamed_row["status_code"] == 200
    assert streamed_row["completion_tokens"] > 0


async def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_stack: OwnStack, pki: PKI
) -> None:
    sdk = _sdk(_https(tls_stack), tls_stack.api_key, _context(pki, ca=pki.other_ca))
    with pytest.raises(openai.APIConnectionError) as caught:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(caught.value.__cause__) + str(caught.value)


async def test_plain_http_gets_no_http_answer_from_a_tls_listener(tls_stack: OwnStack) -> None:
    url = f"http://127.0.0.1:{tls_stack.stack.options.listener_port}/v1/models"
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(url, headers={"authorization": f"Bearer {tls_stack.api_key}"})


# --------------------------------------------------------------------------------------
# Mutual TLS on the listener; Postgres and Redis over TLS
# --------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
async def mtls_stack(
    tls_postgres: TLSPostgres,
    tls_redis: TLSRedis,
    pki: PKI,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[OwnStack]:
    """Everything over TLS: apps → Envoy (client certificates required), ext_proc →
    Postgres (verify-full + client certificate), ext_proc → Redis (rediss:// + client
    certificate). The ext_proc server, `ext-proc migrate`/`apply` and the key tool get
    the URLs and nothing else."""
    database = await tls_postgres.create_database(f"gw_mtls_{uuid.uuid4().hex[:8]}")
    database_url = tls_postgres.url(database)
    redis_url = tls_redis.url()
    tmp = Path(tmp_path_factory.mktemp("mtls-stack"))
    mock_port = free_port()
    stack = new_stack(
        tmp,
        CONFIG.replace("{mock}", str(mock_port)),
        mock_port,
        key_app="tls-app",
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=unique_prefix("mtls"),
        envoy_overrides={
            "tls_cert_file": str(pki.server.cert),
            "tls_key_file": str(pki.server.key),
            "tls_client_ca_file": str(pki.ca),
        },
    )
    await asyncio.to_thread(stack.start)
    own = OwnStack(stack, database_url)
    try:
        yield own
    finally:
        await asyncio.to_thread(stack.stop)
        await delete_prefix(redis_url, stack.options.redis_prefix)


async def test_mutual_tls_accepts_a_client_certificate_and_everything_runs_over_tls(
    mtls_stack: OwnStack, pki: PKI
) -> None:
    context = _context(pki, client=(pki.client.cert, pki.client.key))
    sdk = _sdk(_https(mtls_stack), mtls_stack.api_key, context)
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    completion = raw.parse()
    assert completion.usage is not None
    # The row went to the TLS-only Postgres, through the ext_proc server's pool.
    rows = await mtls_stack.rows_for([raw.headers["x-request-id"]])
    row = rows[raw.headers["x-request-id"]]
    assert row["app_id"] == "tls-app" and row["status_code"] == 200
    assert row["total_tokens"] == completion.usage.total_tokens
    # The server's connections to it are TLS ones, with our client certificate.
    sessions = await mtls_stack.fetch(
        "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_ssl s "
        "JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'ext-proc%'"
    )
    assert sessions, "the ext_proc server holds no connection to Postgres"
    assert all(s["ssl"] and s["client_dn"] == "/CN=test-client" for s in sessions), sessions
    # /readyz: both dependencies answer over TLS.
    admin = f"http://127.0.0.1:{mtls_stack.stack.options.admin_port}/readyz"
    async with httpx.AsyncClient(timeout=5) as client:
        ready = (await client.get(admin)).json()
    assert ready["status"] == "ok", ready
    assert ready["checks"]["postgres"]["ok"] is True, ready
    assert ready["checks"]["redis"]["ok"] is True, ready


async def test_rate_limits_count_in_the_tls_redis(mtls_stack: OwnStack, pki: PKI) -> None:
    key = await mtls_stack.create_key("limited-app")
    context = _context(pki, client=(pki.client.cert, pki.client.key))
    sdk = _sdk(_https(mtls_stack), key, context)
    for _ in range(2):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    denied = await mtls_stack.wait_rows(
        "app_id = $1 AND decision = 'denied'", ("limited-app",), expected=1
    )
    assert [r["policy"] for r in denied] == ["two-per-hour"]


@pytest.mark.parametrize("who", ["no certificate", "a certificate another CA signed"])
async def test_mutual_tls_refuses_clients_without_a_certificate_the_ca_signed(
    mtls_stack: OwnStack, pki: PKI, who: str
) -> None:
    client = None if who == "no certificate" else (pki.stranger.cert, pki.stranger.key)
    sdk = _sdk(_https(mtls_stack), mtls_stack.api_key, _context(pki, client=client))
    before = await mtls_stack.fetch("SELECT count(*) AS n FROM usage_records")
    with pytest.raises(openai.APIConnectionError):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # Refused in the handshake: the gateway never saw a request, so no row.
    after = await mtls_stack.fetch("SELECT count(*) AS n FROM usage_records")
    assert after[0]["n"] == before[0]["n"]
