"""Fuzzing through the real thing (the Hardening issue, item 4): generated requests sent
over raw sockets (header bytes no HTTP library sends) to a real Envoy with the
project's config, ext_proc server and mock upstream, a stack of its own.

Every answer must carry ``x-request-id``; no 5xx unless it is a documented one (the
gateway's 503s, Envoy's answers for a provider that failed, a provider's own error
passed through); an error in the shape the app's SDK reads, without internals; the
answer the README fixes for the cases built to get one (``fuzz_oracle``); and, at the
end, exactly one usage row per request sent, with the status the app received.
``pytest -s`` prints how many requests went through and what they got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_proc.auth.keys import generate_key
from ext_proc.server.context import DEFAULT_MAX_REQUEST_BYTES
from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix
from tests.unit.fuzz_inputs import (
    Case,
    KeySet,
    active_key_headers,
    cases,
    json_content_types,
    paths,
)
from tests.unit.fuzz_oracle import DOCUMENTED_503, check_documented, error_code, is_anthropic_path

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", retries: {attempts: 0}}
  claude: {type: anthropic, base_url: "http://127.0.0.1:{mock}", api_key_env: FUZZ_ANTHROPIC_KEY,
           retries: {attempts: 0}}
  az: {type: azure_openai, base_url: "http://127.0.0.1:{mock}", api_version: "2024-10-21",
       api_key_env: FUZZ_AZURE_KEY, retries: {attempts: 0}}
  az-nokey: {type: azure_openai, base_url: "http://127.0.0.1:{mock}", api_version: "2024-10-21",
             api_key_env: FUZZ_UNSET_KEY, retries: {attempts: 0}}
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
          && (stream || message_count < 100)",
        post_check_expression: "total_tokens < 100000"}
  allow: {type: model_allowlist,
          models: [gpt-4o-mini, "text-*", priced, azure-mini, keyless, claude-4]}
  money: {type: budget, usd: 1000000, window: 1h, default_max_tokens: 100}
  tight: {type: rate_limit, requests: 3, window: 1h}
applications:
  plain: {org: fuzz}
  checked: {org: fuzz, policies: [generous, tokens, size, cel, allow, money]}
  tight: {org: fuzz2, policies: [tight]}
"""
EXAMPLES = 560
# Envoy answers 5xx for a provider that failed (README: "Envoy's reason").
ENVOY_PROVIDER_5XX = frozenset({502, 503, 504})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Sent:
    """Every request the test sent, and what came back (for the usage rows)."""

    requests: list[tuple[Case, Answer | None]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


SENT = Sent()


@dataclass(frozen=True)
class Stack:
    own: OwnStack
    keys: KeySet
    tight: str


@pytest.fixture(scope="module")
async def fuzz_stack(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    own = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("fuzz")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("fuzz"),
        key_app="plain",
        label="fuzz",
        extra_env={"FUZZ_AZURE_KEY": "azure-provider-key", "FUZZ_ANTHROPIC_KEY": "anthropic-key"},
    )
    try:
        checked, tight = await own.create_key("checked"), await own.create_key("tight")
        # Keys of the right shape that no app has: refused like revoked ones (401).
        keys = KeySet(
            active=(own.api_key, checked, tight), inactive=(generate_key(), generate_key())
        )
        yield Stack(own, keys, tight)
    finally:
        await own.stop()


# ------------------------------------------------------------------------ the wire


def _request_bytes(case: Case) -> bytes:
    """The request as an HTTP/1.1 client writes it, with the case's bytes as they are."""
    head = case.method + b" " + case.path + b" HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n"
    for name, value in case.headers.items():
        head += name.encode() + b": " + value + b"\r\n"
    head += b"content-length: " + str(len(case.body)).encode() + b"\r\n\r\n"
    return head + case.body


def _send(port: int, data: bytes, *, head_request: bool = False) -> Answer | None:
    """The answer, or None when the connection closed without one. Read as far as the
    answer says (content-length, chunks), not to the close: Envoy holds a connection it
    closes for up to a second (its delayed close) waiting for the client to go first."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        # Answered (and closed) before the whole body was read: the answer is still there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        reader = _Reader(sock)
        raw_head = reader.until(b"\r\n\r\n")
        if raw_head is None:
            return None
        lines = raw_head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), f"not an HTTP answer: {raw_head[:200]!r}"
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_request or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = reader.chunks()
        elif "content-length" in headers:
            body = reader.exactly(int(headers["content-length"]))
        else:
            body = reader.rest()
    return Answer(status, headers, body)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _more(self) -> bool:
        try:
            chunk = self._sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self._buffer += chunk
        return bool(chunk)

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self._buffer:
            if not self._more():
                return None
        found, _, self._buffer = self._buffer.partition(marker)
        return found

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size and self._more():
            pass
        found, self._buffer = self._buffer[:size], self._buffer[size:]
        return found

    def chunks(self) -> bytes:
        out = bytearray()
        while True:
            size_line = self.until(b"\r\n")
            if size_line is None:
                return bytes(out)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return bytes(out)
            out += self.exactly(size)
            self.until(b"\r\n")

    def rest(self) -> bytes:
        while self._more():
            pass
        found, self._buffer = self._buffer, b""
        return found


# ----------------------------------------------------------------------- the checks


def _check(stack: Stack, case: Case, answer: Answer) -> str:
    status = answer.status
    assert answer.headers.get("x-request-id"), f"no x-request-id: {status} {answer.headers}"
    from_provider = "x-envoy-upstream-service-time" in answer.headers
    if status < 400:
        # A request the README says is refused must not reach a provider either.
        check_documented(
            case, status, "(answered)", max_bytes=DEFAULT_MAX_REQUEST_BYTES, tight_key=stack.tight
        )
        return f"{status}" + (" from provider" if from_provider else " from gateway")
    if case.method == b"HEAD":
        return f"{status} (HEAD)"
    try:
        body: Any = json.loads(answer.body)
    except ValueError:
        raise AssertionError(
            f"{status} with a body that is not JSON: {answer.body[:300]!r}"
        ) from None
    if from_provider:  # a provider's own error, passed through unchanged: its shape
        code = error_code(case, body, shape="either") if "type" in body else _provider_code(body)
    else:
        code = error_code(case, body, shape="either" if is_anthropic_path(case) else "openai")
    if status >= 500:
        documented = (
            (status == 503 and code in DOCUMENTED_503)
            or (status in ENVOY_PROVIDER_5XX and code.startswith("upstream"))
            or from_provider
        )
        assert documented, f"an undocumented {status} from the gateway: {body}"
    check_documented(case, status, code, max_bytes=DEFAULT_MAX_REQUEST_BYTES, tight_key=stack.tight)
    return f"{status} {code}" + (" from provider" if from_provider else "")


def _provider_code(body: Any) -> str:
    """A provider error in OpenAI's or Azure's shape: its code (or type)."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], body
    return str(error.get("code") or error.get("type") or "provider_error")


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=EXAMPLES,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)
# Bodies near Envoy's limit now and then (1 MiB + 64 KiB: a 1 MiB prompt passes).
_SIZES = st.one_of(
    *[st.none()] * 24,
    st.sampled_from(
        [
            DEFAULT_MAX_REQUEST_BYTES - 100,
            DEFAULT_MAX_REQUEST_BYTES + 1,
            2 * DEFAULT_MAX_REQUEST_BYTES,
        ]
    ),
)
# Request lines an HTTP/1.1 client library can send: a method (the standard ones, and
# tokens Envoy passes on since it allows custom methods), a target of visible ASCII (the
# odd ones a parser accepts: "//", "/../", "%2F", absolute form). What Envoy's HTTP/1
# parser refuses is the next test's.
_METHODS = st.sampled_from(
    [b"POST"] * 6
    + [b"GET", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]
    + [b"post", b"FOO", b"PROPFIND"]
)


