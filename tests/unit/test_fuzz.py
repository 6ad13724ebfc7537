"""Fuzzing the request side (the Hardening issue, item 4): tens of thousands of generated
requests through ``RequestProcessor`` exactly as the servicer drives it, from the wire
bytes Envoy sends (``wire.decode_request``), without Envoy or databases.

Every request, whatever it holds, must get:

- no 5xx from the gateway but a documented 503 (``provider_credential_missing``,
  ``auth_unavailable``, ``policy_unavailable``): never a 500 ``gateway_internal_error``;
- an immediate answer in the error shape (OpenAI's, or Anthropic's for ``/v1/messages``)
  with a non-empty message and nothing of Python's or grpc's internals, marked as the
  gateway's own (details ``gw_*``) and carrying its facts for the usage log;
- or, when forwarded, routing metadata the Lua filter can apply and facts the
  finisher can read, and a replacement body (if any) that the gateway itself accepts;
- exactly one usage record (forwarded requests are finished as the usage log or the
  response processor would finish them), with a decision in {allowed, denied, error}
  and nothing Postgres would refuse to store.

Where the README fixes the answer (a key header that is not UTF-8: 401; a body that is
not JSON, not UTF-8, NaN, a lone surrogate, a repeated key, nested too deep: 400; a
content type that is not JSON or not UTF-8: 400; a wrong method: 405) the case is held
to it. Generation is derandomized (CI reruns the same cases); ``pytest -s`` prints how
many requests ran and the answers they got.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_proc.auth.authenticator import Authenticator
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, hash_key, looks_like_key
from ext_proc.config.loader import parse_config
from ext_proc.envoy_contract import RESPONSE_NONE, RESPONSE_OBSERVE, RESPONSE_PROCESS
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.routing.catalog import Catalog
from ext_proc.server.context import Gateway, RequestLimits, Runtime
from ext_proc.server.envoy_log import UsageLog
from ext_proc.server.facts import DENIAL_FIELD, NAMESPACE, ROUTE_NAMESPACE, Facts
from ext_proc.server.processor import RequestError, RequestProcessor
from ext_proc.server.request_json import parse_request_json
from ext_proc.server.response import ResponseProcessor
from ext_proc.server.wire import decode_request
from ext_proc.stores.cache import TieredCache
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.usage.record import UsageRecord
from tests.unit.fuzz_inputs import (
    Case,
    KeySet,
    active_key_headers,
    body_message,
    cases,
    chat_bodies,
    json_content_types,
    plausible_chat_bodies,
    plausible_completion_bodies,
    plausible_embedding_bodies,
    plausible_messages_bodies,
    plausible_responses_bodies,
)
from tests.unit.fuzz_oracle import DOCUMENTED_503, check_documented, error_code, is_anthropic_path

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
  claude: {type: anthropic, base_url: "https://api.anthropic.com", api_key_env: FUZZ_ANTHROPIC}
  az: {type: azure_openai, base_url: "https://res.openai.azure.com", api_version: "2024-10-21",
       api_key_env: FUZZ_AZ}
  az-nokey: {type: azure_openai, base_url: "https://other.openai.azure.com",
             api_version: "2024-10-21", api_key_env: FUZZ_AZ_NOKEY}
models:
  gpt-4o-mini: {provider: mock, aliases: [mini, deny-me]}
  text-embedding-3-small: {provider: mock}
  priced: {provider: mock, deployment: gpt-4o, price: {input: 2.5, cached_input: 1.25, output: 10}}
  azure-mini: {provider: az, deployment: mini-prod}
  keyless: {provider: az-nokey, deployment: keyless-prod}
  claude-4: {provider: claude, deployment: claude-sonnet-4-20250514}
policies:
  generous: {type: rate_limit, requests: 100000000, window: 1h}
  tokens: {type: token_limit, tokens: 1000000000, window: 1h, default_max_tokens: 100}
  size: {type: request_size, max_bytes: 3000, max_messages: 4}
  cel: {type: custom_cel, message: "denied by the fuzz policy",
        pre_check_expression: "max_tokens < 100000 && model != 'deny-me'
          && (stream || message_count < 100) && request_size_bytes >= 0
          && estimated_tokens >= 0",
        post_check_expression: "total_tokens < 100000"}
  allow: {type: model_allowlist,
          models: [gpt-4o-mini, "text-*", priced, azure-mini, keyless, claude-4]}
  money: {type: budget, usd: 1000000, window: 1h, default_max_tokens: 100}
  tight: {type: rate_limit, requests: 3, window: 1h}
  tight-tokens: {type: token_limit, tokens: 500, window: 1h}
applications:
  plain: {org: o}
  checked: {org: o, policies: [generous, tokens, size, cel, allow, money]}
  tight: {org: o2, policies: [tight, tight-tokens]}
"""
PROVIDERS = {"mock", "claude", "az", "az-nokey"}
CREDENTIALS = {"mock": None, "az": "az-secret", "claude": "anthropic-secret", "az-nokey": None}
MAX_BYTES = 64 * 1024  # room for 5,000 levels of nesting; the size test uses its own

