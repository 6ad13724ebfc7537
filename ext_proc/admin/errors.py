"""The admin API's errors: the gateway's shape, ``{"error": {"message", "type", "code",
"param"}}``, ``param`` naming the field or parameter at fault; never a traceback.

Handlers turn every failure into that shape: ``ApiError`` (raised by the routes),
FastAPI's request validation (a path or query parameter of the wrong type), Starlette's
404 and 405, a database that cannot answer (503 ``service_unavailable`` with
``retry-after``), and anything unexpected (500 ``internal_error``, logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ext_proc.config.errors import ConfigIssue, path_text

log = logging.getLogger(__name__)

# The longest an admin request waits on Postgres before answering 503.
QUERY_TIMEOUT = 10.0

ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    502: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An answer other than success: status, message, code, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.code, self.param, self.headers, self.extra
        )


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {
        "message": message,
        "type": ERROR_TYPES.get(status, "server_error"),
        "code": code,
        "param": param,
    }
    error.update(extra or {})
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


def unavailable(what: str, exc: BaseException | None) -> ApiError:
    """503 for a database that is not connected, down, or too slow."""
    if exc is None:
        reason = "Postgres is not connected"
    elif isinstance(exc, TimeoutError):
        reason = f"Postgres did not answer within {QUERY_TIMEOUT:.0f}s"
    else:
        reason = f"Postgres cannot be used ({type(exc).__name__})"
    log.warning("admin API: %s: %s: %s", what, reason, exc)
    return ApiError(
        503,
        f"{what} needs the database and it is unavailable: {reason}; retry shortly",
        "service_unavailable",
        headers={"retry-after": "5"},
    )


def field_errors(
    issues: Sequence[ConfigIssue], prefix: tuple[str | int, ...]
) -> list[dict[str, Any]]:
    """Config issues as the API's ``errors``: ``field`` relative to the object at
    ``prefix`` (the whole path when the issue is elsewhere), a CEL position as
    ``line``/``column`` inside the field's text."""
    found: list[dict[str, Any]] = []
    for issue in issues:
        loc = issue.loc
        inside = loc[: len(prefix)] == prefix
        entry: dict[str, Any] = {
            "field": path_text(loc[len(prefix) :]) if inside else issue.path,
            "message": issue.message,
        }
        if not inside:
            entry["object"] = path_text(loc[:2])
        if issue.text_position is not None:
            entry["line"], entry["column"] = issue.text_position
        found.append(entry)
    return found


def invalid(errors: Sequence[Mapping[str, Any]], what: str = "the body") -> ApiError:
    """400 naming every invalid field (the first as ``param``)."""
    first = errors[0]
    more = (
        f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        if len(errors) > 1
        else ""
    )
    field = first.get("field") or None
    where = f"{field}: " if field else ""
    return ApiError(
        400,
        f"invalid {what}: {where}{first['message']}{more}",
        "invalid_parameter",
        field,
        extra={"errors": list(errors)},
    )


class RefuseNul:
    """ASGI middleware: a path or query with a NUL character (which no name, id or
    parameter holds, and Postgres text cannot) is a 400 naming it, before any route."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = unquote_to_bytes(scope.get("query_string", b""))
            if "\x00" in scope.get("path", "") or b"\x00" in query:
                where = "path" if "\x00" in scope.get("path", "") else "query"
                response = error_response(
                    400, f"the {where} holds a NUL character (U+0000)", "invalid_parameter", where
                )
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_middleware(RefuseNul)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [part for part in first.get("loc", ()) if part not in ("query", "path", "body")]
        param = str(loc[-1]) if loc else None
        message = str(first.get("msg", "invalid parameter"))
        return error_response(
            400, f"invalid {param or 'parameter'}: {message}", "invalid_parameter", param
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(
                404, f"no admin endpoint {request.method} {request.url.path}", "not_found"
            )
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow", "")
            return error_response(
                405,
                f"{request.url.path} answers {allow or 'other methods'}, not {request.method}",
                "method_not_allowed",
                headers={"allow": allow} if allow else None,
            )
        return error_response(exc.status_code, str(exc.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("admin API: %s %s failed", request.method, request.url.path)
        return error_response(
            500, "internal error in the admin API; the server log has the details", "internal_error"
        )
