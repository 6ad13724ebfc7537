"""What the fuzz suites hold every answer to: the error shape, no internals, no 5xx
but the documented ones, and the answers the README fixes for the cases built to get
them. Shared by ``tests/unit/test_fuzz.py`` and ``tests/e2e/test_fuzz_e2e.py``."""

from __future__ import annotations

import unicodedata
from typing import Any

from ext_proc.server.request_json import BodyError, parse_request_json
from tests.unit.fuzz_inputs import KEY_HEADERS, REFUSED_FAULTS, Case

# The 503s the gateway itself may answer (README, "Calling it").
DOCUMENTED_503 = frozenset(
    {"provider_credential_missing", "auth_unavailable", "policy_unavailable"}
)
# What must never show in a message (unless the app sent it and the message echoes it).
INTERNALS = (
    "Traceback",
    "DecodeError",
    "Exception",
    "grpc",
    'File "',
    "object at 0x",
    "NoneType",
    "KeyError",
    "TypeError",
    "AttributeError",
    "IndexError",
    "ValueError",
    "RecursionError",
)


def is_anthropic_path(case: Case) -> bool:
    """The app calls ``/v1/messages`` (the Anthropic SDK): errors in Anthropic's shape."""
    path = case.text_path.partition("?")[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path == "/v1/messages"


def undecodable(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def error_code(case: Case, body: Any, *, shape: str) -> str:
    """Check an error body's shape (``shape``: "openai", "anthropic", or "either") and
    message; return its code (Anthropic's ``error.type`` when it carries no code)."""
    if shape == "either":
        shape = "anthropic" if isinstance(body, dict) and body.get("type") == "error" else "openai"
    assert isinstance(body, dict), body
    if shape == "anthropic":
        assert body.get("type") == "error" and set(body) == {"type", "error"}, body
        error = body["error"]
        assert isinstance(error, dict), body
        assert isinstance(error.get("type"), str) and error["type"], body
        code = error.get("code", error["type"])
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error, dict), body
        assert set(error) == {"message", "type", "code", "param"}, error
        assert isinstance(error["type"], str) and error["type"], error
        assert error["param"] is None or isinstance(error["param"], str), error
        code = error["code"]
    message = error["message"]
    assert isinstance(message, str) and message.strip(), error
    assert isinstance(code, str) and code, error
    # Messages echo the app's input (a model name, a parameter): its control characters
    # are shown escaped ("\u0000"), never raw.
    raw = [c for c in message + (error.get("param") or "") if unicodedata.category(c) == "Cc"]
    assert not raw, f"raw control characters {raw!r} in {error!r}"
    sent = case.inputs_text()
    for marker in INTERNALS:
        assert marker not in message or marker in sent, f"internals in {message!r}"
    return code


def check_documented(case: Case, status: int, code: str, *, max_bytes: int, tight_key: str) -> None:
    """The answers the README fixes ("Calling it", "HTTP behaviour seen by apps"), for
    the cases built to get them; other cases are left to the general rules."""
    if case.path_kind != "body":
        return
    if case.phase == "headers" and case.extra_headers:
        return  # extra copies of headers: combined by Envoy's rules, not fixed here
    if not case.body and (status, code) == (400, "invalid_json"):
        # No body is a 400 whatever else is wrong (through Envoy its Lua filter answers a
        # body-less request before the processor sees it); which of two errors wins is
        # not fixed by the README.
        return
    key_values = [v for n, v in case.headers.items() if n in KEY_HEADERS]
    if any(undecodable(v) for v in key_values):
        # "non-UTF-8 key headers → 401", checked first once the path is known.
        assert (status, code) == (401, "invalid_api_key"), (status, code)
        return
    if case.auth != "active":
        if case.auth in ("missing", "inactive"):
            assert status == 401, (status, code)
        return
    if case.method != b"POST":
        assert (status, code) == (405, "method_not_allowed"), (status, code)
        return
    if case.content_type_kind in ("other", "non_utf8"):
        # "wrong Content-Type (or one that is not UTF-8)" → 400 invalid_content_type
        assert (status, code) == (400, "invalid_content_type"), (status, code)
        return
    if case.content_type_kind not in ("json", "absent"):
        return
    if case.phase == "headers" and status == 429 and tight_key in case.inputs_text():
        return  # the headers message runs the app's limits before the body is read
    if case.phase == "headers" and not case.body:
        assert (status, code) == (400, "invalid_json"), (status, code)
        return
    if len(case.body) > max_bytes:
        assert (status, code) == (413, "request_too_large"), (status, code)
        return
    if set(case.body_faults) & REFUSED_FAULTS or case.body_kind == "bytes":
        if case.body_kind == "bytes" and parses(case.body):
            return  # random bytes that happen to be a JSON object
        # "a body that is not JSON, not UTF-8, nested deeper than 128 levels, or repeats
        # a key → 400 invalid_json (or invalid_encoding)"
        assert status == 400 and code in ("invalid_json", "invalid_encoding"), (status, code)


def parses(raw: bytes) -> bool:
    try:
        parse_request_json(raw)
    except BodyError:
        return False
    return True
