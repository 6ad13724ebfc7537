"""The per-request processor, phase by phase, without Envoy or databases."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.auth.authenticator import Authenticator
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, generate_key, hash_key
from ext_proc.config.loader import parse_config
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.routing.catalog import Catalog
from ext_proc.server.context import Gateway, RequestLimits, Runtime
from ext_proc.server.processor import RequestError, RequestProcessor
from ext_proc.stores.cache import TieredCache
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.usage.record import UsageRecord

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
  az: {type: azure_openai, base_url: "https://res.openai.azure.com", api_version: "2024-10-21",
       api_key_env: AZ_KEY}
models:
  gpt-4o-mini: {provider: mock}
  azure-mini: {provider: az, deployment: mini-prod}
policies:
  two-per-hour: {type: rate_limit, requests: 2, window: 1h}
  mini-only: {type: model_allowlist, models: [gpt-4o-mini]}
applications:
  app: {org: o}
  limited: {org: o, policies: [two-per-hour, mini-only]}
"""

# The key table, as the key cache's loader sees it (the integration and e2e tests use
# the real Postgres; these unit tests need only the lookup).
APP_KEY = generate_key()
LIMITED_KEY = generate_key()
KEYS = {
    hash_key(APP_KEY): KeyRecord("key_app", "app", "o", "default", APP_KEY[:12], None, None),
    hash_key(LIMITED_KEY): KeyRecord(
        "key_lim", "limited", "o", "default", LIMITED_KEY[:12], None, None
    ),
}


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def make_gateway(
    *, max_bytes: int = 4096, az_key: str | None = "az-secret"
) -> tuple[Gateway, ListSink]:
    config = parse_config(CONFIG)
    catalog = Catalog.build(config, {"mock": None, "az": az_key})
    sink = ListSink()
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "t:")

    async def lookup(key_hash: str) -> KeyRecord | None:
        return KEYS.get(key_hash)

    cache: TieredCache[KeyRecord] = TieredCache("keys", lookup, codec=KeyRecordCodec(), kind="key")
    runtime = Runtime(
        config, catalog, PolicyEngine(config, limits, metrics), RequestLimits(max_bytes)
    )
    return Gateway(runtime, sink, metrics, Authenticator(cache)), sink


def headers(**values: str) -> pb.HttpHeaders:
    items = [
        base_pb2.HeaderValue(
            key=k.replace("_", "-") if not k.startswith(":") else k, raw_value=v.encode()
        )
        for k, v in values.items()
    ]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=items))


def request_headers(
    path: str = "/v1/chat/completions", method: str = "POST", **extra: str
) -> pb.HttpHeaders:
    msg = headers(
        **{
            ":path": path,
            ":method": method,
            "x-request-id": "rid-1",
            "content-type": "application/json",
            "authorization": f"Bearer {APP_KEY}",
        }
    )
    for k, v in extra.items():
        msg.headers.headers.append(
            base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
        )
    return msg


def body(obj: Any, end: bool = True) -> pb.HttpBody:
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return pb.HttpBody(body=raw, end_of_stream=end)


def mutations(response: pb.ProcessingResponse, phase: str) -> dict[str, str]:
    common = getattr(response, phase).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_request_headers_strip_app_key_and_route_header() -> None:
    gw, _ = make_gateway()
    proc = RequestProcessor(gw)
    response = await proc.on_request_headers(request_headers())
    removed = set(response.request_headers.response.header_mutation.remove_headers)
    assert {"authorization", "api-key", "x-api-key", "x-gateway-provider"} <= removed


async def test_openai_route_sets_path_and_provider_without_body_change() -> None:
    gw, _ = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    response = await proc.on_request_body(body(CHAT))
    set_headers = mutations(response, "request_body")
    assert set_headers[":path"] == "/v1/chat/completions"
    assert set_headers["x-gateway-provider"] == "mock"
    assert "authorization" not in set_headers  # the mock provider has no key
    assert response.request_body.response.clear_route_cache is True
    assert not response.request_body.response.HasField("body_mutation")