_PAST = datetime(2020, 1, 1, tzinfo=UTC)


def _fixed_key(name: str) -> str:
    """A key of the right shape that is the same every run (cases stay reproducible)."""
    key = "gwk_" + (name * 43)[:43]
    assert looks_like_key(key)
    return key


PLAIN, CHECKED, TIGHT = _fixed_key("Plain0"), _fixed_key("Checked1"), _fixed_key("Tight2")
REVOKED, EXPIRED = _fixed_key("Revoked3"), _fixed_key("Expired4")
KEY_TABLE = {
    hash_key(PLAIN): KeyRecord("key_plain", "plain", "o", "default", PLAIN[:12], None, None),
    hash_key(CHECKED): KeyRecord("key_chk", "checked", "o", "default", CHECKED[:12], None, None),
    hash_key(TIGHT): KeyRecord("key_tight", "tight", "o2", "default", TIGHT[:12], None, None),
    hash_key(REVOKED): KeyRecord(
        "key_rev", "plain", "o", "default", REVOKED[:12], None, _PAST + timedelta(days=1)
    ),
    hash_key(EXPIRED): KeyRecord("key_exp", "checked", "o", "default", EXPIRED[:12], _PAST, None),
}
KEYS = KeySet(active=(PLAIN, CHECKED, TIGHT), inactive=(REVOKED, EXPIRED))
ALL_KEYS = (PLAIN, CHECKED, TIGHT, REVOKED, EXPIRED)


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def make_gateway(max_bytes: int = MAX_BYTES) -> tuple[Gateway, ListSink]:
    """The harness of ``test_processor.make_gateway``, with this suite's apps and keys."""
    config = parse_config(CONFIG)
    catalog = Catalog.build(config, CREDENTIALS)
    sink = ListSink()
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "fuzz:")

    async def lookup(key_hash: str) -> KeyRecord | None:
        return KEY_TABLE.get(key_hash)

    cache: TieredCache[KeyRecord] = TieredCache("keys", lookup, codec=KeyRecordCodec(), kind="key")
    runtime = Runtime(
        config, catalog, PolicyEngine(config, limits, metrics), RequestLimits(max_bytes)
    )
    return Gateway(runtime, sink, metrics, Authenticator(cache)), sink


# ------------------------------------------------------------------ the servicer's way


@dataclass
class Result:
    response: pb.ProcessingResponse
    records: list[UsageRecord]
    internal: list[str] = field(default_factory=list)  # tracebacks that became a 500
    forwarded: bool = False