def _valid_target(path_and_kind: tuple[bytes, str]) -> bool:
    path = path_and_kind[0]
    return (
        path.startswith((b"/", b"http://"))
        and b"#" not in path
        and all(0x21 <= byte <= 0x7E for byte in path)
    )


_PATHS = paths().filter(_valid_target)
_ADDRESSED_PATHS = st.sampled_from(
    [
        (b"/v1/chat/completions", "body"),
        (b"/v1/chat/completions", "body"),
        (b"/v1/completions", "body"),
        (b"/v1/embeddings", "body"),
        (b"/v1/messages", "body"),
        (b"/v1/responses", "body"),
        (b"/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21", "body"),
        (b"/openai/deployments/azure-mini/embeddings?api-version=2024-10-21", "body"),
        (b"/openai/deployments/keyless-prod/completions?api-version=2024-10-21", "body"),
    ]
)


def test_generated_requests_through_envoy(fuzz_stack: Stack) -> None:
    port = fuzz_stack.own.stack.options.listener_port
    started = time.perf_counter()

    keys = fuzz_stack.keys
    anything = cases(
        keys,
        matched_bodies=True,
        pad_to=_SIZES,
        method_strategy=_METHODS,
        path_strategy=lambda: _PATHS,
    )
    addressed = cases(  # as an SDK sends them: most reach the provider (or its refusal)
        keys,
        matched_bodies=True,
        pad_to=_SIZES,
        method_strategy=st.just(b"POST"),
        path_strategy=lambda: _ADDRESSED_PATHS,
        content_type_strategy=json_content_types,
        key_strategy=active_key_headers,
    )

    @FUZZ
    @given(case=st.one_of(addressed, anything))
    def one(case: Case) -> None:
        answer = None
        try:
            answer = _send(port, _request_bytes(case), head_request=case.method == b"HEAD")
        finally:
            SENT.requests.append((case, answer))  # sent, whatever came back
        assert answer is not None, "the connection closed without an answer"
        SENT.stats[_check(fuzz_stack, case, answer)] += 1

    try:
        one()
    finally:
        SENT.seconds = time.perf_counter() - started
        top = ", ".join(f"{k}: {v}" for k, v in SENT.stats.most_common(16))
        print(
            f"\n[fuzz e2e] {len(SENT.requests)} requests through Envoy in "
            f"{SENT.seconds:.1f} s ({top})"
        )
    assert len(SENT.requests) >= 500