async def test_azure_route_injects_key_and_stream_usage() -> None:
    gw, _ = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    response = await proc.on_request_body(body({**CHAT, "model": "azure-mini", "stream": True}))
    set_headers = mutations(response, "request_body")
    assert (
        set_headers[":path"]
        == "/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21"
    )
    assert set_headers["api-key"] == "az-secret"
    new_body = orjson.loads(response.request_body.response.body_mutation.body)
    assert new_body["stream_options"] == {"include_usage": True}
    assert set_headers["content-length"] == str(
        len(response.request_body.response.body_mutation.body)
    )


async def test_missing_provider_key_is_503() -> None:
    gw, _ = make_gateway(az_key=None)
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    with pytest.raises(RequestError) as info:
        await proc.on_request_body(body({**CHAT, "model": "azure-mini"}))
    assert info.value.status == 503
    assert info.value.code == "provider_credential_missing"


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"", "invalid_json", None),
        (b"{", "invalid_json", None),
        (b'"text"', "invalid_json", None),
        (b'{"model": "gpt-4o-mini", "messages": "x"}', "invalid_type", "messages"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"content": "no role"}]}',
            "invalid_type",
            "messages[0]",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "stream": "yes"}',
            "invalid_type",
            "stream",
        ),
        (b'{"model": 5, "messages": []}', "missing_required_parameter", "model"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
            "invalid_encoding",
            None,
        ),
    ],
)
async def test_bad_bodies_name_the_problem(raw: bytes, code: str, param: str | None) -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    with pytest.raises(RequestError) as info:
        await proc.on_request_body(body(raw))
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    response = proc.deny(info.value)
    assert response.immediate_response.status.code == 400
    error = orjson.loads(response.immediate_response.body)["error"]
    assert error["code"] == code and error["param"] == param
    assert response.immediate_response.details == f"gw_{code}"
    await settle()
    [record] = sink.records
    assert record.decision == "error" and record.status_code == 400 and record.error_code == code


async def test_content_length_over_limit_is_413_in_headers_phase() -> None:
    gw, sink = make_gateway(max_bytes=100)
    proc = RequestProcessor(gw)
    with pytest.raises(RequestError) as info:
        await proc.on_request_headers(request_headers(content_length="101"))
    assert info.value.status == 413 and info.value.decision == "denied"
    proc.deny(info.value)
    await settle()
    assert sink.records[0].request_bytes == 101


async def test_chunked_body_over_limit_is_413_in_body_phase() -> None:
    gw, _ = make_gateway(max_bytes=100)
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    with pytest.raises(RequestError) as info:
        await proc.on_request_body(body({**CHAT, "pad": "x" * 200}))
    assert info.value.status == 413


async def test_list_models_answered_immediately() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    response = await proc.on_request_headers(request_headers("/v1/models", "GET"))
    listing = orjson.loads(response.immediate_response.body)
    assert {m["id"] for m in listing["data"]} == {"gpt-4o-mini", "azure-mini"}
    await settle()
    assert sink.records[0].status_code == 200