async def drive(gw: Gateway, sink: ListSink, case: Case) -> Result:
    """Send the case's messages as grpc and the servicer would (the same decoder, the
    same exception handling), then finish a forwarded request as Envoy's usage log or
    the response processor would; return the answer and the records written."""
    before = len(sink.records)
    proc = RequestProcessor(gw)
    internal: list[str] = []
    response: pb.ProcessingResponse | None = None
    for data in case.wire():
        message = decode_request(data)  # raises only if grpc would refuse the message
        phase = message.WhichOneof("request")
        assert phase in ("request_headers", "request_body"), phase
        handler = getattr(proc, "on_" + phase)
        try:
            response = await handler(getattr(message, phase), message)
        except RequestError as denial:
            response = proc.deny(denial)
        except Exception as exc:
            internal.append("".join(traceback.format_exception(exc)))
            response = proc.internal_error(exc)
        if response.HasField("immediate_response") or proc.done:
            break
    proc.close(cancelled=False)
    assert response is not None
    forwarded = response.HasField("request_body") and not response.HasField("immediate_response")
    if forwarded:
        await _finish_forwarded(gw, case, response)
    await gw.drain()
    return Result(response, sink.records[before:], internal, forwarded)


async def _finish_forwarded(gw: Gateway, case: Case, response: pb.ProcessingResponse) -> None:
    gw_struct = response.dynamic_metadata.fields[NAMESPACE].struct_value
    facts = Facts.from_struct(gw_struct)
    assert facts is not None, "a forwarded request carries its facts"
    if facts.response_processor:  # streams and translations: the response filter's
        first = pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(
                headers={
                    "headers": [
                        {"key": ":status", "raw_value": b"200"},
                        {"key": "content-type", "raw_value": b"text/event-stream"},
                    ]
                }
            )
        )
        first.metadata_context.filter_metadata[NAMESPACE].CopyFrom(gw_struct)
        responder = ResponseProcessor(gw, first)
        await responder.on_response_headers(first.response_headers, first)
        responder.close(cancelled=True)  # the app went away: still exactly one record
        return
    line = {  # what Envoy's usage log says of a plain 200 answer with usage
        "id": facts.request_id,
        "t0": time.time(),
        "path": case.text_path.partition("?")[0],
        "st": 200,
        "det": "via_upstream",
        "fl": "-",
        "dur": 1500,
        "ttfb": 1000,
        "rqb": len(case.body),
        "rsb": 300,
        "att": 1,
        "uh": "127.0.0.1:9",
        "route": "provider",
        "ct": "application/json",
        "gw": gw_struct.fields["f"].string_value,
        "u": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "model": "m"},
    }
    job = UsageLog(gw).handle(orjson.loads(orjson.dumps(line)))
    assert job is not None, "the usage log records a plain forwarded request"
    await job


# ---------------------------------------------------------------------- the checks

GATEWAY_STATUSES = frozenset({200, 400, 401, 403, 404, 405, 413, 429, 503})
DECISIONS = frozenset({"allowed", "denied", "error"})
# Decision by status, as the README's "Usage records" defines them (404 is "denied" for
# an unknown model or deployment; an unknown URL is a malformed request).
DECISION_BY_STATUS = {
    400: {"error"},
    401: {"denied"},
    403: {"denied"},
    405: {"error"},
    413: {"denied"},
    429: {"denied"},
    503: {"error"},
}


def _storable(record: UsageRecord) -> None:
    """Postgres ``text`` holds no NUL and only valid Unicode: a record with either is
    refused by COPY and never becomes a row."""
    for name in record.__slots__:  # type: ignore[attr-defined]
        value = getattr(record, name)
        if isinstance(value, str):
            assert "\x00" not in value, f"record.{name} holds NUL: {value!r}"
            value.encode("utf-8")  # no lone surrogates
        elif isinstance(value, float):
            assert math.isfinite(value), f"record.{name} = {value}"
    if record.policy_violations:
        assert all("\x00" not in v for v in record.policy_violations)


