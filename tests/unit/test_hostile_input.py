"""Hostile input on the request path, without Envoy: header bytes that are not UTF-8 (as
Envoy serializes them), bodies nested too deep, repeating keys or holding integers past
64 bits, content types that are not plain JSON, NUL and control characters that must
reach neither an answer raw nor a usage row, and a model allowlist that must judge the
model served, not the name sent."""

from __future__ import annotations

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.server.processor import RequestError, RequestProcessor
from ext_proc.server.request_json import (
    MAX_NESTING,
    BodyError,
    content_type_problem,
    parse_request_json,
)
from ext_proc.server.servicer import SERVICE, ExternalProcessor, add_to_server
from ext_proc.server.wire import decode_request
from ext_proc.usage.record import COLUMNS, MAX_MESSAGE, MAX_TEXT, UsageRecord, record_row
from ext_proc.usage.spool import decode_record, encode_record
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


# --------------------------------------------------------------- NUL and control characters


async def _deny(body: bytes, **kwargs: str) -> tuple[dict[str, object], UsageRecord]:
    """The error body and the one usage record of a request the gateway refuses."""
    gw, sink = make_gateway()
    message = request(body, **kwargs)
    proc = RequestProcessor(gw)
    try:
        response = await proc.on_request_body(message.request_body, message)
    except RequestError as exc:
        response = proc.deny(exc)
    await settle()
    assert response.HasField("immediate_response"), response
    [record] = sink.records
    return orjson.loads(response.immediate_response.body)["error"], record


async def test_a_nul_in_the_model_is_escaped_in_the_answer_and_replaced_in_the_record() -> None:
    error, record = await _deny(b'{"model": "gpt-4o-mini\\u0000", "messages": []}')
    assert error["code"] == "model_not_found"
    assert "gpt-4o-mini\\u0000" in error["message"]  # shown escaped, as repr shows it
    assert "\x00" not in str(error)
    assert record.model == "gpt-4o-mini\ufffd"
    assert record.error_message is not None and "\x00" not in record.error_message


async def test_a_nul_in_a_parameter_name_is_escaped_in_message_param_and_record() -> None:
    body = b'{"model": "claude-4", "a\\u0000": 1, "messages": [{"role": "user", "content": "Hi"}]}'
    error, record = await _deny(body)
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == "a\\u0000"
    assert "\x00" not in str(error["message"]) and "a\\u0000" in str(error["message"])
    assert record.error_message is not None and "\x00" not in record.error_message


async def test_a_nul_in_an_unknown_path_does_not_reach_the_record() -> None:
    error, record = await _deny(orjson.dumps(CHAT), path="/v1/x\x00y")
    assert error["code"] == "unknown_url" and "\\u0000" in str(error["message"])
    assert record.endpoint == "/v1/x\ufffdy"


def test_record_rows_never_carry_nul_surrogates_or_unbounded_text() -> None:
    record = UsageRecord(
        request_id="r\x00",
        model="m\x00" + "x" * 1000,
        response_model="\ud800",
        error_message="e" * 5000,
        policy_violations=["p\x00"],
    )
    row = dict(zip(COLUMNS, record_row(record), strict=True))
    assert row["request_id"] == "r\ufffd"
    assert row["model"] == ("m\ufffd" + "x" * 1000)[:MAX_TEXT]
    assert row["response_model"] == "\ufffd"
    assert row["error_message"] == "e" * MAX_MESSAGE
    assert row["policy_violations"] == ["p\ufffd"]
    plain = UsageRecord(request_id="r", model="gpt-4o-mini", error_message="Grüße")
    assert record_row(plain) == tuple(getattr(plain, c) for c in COLUMNS)  # untouched


def test_a_spooled_record_with_a_lone_surrogate_reads_back() -> None:
    record = UsageRecord(request_id="r", model="a\ud800b", error_message="x\x00")
    back = decode_record(encode_record(record))
    assert back.model == "a\ufffdb"
    assert back.error_message == "x\ufffd"


# ---------------------------------------------------------------------- content types