async def test_json_response_usage_is_exact() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    await proc.on_request_body(body(CHAT))
    await proc.on_response_headers(
        headers(**{":status": "200", "content-type": "application/json"})
    )
    payload = {
        "model": "gpt-4o-mini-2024",
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    raw = orjson.dumps(payload)
    await proc.on_response_body(pb.HttpBody(body=raw[:10]))
    await proc.on_response_body(pb.HttpBody(body=raw[10:], end_of_stream=True))
    await settle()
    [record] = sink.records
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (11, 7, 18)
    assert record.cached_tokens == 4
    assert record.response_model == "gpt-4o-mini-2024"
    assert record.tokens_estimated is False and record.decision == "allowed"


async def test_stream_override_and_cancel_counts_delivered_text() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    await proc.on_request_body(body({**CHAT, "stream": True}))
    response = await proc.on_response_headers(
        headers(**{":status": "200", "content-type": "text/event-stream"})
    )
    assert response.mode_override.response_body_mode == response.mode_override.STREAMED
    chunk = {"model": "m", "choices": [{"index": 0, "delta": {"content": "hello world"}}]}
    await proc.on_response_body(pb.HttpBody(body=b"data: " + orjson.dumps(chunk) + b"\n\n"))
    proc.close(cancelled=True)
    await settle()
    [record] = sink.records
    assert record.partial is True and record.tokens_estimated is True
    assert record.completion_tokens == 2  # "hello world" in o200k_base
    assert record.prompt_tokens == record.estimated_prompt_tokens > 0
    assert record.status_code == 200


async def test_cancel_before_response_is_499() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    await proc.on_request_body(body(CHAT))
    proc.close(cancelled=True)
    proc.close(cancelled=True)  # idempotent: one record
    await settle()
    [record] = sink.records
    assert record.status_code == 499 and record.partial is True and record.decision == "error"


async def test_upstream_error_bills_nothing() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(request_headers())
    await proc.on_request_body(body(CHAT))
    await proc.on_response_headers(
        headers(**{":status": "500", "content-type": "application/json"})
    )
    await proc.on_response_body(
        pb.HttpBody(body=b'{"error": {"message": "boom"}}', end_of_stream=True)
    )
    await settle()
    [record] = sink.records
    assert record.decision == "error" and record.error_code == "upstream_error"
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (0, 0, 0)


def keyed_headers(
    key: str | None, path: str = "/v1/chat/completions", method: str = "POST"
) -> pb.HttpHeaders:
    values = {
        ":path": path,
        ":method": method,
        "x-request-id": "rid-2",
        "content-type": "application/json",
    }
    if key is not None:
        values["api-key"] = key
    return headers(**values)


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "missing_api_key"),
        ("gwk_unknown", "invalid_api_key"),
        ("sk-provider-key", "invalid_api_key"),
    ],
)
async def test_bad_keys_are_401_with_a_record(key: str | None, code: str) -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    with pytest.raises(RequestError) as info:
        await proc.on_request_headers(keyed_headers(key))
    assert (info.value.status, info.value.code, info.value.decision) == (401, code, "denied")
    proc.deny(info.value)
    await settle()
    [record] = sink.records
    assert record.status_code == 401 and record.app_id is None


async def test_identity_lands_in_the_record() -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(keyed_headers(APP_KEY))
    await proc.on_request_body(body(CHAT))
    proc.close(cancelled=True)
    await settle()
    [record] = sink.records
    assert (record.key_id, record.app_id, record.org_id, record.environment) == (
        "key_app",
        "app",
        "o",
        "default",
    )


async def test_limited_app_gets_ratelimit_headers_then_429() -> None:
    gw, _ = make_gateway()
    for expected in ("1", "0"):
        proc = RequestProcessor(gw)
        await proc.on_request_headers(keyed_headers(LIMITED_KEY))
        await proc.on_request_body(body(CHAT))
        response = await proc.on_response_headers(
            headers(**{":status": "200", "content-type": "application/json"})
        )
        added = mutations(response, "response_headers")
        assert added["x-ratelimit-limit-requests"] == "2"
        assert added["x-ratelimit-remaining-requests"] == expected
    proc = RequestProcessor(gw)
    with pytest.raises(RequestError) as info:
        await proc.on_request_headers(keyed_headers(LIMITED_KEY))
    error = info.value
    assert (error.status, error.code, error.policy) == (429, "rate_limit_exceeded", "two-per-hour")
    assert dict(error.headers)["retry-after"].isdigit()


async def test_allowlist_denies_and_filters_model_list() -> None:
    gw, _ = make_gateway()
    proc = RequestProcessor(gw)
    await proc.on_request_headers(keyed_headers(LIMITED_KEY))
    with pytest.raises(RequestError) as info:
        await proc.on_request_body(body({**CHAT, "model": "azure-mini"}))
    assert (info.value.status, info.value.code, info.value.policy) == (
        403,
        "model_not_allowed",
        "mini-only",
    )
    proc = RequestProcessor(gw)
    response = await proc.on_request_headers(keyed_headers(APP_KEY, "/v1/models", "GET"))
    assert len(orjson.loads(response.immediate_response.body)["data"]) == 2