def check(case: Case, result: Result, stats: Counter[str], max_bytes: int) -> None:
    response = result.response
    assert not result.internal, "the gateway failed inside:\n" + "\n".join(result.internal)
    if result.forwarded:
        _check_forwarded(case, response)
        # A request the README says is refused must not reach a provider either.
        check_documented(case, 200, "(forwarded)", max_bytes=max_bytes, tight_key=TIGHT)
        stats["forwarded"] += 1
    else:
        assert response.HasField("immediate_response"), (
            f"neither answered nor forwarded: {response}"
        )
        stats[_check_immediate(case, response, max_bytes)] += 1
    _check_record(case, result)


def _check_immediate(case: Case, response: pb.ProcessingResponse, max_bytes: int) -> str:
    immediate = response.immediate_response
    status = immediate.status.code
    assert status != 500, f"500 from the gateway: {immediate.body[:300]!r}"
    assert status in GATEWAY_STATUSES, f"undocumented status {status}: {immediate.body[:300]!r}"
    assert immediate.details.startswith("gw_"), immediate.details  # the usage log skips these
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    assert headers.get("content-type") == b"application/json"
    body = orjson.loads(immediate.body)
    if status == 200:  # only the model list is answered 200 by the gateway itself
        assert case.path_kind in ("models", "odd") and body["object"] == "list"
        assert all(isinstance(m["id"], str) for m in body["data"])
        return "200 list_models"
    code = error_code(case, body, shape="anthropic" if is_anthropic_path(case) else "openai")
    if status >= 500:
        assert status == 503 and code in DOCUMENTED_503, (status, code, body)
    check_documented(case, status, code, max_bytes=max_bytes, tight_key=TIGHT)
    # The facts travel with the answer into Envoy's usage log (the crash fallback).
    gw_struct = response.dynamic_metadata.fields[NAMESPACE].struct_value
    facts = Facts.from_struct(gw_struct)
    assert facts is not None and facts.request_id
    said = orjson.loads(gw_struct.fields[DENIAL_FIELD].string_value)
    assert said[0] in DECISIONS and said[2] == code
    return f"{status} {code}"


def _check_forwarded(case: Case, response: pb.ProcessingResponse) -> None:
    assert case.path_kind in ("body", "odd"), case.path_kind
    fields = response.dynamic_metadata.fields
    route = fields[ROUTE_NAMESPACE].struct_value.fields
    path = route["path"].string_value
    assert path.startswith("/") and " " not in path and "\x00" not in path, path
    provider = route["prov"].string_value
    assert provider in PROVIDERS, provider
    mode = route["resp"].string_value
    assert mode in (RESPONSE_NONE, RESPONSE_PROCESS, RESPONSE_OBSERVE)
    set_headers = {k: v.string_value for k, v in route["set"].struct_value.fields.items()}
    for name, value in set_headers.items():
        assert name and name == name.lower() and "\n" not in value and "\r" not in value
        assert not any(key in value for key in ALL_KEYS), "the gateway key goes upstream"
    credential = CREDENTIALS.get(provider)
    if credential is not None:
        assert credential in set_headers.values(), "the provider credential is injected"
    facts = Facts.from_struct(fields[NAMESPACE].struct_value)
    assert facts is not None
    assert facts.request_id == case.request_id
    assert facts.app_id and facts.key_id and facts.org_id
    assert facts.provider == provider and facts.model
    assert isinstance(facts.estimated_tokens, int) and facts.estimated_tokens >= 0
    assert facts.response_processor == (mode != RESPONSE_NONE)
    # The observer cannot rewrite an answer: only streams that are neither translated
    # nor chained (chains have no observed route) go to it.
    observable = facts.stream and not facts.translation and not facts.targets
    assert (mode == RESPONSE_OBSERVE) == observable
    if facts.translation or any(t.translation for t in facts.targets):
        assert mode == RESPONSE_PROCESS
    assert case.method == b"POST"
    common = response.request_body.response
    if common.HasField("body_mutation"):
        sent = common.body_mutation.body
        assert not any(key.encode() in sent for key in ALL_KEYS)
        # What goes upstream is a body the gateway itself would accept.
        parse_request_json(sent)


