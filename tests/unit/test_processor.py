"""The request and response processors, without Envoy or databases (a list sink stands
in for the usage writer, a dict for the key table). The usage log's handler has its own
file (test_envoy_log.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ext_proc.auth.authenticator import Authenticator
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, generate_key, hash_key
from ext_proc.config.loader import parse_config
from ext_proc.envoy_contract import RESPONSE_OBSERVE, RESPONSE_PROCESS
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.routing.catalog import Catalog
from ext_proc.server.context import Gateway, RequestLimits, Runtime
from ext_proc.server.facts import Facts
from ext_proc.server.processor import ATTRIBUTES_KEY, RequestError, RequestProcessor
from ext_proc.server.response import ResponseProcessor
from ext_proc.stores.cache import TieredCache
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.tokens import estimator
from ext_proc.usage.record import UsageRecord

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
  claude: {type: anthropic, base_url: "https://api.anthropic.com", api_key_env: ANTHROPIC_KEY}
  az: {type: azure_openai, base_url: "https://res.openai.azure.com", api_version: "2024-10-21",
       api_key_env: AZ_KEY}
models:
  gpt-4o-mini: {provider: mock}
  azure-mini: {provider: az, deployment: mini-prod}
  claude-4: {provider: claude, deployment: claude-sonnet-4-20250514}
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
    *, max_bytes: int = 4096, az_key: str | None = "az-secret", config_text: str = CONFIG
) -> tuple[Gateway, ListSink]:
    config = parse_config(config_text)
    catalog = Catalog.build(config, {"mock": None, "az": az_key, "claude": "anthropic-secret"})
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
    items = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=items))


def request(
    body_obj: Any,
    *,
    key: str | None = APP_KEY,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    content_type: str = "application/json",
    key_header: str = "authorization",
) -> pb.ProcessingRequest:
    """A request-body message as the request filter sends it: headers as attributes."""
    raw = body_obj if isinstance(body_obj, bytes) else orjson.dumps(body_obj)
    attributes = {
        "request.path": path,
        "request.method": method,
        "request.id": "rid-1",
        "request.headers['content-type']": content_type,
    }
    if key is not None:
        value = f"Bearer {key}" if key_header == "authorization" else key
        attributes[f"request.headers['{key_header}']"] = value
    msg = pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))
    msg.attributes[ATTRIBUTES_KEY].update(attributes)
    return msg


async def send(proc: RequestProcessor, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
    return await proc.on_request_body(msg.request_body, msg)


def metadata(response: pb.ProcessingResponse, namespace: str) -> dict[str, Any]:
    value = response.dynamic_metadata.fields[namespace].struct_value
    return {k: _plain(v) for k, v in value.fields.items()}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    return getattr(value, kind)


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


# ----------------------------------------------------------------- request side


async def test_forward_carries_route_and_facts() -> None:
    gw, sink = make_gateway()
    response = await send(RequestProcessor(gw), request(CHAT))
    route = metadata(response, "gw_route")
    assert route["path"] == "/v1/chat/completions"
    assert route["prov"] == "mock" and route["resp"] == "0"
    assert route["set"] == {}  # the mock provider has no key
    facts = Facts.from_struct(response.dynamic_metadata.fields["gw"].struct_value)
    assert facts is not None
    assert (facts.request_id, facts.app_id, facts.key_id, facts.model, facts.provider) == (
        "rid-1",
        "app",
        "key_app",
        "gpt-4o-mini",
        "mock",
    )
    assert facts.estimated_tokens is not None and facts.estimated_tokens > 0
    assert not response.request_body.response.HasField("body_mutation")
    assert sink.records == []  # a forwarded request is finished by the access log


# A self-hosted model whose upstream name places no encoding, counted in cl100k_base.
IN_HOUSE = CONFIG.replace(
    "models:\n",
    "models:\n  in-house: {provider: mock, deployment: acme-7b, encoding: cl100k_base}\n",
)
# Counts differ between cl100k_base and o200k_base (the default for unknown names).
RUSSIAN = "Привет, как дела? Это проверка подсчёта токенов для старой модели."


async def test_prompt_estimate_uses_the_models_encoding() -> None:
    gw, _ = make_gateway(config_text=IN_HOUSE)
    messages = [{"role": "user", "content": RUSSIAN}]
    body = {"model": "in-house", "messages": messages}
    response = await send(RequestProcessor(gw), request(body))
    facts = Facts.from_struct(response.dynamic_metadata.fields["gw"].struct_value)
    assert facts is not None
    in_cl100k = estimator.estimate_chat(None, messages, encoding="cl100k_base")
    assert facts.estimated_tokens == in_cl100k
    assert in_cl100k != estimator.estimate_chat("acme-7b", messages)


async def test_delivered_text_is_counted_in_the_models_encoding() -> None:
    gw, sink = make_gateway(config_text=IN_HOUSE)
    first = forwarded(model="in-house", catalog_model="in-house", deployment="acme-7b")
    proc = ResponseProcessor(gw, first)
    await proc.on_response_headers(first.response_headers, first)
    chunk = {"model": "acme-7b", "choices": [{"index": 0, "delta": {"content": RUSSIAN}}]}
    msg = pb.ProcessingRequest(
        response_body=pb.HttpBody(body=b"data: " + orjson.dumps(chunk) + b"\n\n")
    )
    await proc.on_response_body(msg.response_body, msg)
    proc.close(cancelled=True)
    await settle()
    [record] = sink.records
    assert record.tokens_estimated is True
    assert record.completion_tokens == estimator.count_texts(
        None, [RUSSIAN], encoding="cl100k_base"
    )
    assert record.completion_tokens != estimator.count_texts("acme-7b", [RUSSIAN])


async def test_azure_route_injects_key_and_stream_usage() -> None:
    gw, _ = make_gateway()
    response = await send(
        RequestProcessor(gw), request({**CHAT, "model": "azure-mini", "stream": True})
    )
    route = metadata(response, "gw_route")
    assert route["path"] == "/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21"
    assert route["set"] == {"api-key": "az-secret"}
    # A stream the gateway does not rewrite: counted by the observe-only response filter.
    assert route["resp"] == RESPONSE_OBSERVE
    new_body = orjson.loads(response.request_body.response.body_mutation.body)
    assert new_body["stream_options"] == {"include_usage": True}
    assert Facts.from_struct(response.dynamic_metadata.fields["gw"].struct_value).response_processor


async def test_translated_request_goes_through_the_response_processor() -> None:
    gw, _ = make_gateway()
    response = await send(
        RequestProcessor(gw), request({**CHAT, "model": "claude-4", "max_tokens": 20})
    )
    route = metadata(response, "gw_route")
    assert route["path"] == "/v1/messages" and route["resp"] == RESPONSE_PROCESS
    assert route["set"]["x-api-key"] == "anthropic-secret"
    sent = orjson.loads(response.request_body.response.body_mutation.body)
    assert sent["model"] == "claude-sonnet-4-20250514" and sent["max_tokens"] == 20
    facts = Facts.from_struct(response.dynamic_metadata.fields["gw"].struct_value)
    assert facts is not None and facts.translation == "openai_anthropic"


async def test_missing_provider_key_is_503() -> None:
    gw, _ = make_gateway(az_key=None)
    with pytest.raises(RequestError) as info:
        await send(RequestProcessor(gw), request({**CHAT, "model": "azure-mini"}))
    assert (info.value.status, info.value.code) == (503, "provider_credential_missing")


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
    with pytest.raises(RequestError) as info:
        await send(proc, request(raw))
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    response = proc.deny(info.value)
    assert response.immediate_response.status.code == 400
    error = orjson.loads(response.immediate_response.body)["error"]
    assert error["code"] == code and error["param"] == param
    assert response.immediate_response.details == f"gw_{code}"
    await settle()
    [record] = sink.records
    assert record.decision == "error" and record.status_code == 400 and record.error_code == code
    assert record.recorded_by == "request" and record.app_id == "app"


async def test_wrong_content_type_and_oversize_body() -> None:
    gw, _ = make_gateway(max_bytes=100)
    with pytest.raises(RequestError) as info:
        await send(RequestProcessor(gw), request(CHAT, content_type="text/plain"))
    assert info.value.code == "invalid_content_type"
    with pytest.raises(RequestError) as info:
        await send(RequestProcessor(gw), request({**CHAT, "pad": "x" * 200}))
    assert (info.value.status, info.value.decision) == (413, "denied")


async def test_list_models_through_a_headers_message() -> None:
    gw, sink = make_gateway()
    msg = pb.ProcessingRequest(
        request_headers=headers(
            **{
                ":path": "/v1/models",
                ":method": "GET",
                "x-request-id": "rid-3",
                "authorization": f"Bearer {LIMITED_KEY}",
            }
        )
    )
    response = await RequestProcessor(gw).on_request_headers(msg.request_headers, msg)
    listing = orjson.loads(response.immediate_response.body)
    assert [m["id"] for m in listing["data"]] == ["gpt-4o-mini"]  # the allowlist applies
    assert response.immediate_response.details == "gw_list_models"
    await settle()
    assert sink.records[0].status_code == 200


async def test_headers_phase_mode_refuses_before_the_body() -> None:
    gw, _ = make_gateway()
    for _ in range(2):
        proc = RequestProcessor(gw)
        msg = pb.ProcessingRequest(
            request_headers=headers(
                **{
                    ":path": "/v1/chat/completions",
                    ":method": "POST",
                    "x-request-id": "r",
                    "content-type": "application/json",
                    "authorization": f"Bearer {LIMITED_KEY}",
                }
            )
        )
        assert (await proc.on_request_headers(msg.request_headers, msg)).HasField("request_headers")
        body_msg = request(CHAT, key=None)
        response = await proc.on_request_body(body_msg.request_body, body_msg)
        assert metadata(response, "gw_route")["rl_lr"] == "2"
    proc = RequestProcessor(gw)
    with pytest.raises(RequestError) as info:
        await proc.on_request_headers(msg.request_headers, msg)
    assert (info.value.status, info.value.policy) == (429, "two-per-hour")


@pytest.mark.parametrize(
    ("key", "header", "code"),
    [
        (None, "authorization", "missing_api_key"),
        ("gwk_unknown", "api-key", "invalid_api_key"),
        ("sk-provider-key", "x-api-key", "invalid_api_key"),
    ],
)
async def test_bad_keys_are_401_with_a_record(key: str | None, header: str, code: str) -> None:
    gw, sink = make_gateway()
    proc = RequestProcessor(gw)
    with pytest.raises(RequestError) as info:
        await send(proc, request(CHAT, key=key, key_header=header))
    assert (info.value.status, info.value.code, info.value.decision) == (401, code, "denied")
    proc.deny(info.value)
    await settle()
    [record] = sink.records
    assert record.status_code == 401 and record.app_id is None


async def test_limited_app_carries_ratelimit_values_then_429() -> None:
    gw, _ = make_gateway()
    for expected in ("1", "0"):
        response = await send(RequestProcessor(gw), request(CHAT, key=LIMITED_KEY))
        route = metadata(response, "gw_route")
        assert route["rl_lr"] == "2" and route["rl_rr"] == expected
    with pytest.raises(RequestError) as info:
        await send(RequestProcessor(gw), request(CHAT, key=LIMITED_KEY))
    error = info.value
    assert (error.status, error.code, error.policy) == (429, "rate_limit_exceeded", "two-per-hour")
    assert dict(error.headers)["retry-after"].isdigit()


async def test_allowlist_denies_in_order() -> None:
    gw, _ = make_gateway()
    with pytest.raises(RequestError) as info:
        await send(RequestProcessor(gw), request({**CHAT, "model": "azure-mini"}, key=LIMITED_KEY))
    assert (info.value.status, info.value.code, info.value.policy) == (
        403,
        "model_not_allowed",
        "mini-only",
    )


# ---------------------------------------------------------------- response side


def forwarded(**overrides: Any) -> pb.ProcessingRequest:
    facts = Facts(
        request_id="rid-9",
        started=1.0,
        endpoint="/v1/chat/completions",
        operation="chat",
        app_id="app",
        org_id="o",
        key_id="key_app",
        environment="default",
        model="gpt-4o-mini",
        catalog_model="gpt-4o-mini",
        provider="mock",
        deployment="gpt-4o-mini",
        stream=True,
        estimated_tokens=12,
        response_processor=True,
    )
    for name, value in overrides.items():
        setattr(facts, name, value)
    msg = pb.ProcessingRequest(
        response_headers=headers(**{":status": "200", "content-type": "text/event-stream"})
    )
    facts.write_to(msg.metadata_context.filter_metadata["gw"])
    return msg


async def test_stream_cancel_counts_delivered_text() -> None:
    gw, sink = make_gateway()
    first = forwarded()
    proc = ResponseProcessor(gw, first)
    response = await proc.on_response_headers(first.response_headers, first)
    assert response.mode_override.response_body_mode == response.mode_override.STREAMED
    assert (
        response.dynamic_metadata.fields["gw_response"].struct_value.fields["recorded"].string_value
        == "1"
    )
    chunk = {"model": "m", "choices": [{"index": 0, "delta": {"content": "hello world"}}]}
    msg = pb.ProcessingRequest(
        response_body=pb.HttpBody(body=b"data: " + orjson.dumps(chunk) + b"\n\n")
    )
    await proc.on_response_body(msg.response_body, msg)
    proc.close(cancelled=True)
    proc.close(cancelled=True)  # idempotent: one record
    await settle()
    [record] = sink.records
    assert record.partial is True and record.tokens_estimated is True
    assert record.completion_tokens == 2  # "hello world" in o200k_base
    assert record.prompt_tokens == 12 and record.status_code == 200
    assert record.recorded_by == "response"


async def test_stream_usage_chunk_is_exact() -> None:
    gw, sink = make_gateway()
    first = forwarded()
    proc = ResponseProcessor(gw, first)
    await proc.on_response_headers(first.response_headers, first)
    events = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,'
        b'"total_tokens":13}}\n\ndata: [DONE]\n\n'
    )
    msg = pb.ProcessingRequest(response_body=pb.HttpBody(body=events, end_of_stream=True))
    await proc.on_response_body(msg.response_body, msg)
    await settle()
    [record] = sink.records
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (9, 4, 13)
    assert record.tokens_estimated is False and record.partial is False


async def test_marking_one_answer_recorded_leaves_the_next_unmarked() -> None:
    """A JSON answer to a stream request is recorded here and marked so for the access
    log; an answer without facts must still go to the access log (no shared reply object
    carries the mark over)."""
    gw, _sink = make_gateway()
    first = forwarded()
    first.response_headers.headers.headers[1].raw_value = b"application/json"
    marked = await ResponseProcessor(gw, first).on_response_headers(first.response_headers, first)
    assert metadata(marked, "gw_response") == {"recorded": "1"}
    bare = pb.ProcessingRequest(
        response_headers=headers(**{":status": "200", "content-type": "application/json"})
    )
    unmarked = await ResponseProcessor(gw, bare).on_response_headers(bare.response_headers, bare)
    assert not unmarked.HasField("dynamic_metadata")


async def test_translated_json_answer_is_rewritten() -> None:
    gw, sink = make_gateway()
    first = forwarded(stream=False, translation="openai_anthropic", response_format="anthropic")
    first.response_headers.headers.headers[1].raw_value = b"application/json"
    proc = ResponseProcessor(gw, first)
    response = await proc.on_response_headers(first.response_headers, first)
    assert "content-length" in response.response_headers.response.header_mutation.remove_headers
    answer = orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-20250514",
            "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "Hi!"}],
            "usage": {"input_tokens": 10, "output_tokens": 3},
        }
    )
    msg = pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True))
    out = await proc.on_response_body(msg.response_body, msg)
    completion = orjson.loads(out.response_body.response.body_mutation.body)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hi!"
    await settle()
    assert (sink.records[0].prompt_tokens, sink.records[0].completion_tokens) == (10, 3)
