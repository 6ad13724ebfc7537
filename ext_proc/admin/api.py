"""Admin API handlers.

Read endpoints (health, readiness, usage) answer anyone who can reach the port (it
binds 127.0.0.1 by default). Changing endpoints require ``Authorization: Bearer
$EXT_PROC_ADMIN_TOKEN``; with no token configured they are refused, not open.
"""

from __future__ import annotations

import argparse
import hmac
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from ext_proc.config.errors import ConfigError
from ext_proc.http.server import Request, Response
from ext_proc.usage.cli import parse_group_by, parse_time
from ext_proc.usage.rollups import rollup

if TYPE_CHECKING:
    from ext_proc.server.app import Service

log = logging.getLogger(__name__)

_JSON = [("content-type", "application/json")]


def _json(status: int, payload: Any) -> Response:
    return Response(status, list(_JSON), orjson.dumps(payload))


def _error(status: int, message: str, code: str, param: str | None = None) -> Response:
    return _json(
        status,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": param,
            }
        },
    )


class AdminApi:
    def __init__(self, service: Service) -> None:
        self._service = service
        token = service.settings.admin_token
        self._token = token.encode() if token else None

    async def handle(self, request: Request) -> Response:
        route = (request.method, request.path)
        try:
            if route == ("GET", "/healthz"):
                return _json(200, {"status": "ok"})
            if route == ("GET", "/readyz"):
                return self._ready()
            if route == ("GET", "/v1/usage"):
                return await self._usage(request)
            if route == ("POST", "/v1/reload"):
                denied = self._authorize(request)
                return denied or await self._reload()
        except (ValueError, argparse.ArgumentTypeError) as exc:  # a bad `by`, `since`, ...
            return _error(400, str(exc), "invalid_parameter")
        return _error(404, f"no admin endpoint {request.method} {request.path}", "not_found")

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

    def _ready(self) -> Response:
        service = self._service
        ready = service.gateway is not None and service.grpc_port != 0
        payload = {
            "ready": ready,
            "grpc_port": service.grpc_port,
            "postgres": service.postgres_ready,
            "config_source": service.config_source,
        }
        return _json(200 if ready else 503, payload)

    async def _usage(self, request: Request) -> Response:
        """Rollups as JSON: ``by`` any of the rollup's group keys (org_id, app_id,
        key_id, environment, model, provider, deployment, decision, hour, day); each row's
        ``cost_usd`` is a decimal string (exact) or null when no row of it has a cost."""
        pool = self._service.pool
        if pool is None:
            return _error(503, "Postgres is not connected", "postgres_unavailable")
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        now = datetime.now(UTC)
        group_by = parse_group_by(query.get("by", "app_id,model"))
        since = parse_time(query["since"], now=now) if "since" in query else now - timedelta(days=1)
        until = parse_time(query["until"], now=now) if "until" in query else now
        rows = await rollup(
            pool,
            group_by=group_by,
            since=since,
            until=until,
            org_id=query.get("org"),
            app_id=query.get("app"),
            model=query.get("model"),
        )
        return _json(
            200,
            {
                "group_by": group_by,
                "since": since.isoformat(),
                "until": until.isoformat(),
                "rows": [r.as_dict() for r in rows],
            },
        )

    async def _reload(self) -> Response:
        try:
            fingerprint = await self._service.reload()
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
        return _json(200, {"reloaded": True, "fingerprint": fingerprint})