def _check_record(case: Case, result: Result) -> None:
    assert len(result.records) == 1, f"{len(result.records)} usage records for one request"
    [record] = result.records
    assert record.decision in DECISIONS, record.decision
    _storable(record)
    if result.forwarded:
        assert record.request_id == case.request_id
        assert record.status_code == 200 and record.decision == "allowed"
        return
    status = result.response.immediate_response.status.code
    assert record.status_code == status, (record.status_code, status)
    assert record.recorded_by == "request"
    assert record.request_id == case.request_id
    if status == 200:
        assert record.decision == "allowed"
    elif status in DECISION_BY_STATUS:
        assert record.decision in DECISION_BY_STATUS[status], (status, record.decision)
    assert record.error_code or status == 200


# ------------------------------------------------------------------------ the runs


class Run:
    """One gateway and event loop for a test's examples, and what they did (the time
    includes generating and, on a failure, shrinking)."""

    def __init__(self, name: str, max_bytes: int = MAX_BYTES) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.gw, self.sink = make_gateway(max_bytes)
        self.loop = asyncio.new_event_loop()
        self.stats: Counter[str] = Counter()
        self.count = 0
        self.started = time.perf_counter()

    def __call__(self, case: Case) -> Result:
        self.count += 1
        TOTAL["requests"] += 1
        result = self.loop.run_until_complete(drive(self.gw, self.sink, case))
        check(case, result, self.stats, self.max_bytes)
        return result

    def both_ways(self, case: Case) -> None:
        """The request under each Envoy config the product ships: the default (one body
        message with the headers as attributes) and ``--headers-phase``."""
        self(case)
        self(case.in_headers_phase())

    def close(self) -> None:
        self.loop.close()
        elapsed = time.perf_counter() - self.started
        TOTAL["seconds"] += elapsed
        top = ", ".join(f"{k}: {v}" for k, v in self.stats.most_common(14))
        print(f"\n[fuzz] {self.name}: {self.count} requests in {elapsed:.1f} s ({top})")


TOTAL: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(
        f"\n[fuzz] processor level: {int(TOTAL['requests'])} generated requests "
        f"in {TOTAL['seconds']:.1f} s"
    )


def _run(name: str, max_bytes: int = MAX_BYTES) -> Iterator[Run]:
    run = Run(name, max_bytes)
    try:
        yield run
    finally:
        run.close()


@pytest.fixture
def bodies_run() -> Iterator[Run]:
    yield from _run("bodies")


@pytest.fixture
def heads_run() -> Iterator[Run]:
    yield from _run("paths, methods, key and content-type headers")


@pytest.fixture
def size_run() -> Iterator[Run]:
    yield from _run("sizes", max_bytes=SIZE_LIMIT)


@pytest.fixture
def rewrite_run() -> Iterator[Run]:
    yield from _run("rewritten bodies")


# Derandomized: CI runs the same cases every time (no example database either). Each
# test's examples share one gateway on purpose (a function-scoped ``Run``): limits and
# caches carry state from request to request as in a real process.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)

# Well-addressed requests (a known endpoint, POST, an active key, a JSON content type)
# carrying every kind of body made for that endpoint, so most reach the parser, and
# many the router, the estimator, the translator and the policies.
_ADDRESSED_PATHS = st.sampled_from(
    [
        (b"/v1/chat/completions", "body"),
        (b"/v1/chat/completions", "body"),
        (b"/v1/completions", "body"),
        (b"/v1/embeddings", "body"),
        (b"/v1/messages", "body"),
        (b"/v1/responses", "body"),
        (b"/openai/responses?api-version=2025-04-01-preview", "body"),
        (b"/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21", "body"),
        (b"/openai/deployments/keyless-prod/embeddings?api-version=2024-10-21", "body"),
        (b"/openai/deployments/gpt-4o-mini/completions", "body"),
    ]
)