# Request lines Envoy's HTTP/1 parser used to refuse without a word (README, "Hostile
# input"). A method Envoy does not know is any token to it now, and the gateway answers
# 405 like any wrong method, with a request id and a usage row. The rest Envoy refuses
# itself before it has parsed a request: a 400 in OpenAI's error shape naming Envoy's
# reason, without x-request-id (Envoy gives an id to a request only once its headers are
# read), and the connection closed; the usage log still records it (the row test below
# counts it).
_MALFORMED = [
    # (method, target, status, code, x-request-id expected)
    (
        b"post",
        b"/v1/chat/completions",
        405,
        "method_not_allowed",
        True,
    ),  # methods are case-sensitive
    (b"FOO", b"/v1/chat/completions", 405, "method_not_allowed", True),  # RFC 9110: any token
    (b"POST", b"/v1/chat/completions#frag", 400, "path_normalization_failed", False),
    (b"POST", b"/v1/chat/completions\xff", 400, "http1.codec_error", False),  # not ASCII
    (b"POST", b"*", 400, "http1.invalid_url", False),  # asterisk form: OPTIONS only
]


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "request_id"),
    _MALFORMED,
    ids=["lowercase-method", "unknown-method", "fragment", "non-ascii-target", "asterisk"],
)
def test_a_request_line_envoy_refuses_still_gets_an_answer(
    fuzz_stack: Stack, method: bytes, path: bytes, status: int, code: str, request_id: bool
) -> None:
    case = Case(
        method=method,
        path=path,
        headers={"authorization": f"Bearer {fuzz_stack.keys.active[0]}".encode()},
        body=b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}',
        request_id="",
        path_kind="odd",
        auth="active",
        content_type_kind="absent",
    )
    answer = None
    try:
        answer = _send(fuzz_stack.own.stack.options.listener_port, _request_bytes(case))
    finally:
        SENT.requests.append((case, answer))
    assert answer is not None, "the connection closed without an answer"
    if request_id:
        assert _check(fuzz_stack, case, answer) == f"{status} {code}"
        return
    # Envoy's own refusal: the documented answer, in the shape the SDK reads.
    assert "x-request-id" not in answer.headers, answer.headers
    assert answer.headers.get("content-type") == "application/json"
    assert answer.headers.get("connection") == "close"
    assert answer.status == status
    assert error_code(case, json.loads(answer.body), shape="openai") == code
    message = json.loads(answer.body)["error"]["message"]
    assert ("#fragment" if code == "path_normalization_failed" else "not valid HTTP") in message


