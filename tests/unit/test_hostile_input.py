"""Hostile input on the request path, without Envoy: header bytes that are not UTF-8 (as
Envoy serializes them), bodies nested too deep or repeating keys, and a model allowlist
that must judge the model served, not the name sent."""

from __future__ import annotations

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.server.processor import RequestProcessor
from ext_proc.server.request_json import MAX_NESTING, BodyError, parse_request_json
from ext_proc.server.servicer import SERVICE, ExternalProcessor, add_to_server
from ext_proc.server.wire import decode_request
from tests.unit.test_processor import APP_KEY, LIMITED_KEY, make_gateway, request, settle

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


def _with_raw_header(header: str, raw_value: bytes) -> bytes:
    """A request-body message's wire bytes whose ``header`` attribute holds ``raw_value``
    (bytes that may not be UTF-8: what Envoy sends for such a header)."""
    placeholder = "Q" * len(raw_value)  # same length: the message's sizes stay right
    message = request(CHAT, key=placeholder if header != "content-type" else APP_KEY)
    if header == "content-type":
        attributes = message.attributes["envoy.filters.http.ext_proc"]
        attributes.fields["request.headers['content-type']"].string_value = placeholder
    data = message.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), raw_value)


async def _answer(data: bytes) -> tuple[pb.ProcessingResponse, list[object]]:
    gw, sink = make_gateway()
    message = decode_request(data)
    proc = RequestProcessor(gw)
    try:
        response = await proc.on_request_body(message.request_body, message)
    except Exception as exc:  # RequestError: answered as the servicer does
        response = proc.deny(exc)  # type: ignore[arg-type]
    await settle()
    return response, sink.records


def test_plain_messages_decode_as_usual() -> None:
    message = request(CHAT)
    assert decode_request(message.SerializeToString()) == message


@pytest.mark.parametrize("raw", [b"Bearer \xff\xfe", b"Bearer gwk_\xc3\x28abc", b"\x80"])
async def test_a_key_header_that_is_not_utf8_is_a_clean_401(raw: bytes) -> None:
    data = _with_raw_header("authorization", raw)
    with pytest.raises(Exception, match="UTF-8"):
        pb.ProcessingRequest.FromString(data)  # what grpc's own decoder does with it
    response, records = await _answer(data)
    immediate = response.immediate_response
    assert immediate.status.code == 401
    error = orjson.loads(immediate.body)["error"]
    assert error["code"] == "invalid_api_key" and "UTF-8" in error["message"]
    assert "Decode" not in error["message"] and "grpc" not in error["message"].lower()
    [record] = records
    assert (record.status_code, record.decision) == (401, "denied")  # type: ignore[attr-defined]


async def test_a_content_type_that_is_not_utf8_is_a_clean_400() -> None:
    response, _ = await _answer(_with_raw_header("content-type", b"application/json\xff"))
    immediate = response.immediate_response
    assert immediate.status.code == 400
    assert orjson.loads(immediate.body)["error"]["code"] == "invalid_content_type"


def test_the_servicer_decodes_with_the_repairing_decoder() -> None:
    # What grpc calls on every message: the handler servicer.add_to_server registers.
    registered: list[object] = []

    class Server:
        def add_generic_rpc_handlers(self, handlers: tuple[object, ...]) -> None:
            registered.extend(handlers)

    gw, _ = make_gateway()
    add_to_server(ExternalProcessor(gw), Server())  # type: ignore[arg-type]
    [generic] = registered

    class Call:
        method = f"/{SERVICE}/Process"

    handler = generic.service(Call())  # type: ignore[attr-defined]
    assert handler.request_deserializer is decode_request
    assert handler.request_streaming and handler.response_streaming


def _nested(depth: int) -> bytes:
    return b'{"model": "gpt-4o-mini", "messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}"


def test_nesting_up_to_the_limit_passes_and_deeper_is_refused() -> None:
    # The object itself is level 1 and "x"'s arrays add depth - 1 + 1 levels.
    parse_request_json(_nested(MAX_NESTING - 1))
    with pytest.raises(BodyError, match="nested deeper than 128") as info:
        parse_request_json(_nested(MAX_NESTING))
    assert info.value.code == "invalid_json"
    with pytest.raises(BodyError):
        parse_request_json(_nested(5000))  # far past any parser's recursion limit


def test_many_brackets_without_depth_pass() -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(400)]
    parse_request_json(orjson.dumps({"model": "m", "messages": messages}))


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"model": "a", "model": "b", "messages": []}', "model"),
        (b'{"model": "a", "messages": [{"role": "user", "role": "system"}]}', "role"),
        (b'{"model":"a","stream":false,"stream":true}', "stream"),
    ],
)
def test_repeated_keys_are_refused_naming_the_key(raw: bytes, key: str) -> None:
    with pytest.raises(BodyError, match=repr(key)) as info:
        parse_request_json(raw)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"model": "\xff"}', "invalid_encoding"),
        (b'{"model": "\\ud800"}', "invalid_encoding"),
        (b'{"model": NaN}', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
    ],
)
def test_other_bad_bodies(raw: bytes, code: str) -> None:
    with pytest.raises(BodyError) as info:
        parse_request_json(raw)
    assert info.value.code == code


ALIASED = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
  az: {type: azure_openai, base_url: "https://res.openai.azure.com", api_version: "2024-10-21",
       api_key_env: AZ_KEY}
models:
  gpt-4o-mini: {provider: mock, aliases: [mini]}
  big: {provider: az, deployment: gpt-4o-mini}
policies:
  mini-only: {type: model_allowlist, models: [mini]}
applications:
  limited: {org: o, policies: [mini-only]}
"""


async def test_the_allowlist_judges_the_model_served_not_the_name_sent() -> None:
    gw, _ = make_gateway(config_text=ALIASED)
    # The Azure deployment `gpt-4o-mini` is model `big`: the name is allowed, the model not.
    message = request(
        CHAT,
        key=LIMITED_KEY,
        path="/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
    )
    proc = RequestProcessor(gw)
    with pytest.raises(Exception, match="not allowed") as info:
        await proc.on_request_body(message.request_body, message)
    assert info.value.status == 403  # type: ignore[attr-defined]
    # The allowed model by its catalog name (the allowlist lists only its alias).
    message = request(CHAT, key=LIMITED_KEY)
    response = await RequestProcessor(gw).on_request_body(message.request_body, message)
    assert not response.HasField("immediate_response")
