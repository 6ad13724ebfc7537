"""Error answers in each provider's shape (OpenAI, Azure OpenAI, Anthropic)."""

from __future__ import annotations

import orjson

from ext_proc.http import Response

_JSON = ("content-type", "application/json")
_RETRY_AFTER = ("retry-after", "1")

# status -> (type, code) as OpenAI answers them.
_OPENAI_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}

# status -> error type as Anthropic answers them.
_ANTHROPIC_KINDS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _headers(status: int) -> list[tuple[str, str]]:
    return [_JSON, _RETRY_AFTER] if status == 429 else [_JSON]


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
) -> Response:
    default_kind, default_code = _OPENAI_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    body = {
        "error": {
            "message": message,
            "type": kind or default_kind,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }
    return Response(status, _headers(status), orjson.dumps(body))


def anthropic_error(status: int, message: str) -> Response:
    kind = _ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return Response(status, _headers(status), orjson.dumps(body))


def azure_error(status: int, code: str, message: str) -> Response:
    body = {"error": {"code": code, "message": message}}
    return Response(status, _headers(status), orjson.dumps(body))


def forced_error(status: int, *, anthropic: bool) -> Response:
    """The answer to ``x-mock-status``."""
    message = f"mock upstream error (x-mock-status: {status})"
    return anthropic_error(status, message) if anthropic else openai_error(status, message)


class BadRequest(Exception):
    """The request body is invalid; answered 400 in the provider's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