@settings(FUZZ, max_examples=2800)
@given(
    case=cases(
        KEYS,
        matched_bodies=True,
        path_strategy=lambda: _ADDRESSED_PATHS,
        method_strategy=st.just(b"POST"),
        content_type_strategy=json_content_types,
        key_strategy=active_key_headers,
    )
)
def test_generated_bodies(bodies_run: Run, case: Case) -> None:
    bodies_run.both_ways(case)


@settings(FUZZ, max_examples=2200)
@given(case=cases(KEYS, matched_bodies=True))
def test_generated_paths_methods_and_headers(heads_run: Run, case: Case) -> None:
    heads_run.both_ways(case)


SIZE_LIMIT = 8 * 1024


@settings(FUZZ, max_examples=250)
@given(
    case=cases(
        KEYS,
        body_objects=st.one_of(plausible_chat_bodies, chat_bodies),
        path_strategy=lambda: st.just((b"/v1/chat/completions", "body")),
        method_strategy=st.just(b"POST"),
        content_type_strategy=json_content_types,
        key_strategy=active_key_headers,
        pad_to=st.one_of(
            st.integers(min_value=SIZE_LIMIT - 64, max_value=SIZE_LIMIT + 64),
            st.sampled_from([SIZE_LIMIT, SIZE_LIMIT + 1, 2 * SIZE_LIMIT, 100_000]),
        ),
    )
)
def test_generated_sizes_around_the_limit(size_run: Run, case: Case) -> None:
    size_run.both_ways(case)


# ------------------------------------------------------- the body the provider reads


def _python_reading(raw: bytes) -> Any:
    """How a JSON parser with exact numbers (Python's; Go's json.Number, ...) reads it."""
    return json.loads(raw, parse_float=lambda s: ("float", float(s)))


