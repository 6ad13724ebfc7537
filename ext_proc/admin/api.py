"""Admin API handlers.

Read endpoints (health, readiness, usage) answer anyone who can reach the port (it
binds 127.0.0.1 by default). Changing endpoints require ``Authorization: Bearer
$EXT_PROC_ADMIN_TOKEN``; with no token configured they are refused, not open.

Every error is the gateway's shape, ``{"error": {"message", "type", "code", "param"}}``:
400 ``invalid_parameter`` naming the query parameter at fault, 503
``service_unavailable`` when Postgres cannot answer (down, or no answer within
``QUERY_TIMEOUT``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from ext_proc.config.errors import ConfigError
from ext_proc.http.server import Request, Response
from ext_proc.stores.catalog import CatalogNotMigrated
from ext_proc.stores.postgres import DATABASE_ERRORS
from ext_proc.usage.cli import DEFAULT_GROUP_BY, parse_group_by, parse_time
from ext_proc.usage.rollups import MAX_LIMIT, rollup

if TYPE_CHECKING:
    from ext_proc.server.app import Service

log = logging.getLogger(__name__)

_JSON = [("content-type", "application/json")]
# The longest an admin request waits on Postgres before answering 503.
QUERY_TIMEOUT = 10.0
DEFAULT_USAGE_LIMIT = 1000
_USAGE_PARAMS = ("by", "since", "until", "org", "app", "model", "limit")
_ROUTES: dict[str, tuple[str, ...]] = {
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/v1/usage": ("GET",),
    "/v1/reload": ("POST",),
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class _BadParameter(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _json(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [*_JSON, *(headers or [])], orjson.dumps(payload))


def _error(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    return _json(
        status,
        {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "server_error"),
                "code": code,
                "param": param,
            }
        },
        headers,
    )


def _unavailable(what: str, exc: BaseException | None) -> Response:
    if exc is None:
        reason = "Postgres is not connected"
    elif isinstance(exc, TimeoutError):
        reason = f"Postgres did not answer within {QUERY_TIMEOUT:.0f}s"
    else:
        reason = f"Postgres cannot be used ({type(exc).__name__})"
    log.warning("admin API: %s: %s: %s", what, reason, exc)
    return _error(
        503,
        f"{what} needs the database and it is unavailable: {reason}; retry shortly",
        "service_unavailable",
        headers=[("retry-after", "5")],
    )


class AdminApi:
    def __init__(self, service: Service) -> None:
        self._service = service
        token = service.settings.admin_token
        self._token = token.encode() if token else None

    async def handle(self, request: Request) -> Response:
        methods = _ROUTES.get(request.path)
        if methods is None:
            return _error(404, f"no admin endpoint {request.method} {request.path}", "not_found")
        if request.method not in methods:
            return _error(
                405,
                f"{request.path} answers {', '.join(methods)}, not {request.method}",
                "method_not_allowed",
                headers=[("allow", ", ".join(methods))],
            )
        try:
            if request.path == "/healthz":
                return _json(200, {"status": "ok"})
            if request.path == "/readyz":
                status, body = await self._service.readiness()
                return _json(status, body)
            if request.path == "/v1/usage":
                return await self._usage(request)
            denied = self._authorize(request)
            return denied or await self._reload()
        except _BadParameter as exc:
            return _error(400, exc.message, "invalid_parameter", exc.param)

    def _authorize(self, request: Request) -> Response | None:
        if self._token is None:
            return _error(403, "set EXT_PROC_ADMIN_TOKEN to enable admin changes", "admin_disabled")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), self._token
        ):
            return _error(401, "missing or wrong admin token", "invalid_admin_token")
        return None

    async def _usage(self, request: Request) -> Response:
        """Rollups as JSON: ``by`` any of the rollup's group keys (org_id, app_id,
        key_id, environment, model, provider, deployment, decision, hour, day); each row's
        ``cost_usd`` is a decimal string (exact) or null when no row of it has a cost."""
        query = _usage_query(request.query)
        pool = self._service.pool
        if pool is None:
            return _unavailable("usage", None)
        try:
            rows = await asyncio.wait_for(
                rollup(
                    pool,
                    group_by=query["by"],
                    since=query["since"],
                    until=query["until"],
                    org_id=query["org"],
                    app_id=query["app"],
                    model=query["model"],
                    limit=query["limit"],
                ),
                QUERY_TIMEOUT,
            )
        except DATABASE_ERRORS as exc:
            return _unavailable("usage", exc)
        return _json(
            200,
            {
                "group_by": query["by"],
                "since": query["since"].isoformat(),
                "until": query["until"].isoformat(),
                "rows": [r.as_dict() for r in rows],
            },
        )

    async def _reload(self) -> Response:
        try:
            fingerprint = await asyncio.wait_for(self._service.reload(), QUERY_TIMEOUT)
        except ConfigError as exc:
            return _json(
                422,
                {
                    "error": {
                        "message": "invalid gateway config; the running one is kept",
                        "type": "invalid_request_error",
                        "code": "invalid_config",
                        "param": None,
                        "issues": [str(i) for i in exc.issues],
                    }
                },
            )
        except CatalogNotMigrated as exc:
            return _error(503, f"the database is not migrated: {exc}", "service_unavailable")
        except DATABASE_ERRORS as exc:
            return _unavailable("reload", exc)
        return _json(200, {"reloaded": True, "fingerprint": fingerprint})


def _usage_query(raw: str) -> dict[str, Any]:
    """The usage query's parameters, checked; ``_BadParameter`` names the first bad one."""
    try:
        parsed = parse_qs(raw, keep_blank_values=True, max_num_fields=50)
    except ValueError:
        raise _BadParameter("query", "too many query parameters") from None
    values: Mapping[str, str] = {name: given[-1] for name, given in parsed.items()}
    for name in values:
        if name not in _USAGE_PARAMS:
            raise _BadParameter(
                name, f"unknown parameter {name!r}; known: {', '.join(_USAGE_PARAMS)}"
            )
    now = datetime.now(UTC)
    query: dict[str, Any] = {
        "by": _parse("by", values.get("by", DEFAULT_GROUP_BY), parse_group_by),
        "until": _parse("until", values["until"], lambda v: parse_time(v, now=now))
        if "until" in values
        else now,
    }
    query["since"] = (
        _parse("since", values["since"], lambda v: parse_time(v, now=now))
        if "since" in values
        else query["until"] - timedelta(days=1)
    )
    if query["since"] >= query["until"]:
        raise _BadParameter(
            "since",
            f"since ({query['since'].isoformat()}) must be before until "
            f"({query['until'].isoformat()})",
        )
    limit = values.get("limit", str(DEFAULT_USAGE_LIMIT))
    if not limit.strip().isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise _BadParameter(
            "limit", f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    query["limit"] = int(limit)
    for name in ("org", "app", "model"):
        value = values.get(name)
        if value is not None and not value.strip():
            raise _BadParameter(name, f"{name} must not be empty")
        query[name] = value
    return query


def _parse(name: str, value: str, parse: Any) -> Any:
    try:
        return parse(value)
    except (ValueError, OverflowError, argparse.ArgumentTypeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise _BadParameter(name, f"invalid {name}: {detail}") from None