# The minimal cases the fuzzers shrank their failures to, pinned (each asserts the
# documented behaviour; the usage-row test below counts them too).
_HI = b'"messages": [{"role": "user", "content": "Hi"}]}'


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        # A NUL in a string is valid JSON; Postgres refuses the row that holds it.
        (b'{"model": "gpt-4o-mini\\u0000", ' + _HI, b"application/json", 404, "model_not_found"),
        # Not UTF-8 after the media type: still "a content-type that is not UTF-8".
        (
            b'{"model": "gpt-4o-mini", ' + _HI,
            b"application/json; charset=utf-8\xff",
            400,
            "invalid_content_type",
        ),
    ],
    ids=["nul-in-model", "content-type-not-utf8-in-parameters"],
)
def test_found_by_fuzzing(
    fuzz_stack: Stack, body: bytes, content_type: bytes, status: int, code: str
) -> None:
    case = Case(
        method=b"POST",
        path=b"/v1/chat/completions",
        headers={
            "authorization": f"Bearer {fuzz_stack.keys.active[0]}".encode(),
            "content-type": content_type,
        },
        body=body,
        request_id="",
        path_kind="body",
        auth="active",
        content_type_kind="json",
    )
    answer = None
    try:
        answer = _send(fuzz_stack.own.stack.options.listener_port, _request_bytes(case))
    finally:
        SENT.requests.append((case, answer))
    assert answer is not None
    summary = _check(fuzz_stack, case, answer)  # e.g. "404 model_not_found"
    assert summary == f"{status} {code}", summary


async def test_found_by_fuzzing_an_integer_past_64_bits_is_refused(fuzz_stack: Stack) -> None:
    """The gateway rewrote the model to the deployment and re-serialized the body: an
    integer past 64 bits reached the provider as 1.8446744073709552e+19 (OpenAI refuses a
    float ``seed``). Two parsers read it differently: refused (400 ``invalid_json``,
    ``param`` naming it), and the provider never sees the request."""
    case = Case(
        method=b"POST",
        path=b"/v1/chat/completions",
        headers={
            "authorization": f"Bearer {fuzz_stack.keys.active[0]}".encode(),
            "x-test-id": b"fuzz-big-int",
        },
        body=b'{"model": "priced", "seed": 18446744073709551616, ' + _HI,
        request_id="",
        path_kind="body",
        auth="active",
        content_type_kind="absent",
        body_faults=["big_int"],
    )
    port = fuzz_stack.own.stack.options.listener_port
    answer = None
    try:
        answer = await asyncio.to_thread(_send, port, _request_bytes(case))
    finally:
        SENT.requests.append((case, answer))
    assert answer is not None
    assert _check(fuzz_stack, case, answer) == "400 invalid_json", answer
    assert json.loads(answer.body)["error"]["param"] == "seed"
    mock = f"http://127.0.0.1:{fuzz_stack.own.stack.mock_port}/_mock/requests"
    async with httpx.AsyncClient(timeout=5) as http:
        seen = (await http.get(mock, params={"header": "x-test-id:fuzz-big-int"})).json()
    assert not (seen["requests"] if isinstance(seen, dict) else seen), seen


async def test_every_request_has_one_usage_row(fuzz_stack: Stack) -> None:
    """Counted at the end: a row per request sent (denied, refused, forwarded, refused by
    Envoy alike), each answered one with the status the app received."""
    sent = SENT.requests
    assert sent, "the fuzz tests sent nothing"
    answered = [(case, answer) for case, answer in sent if answer is not None]
    ids = [answer.headers.get("x-request-id", "") for _, answer in answered]
    ids = [rid for rid in ids if rid]
    rows = await fuzz_stack.own.rows_for(ids, timeout=10)
    total = await _count_rows(fuzz_stack.own, len(sent), timeout=2)  # rows_for waited
    print(f"\n[fuzz e2e] {total} usage rows for {len(sent)} requests sent")
    missing = [
        (case, answer)
        for case, answer in answered
        if answer.headers.get("x-request-id") and answer.headers["x-request-id"] not in rows
    ]
    assert not missing, f"{len(missing)} requests without a usage row, e.g.: " + "; ".join(
        f"{case!r} -> {answer.status} {answer.body[:200]!r}" for case, answer in missing[:3]
    )
    wrong = [
        (case, answer.status, rows[answer.headers["x-request-id"]]["status_code"])
        for case, answer in answered
        if answer.headers.get("x-request-id") in rows
        and rows[answer.headers["x-request-id"]]["status_code"] != answer.status
    ]
    assert not wrong, f"rows with another status than the app got: {wrong[:3]}"
    assert all(row["decision"] in ("allowed", "denied", "error") for row in rows.values())
    assert total == len(sent), f"{total} usage rows for {len(sent)} requests"


async def _count_rows(own: OwnStack, expected: int, timeout: float = 15.0) -> int:
    """Rows in the stack's table, polled (bounded) until there are ``expected``."""
    deadline = time.monotonic() + timeout
    while True:
        [row] = await own.fetch("SELECT count(*) AS n FROM usage_records")
        if row["n"] >= expected or time.monotonic() > deadline:
            return int(row["n"])
        await asyncio.sleep(0.1)