def _same(a: Any, b: Any) -> bool:
    """JSON-equal, telling an integer from a float (a provider does)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


_REWRITTEN = st.one_of(
    st.tuples(st.just(("/v1/chat/completions", "gpt-4o-mini")), plausible_chat_bodies),
    st.tuples(st.just(("/v1/chat/completions", "priced")), plausible_chat_bodies),
    st.tuples(st.just(("/v1/chat/completions", "azure-mini")), plausible_chat_bodies),
    st.tuples(st.just(("/v1/completions", "azure-mini")), plausible_completion_bodies),
    st.tuples(st.just(("/v1/embeddings", "azure-mini")), plausible_embedding_bodies),
    st.tuples(st.just(("/v1/messages", "claude-4")), plausible_messages_bodies),
    st.tuples(st.just(("/v1/responses", "priced")), plausible_responses_bodies),
    st.tuples(st.just(("/openai/responses", "azure-mini")), plausible_responses_bodies),
)


@settings(FUZZ, max_examples=500)
@given(target_and_body=_REWRITTEN, stream=st.booleans())
def test_a_rewritten_body_says_what_the_app_said(
    rewrite_run: Run, target_and_body: tuple[tuple[str, str], dict[str, Any]], stream: bool
) -> None:
    """When the gateway rewrites a body (the deployment's name, ``stream_options``), the
    provider must read every other field as the app sent it: the README's rule that
    nothing is "interpreted twice". Compared with an exact-number reading of both."""
    (path, model), body = target_and_body
    body = {**body, "model": model, "stream": stream}
    raw = json.dumps(body).encode()
    case = Case(
        method=b"POST",
        path=path.encode(),
        headers={"authorization": f"Bearer {PLAIN}".encode()},
        body=raw,
        request_id="00000000-0000-0000-0000-00000000f1de",
        path_kind="body",
        auth="active",
        content_type_kind="absent",
    )
    result = rewrite_run(case)
    if not result.forwarded:
        return
    common = result.response.request_body.response
    if not common.HasField("body_mutation"):
        return  # forwarded as sent
    sent = _python_reading(common.body_mutation.body)
    app = _python_reading(raw)
    for name in ("model", "stream_options"):  # the gateway's own changes
        sent.pop(name, None)
        app.pop(name, None)
    assert _same(sent, app), f"the provider reads {sent!r}, the app sent {app!r}"


# ------------------------------------------------------------- the wire form itself


def test_the_hand_built_wire_form_is_envoys() -> None:
    """The fuzzers' encoder writes what protobuf writes for the same (valid) values."""
    from tests.unit.test_processor import request

    message = request({"model": "m"}, path="/v1/chat/completions")
    attributes = {
        name: value.string_value.encode()
        for name, value in message.attributes["envoy.filters.http.ext_proc"].fields.items()
    }
    ours = decode_request(body_message(attributes, message.request_body.body))
    assert ours == message


# ------------------------------------------------------------ what the fuzzers found
# The minimal cases hypothesis shrank its failures to, pinned so that they run whatever
# the generators draw next (each asserts the documented behaviour).

_CHAT_HI = '"messages": [{"role": "user", "content": "Hi"}]'


def _pinned(body: bytes, *, path: bytes = b"/v1/chat/completions", **headers: bytes) -> Case:
    return Case(
        method=b"POST",
        path=path,
        headers={"authorization": f"Bearer {PLAIN}".encode(), **headers},
        body=body,
        request_id="00000000-0000-0000-0000-0000000f1dd5",
        path_kind="body",
        auth="active",
        content_type_kind="non_utf8" if "content-type" in headers else "absent",
    )


@pytest.mark.parametrize(
    "case",
    [
        # NUL is valid JSON (\u0000) and ends up in the record, which Postgres refuses.
        _pinned(('{"model": "gpt-4o-mini\\u0000", ' + _CHAT_HI + "}").encode()),
        _pinned(('{"model": "claude-4", "a\\u0000": 1, ' + _CHAT_HI + "}").encode()),
        # A content type that is not UTF-8 after its media type is taken as JSON.
        _pinned(
            ('{"model": "gpt-4o-mini", ' + _CHAT_HI + "}").encode(),
            **{"content-type": b"application/json; charset=utf-8\xff"},
        ),
    ],
    ids=["nul-in-model", "nul-in-parameter-name", "content-type-not-utf8-in-parameters"],
)
def test_found_by_fuzzing(case: Case) -> None:
    run = Run("pinned")
    try:
        for one in (case, case.in_headers_phase()):
            check(
                one, run.loop.run_until_complete(drive(run.gw, run.sink, one)), run.stats, MAX_BYTES
            )
    finally:
        run.loop.close()


def test_found_by_fuzzing_an_integer_past_64_bits_is_refused() -> None:
    """The deployment's name is written into the body, and the body re-serialized: an
    integer past 64 bits (valid JSON; Python's and Go's parsers keep it exact, orjson reads
    a float) reached the provider as 1.8446744073709552e+19. Two parsers read it
    differently, so the README's rule refuses it: 400 ``invalid_json`` naming the field,
    in either Envoy config, and nothing forwarded."""
    body = '{"model": "priced", "seed": 18446744073709551616, ' + _CHAT_HI + "}"
    run = Run("pinned")
    try:
        case = _pinned(body.encode())
        case.body_faults = ["big_int"]
        for one in (case, case.in_headers_phase()):
            result = run.loop.run_until_complete(drive(run.gw, run.sink, one))
            check(one, result, run.stats, MAX_BYTES)
            assert not result.forwarded
            immediate = result.response.immediate_response
            error = orjson.loads(immediate.body)["error"]
            assert (immediate.status.code, error["code"], error["param"]) == (
                400,
                "invalid_json",
                "seed",
            ), error
            assert "18446744073709551616" in error["message"], error
    finally:
        run.loop.close()