@pytest.mark.parametrize(
    "value",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
        "application/json ; charset=UTF-8",
        "application/json;",
        'application/json; charset="utf-8"',
        "application/json; charset=Utf-8; x=1",
        'application/json; boundary="a;b\\"c"',
    ],
)
async def test_json_content_types_sdks_send_are_accepted(value: str) -> None:
    assert content_type_problem(value) is None
    gw, _ = make_gateway()
    message = request(CHAT, content_type=value)
    response = await RequestProcessor(gw).on_request_body(message.request_body, message)
    assert not response.HasField("immediate_response")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("application/json; charset=utf-8\ufffd", "not valid UTF-8"),
        ("application/json;\ufffd charset=utf-8", "not valid UTF-8"),
        ("application/json; charset=é", "ASCII"),
        ("application/json; charset=latin1", "charset 'latin1'"),
        ('application/json; charset="utf-16"', "charset 'utf-16'"),
        ("application/json; charset=utf-8; charset=utf-8", "charset twice"),
        ("application/json charset=utf-8", "malformed at 'charset=utf-8'"),
        ("application/json; charset", "malformed at 'charset'"),
        ('application/json; charset="utf-8', "malformed"),
        ("application/json, text/plain", "malformed at ', text/plain'"),
        ("text/plain", "must be application/json"),
        ("application/jsonx", "must be application/json"),
        ("application/json-patch+json", "must be application/json"),
        ("/json", "must be application/json"),
    ],
)
async def test_other_content_types_are_refused_saying_why(value: str, says: str) -> None:
    problem = content_type_problem(value)
    assert problem is not None and says in problem, problem
    error, record = await _deny(orjson.dumps(CHAT), content_type=value)
    assert (error["code"], error["param"]) == ("invalid_content_type", "content-type")
    assert says in str(error["message"])
    assert record.status_code == 400 and record.error_code == "invalid_content_type"


# ------------------------------------------------------------- integers past 64 bits


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "m", "seed": 18446744073709551616}', "seed"),
        (b'{"model": "m", "seed": -9223372036854775809}', "seed"),
        (b'{"model": "m", "n": 1e2, "x": [1, {"y": [0, 100000000000000000000000]}]}', "x[1].y[1]"),
        (
            b'{"model": "m", "tools": [{"function": {"parameters": {"max": 1'
            + b"0" * 30
            + b"}}}]}",
            "tools[0].function.parameters.max",
        ),
    ],
)
def test_an_integer_past_64_bits_is_refused_naming_where(raw: bytes, param: str) -> None:
    with pytest.raises(BodyError, match="outside the 64-bit range") as info:
        parse_request_json(raw)
    assert (info.value.code, info.value.param) == ("invalid_json", param)


def test_integers_within_64_bits_and_floats_pass_exactly() -> None:
    body = parse_request_json(
        b'{"a": 18446744073709551615, "b": -9223372036854775808, "c": 9999999999999999999,'
        b' "d": 1e30, "e": 1234567890123456789012.5, "f": "123456789012345678901234"}'
    )
    assert body["a"] == 2**64 - 1 and body["b"] == -(2**63) and type(body["c"]) is int
    assert body["d"] == 1e30 and body["f"] == "123456789012345678901234"


async def test_an_integer_past_64_bits_is_a_400_naming_the_param() -> None:
    raw = b'{"model": "gpt-4o-mini", "seed": 18446744073709551616, "messages": []}'
    error, record = await _deny(raw)
    assert (error["code"], error["param"]) == ("invalid_json", "seed")
    assert record.status_code == 400 and record.decision == "error"


def _token_ids(extra: str = "") -> bytes:
    """A large embeddings body of token ids (the parser's integer-dense way)."""
    ids = ", ".join(str(1000 + i % 90000) for i in range(6000))
    return f'{{"model": "m", "input": [[{ids}{extra}]]}}'.encode()


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ("", False),
        (", 18446744073709551615", False),  # u64's largest: orjson keeps it exact
        (", -9223372036854775808", False),
        (", 18446744073709551616", True),
        (", -9223372036854775809", True),
    ],
)
def test_token_id_bodies_are_checked_too(extra: str, refused: bool) -> None:
    raw = _token_ids(extra)
    assert len(raw) > 16 * 1024
    if not refused:
        assert parse_request_json(raw)["input"][0][-1] == int(extra[2:] or "6999")
        return
    with pytest.raises(BodyError) as info:
        parse_request_json(raw)
    assert (info.value.code, info.value.param) == ("invalid_json", "input[0][6000]")


def test_a_token_id_body_still_has_its_keys_checked() -> None:
    raw = _token_ids().replace(b'{"model": "m",', b'{"model": "m", "model": "n",', 1)
    with pytest.raises(BodyError, match="repeats the key 'model'"):
        parse_request_json(raw)
