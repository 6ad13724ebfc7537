"""The admin API (FastAPI), served in the ext_proc process (``ext_proc.admin.server``).

Resources are gateway.yaml's objects, named as there (the name is the id):
``/v1/organizations``, ``/v1/applications``, ``/v1/providers``, ``/v1/models``,
``/v1/policies``: ``GET`` lists (``{"data": [...]}``), ``POST`` creates (201, 409 if it
exists), ``/{name}`` ``GET`` / ``PATCH`` (a JSON merge patch) / ``DELETE`` (409 naming
what still uses it). Then provider tests and credential rotation, policy types and
validation, API keys, admin tokens, usage rollups, the live activity stream, the audit
log, reload, ``/healthz`` and ``/readyz``. ``/openapi.json`` documents all of it from the
declared models (``ext_proc.admin.schemas``).

Everything but ``/healthz``, ``/readyz`` and ``/openapi.json`` needs a token
(``ext_proc.admin.auth``). Errors have the gateway's shape (``ext_proc.admin.errors``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Protocol

import asyncpg
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from ext_proc.admin import edits, errors, schemas, ui
from ext_proc.admin.activity import ActivityFeed, sse
from ext_proc.admin.auth import Principal, Reader, Writer
from ext_proc.admin.errors import QUERY_TIMEOUT, ApiError, invalid, unavailable
from ext_proc.admin.probe import probe
from ext_proc.admin.usage_query import BadParameter, usage_query
from ext_proc.auth import admin_tokens
from ext_proc.auth import store as key_store
from ext_proc.auth.store import DEFAULT_GRACE, KeyInfo
from ext_proc.config.document import build_config, policy_types
from ext_proc.config.errors import ConfigError
from ext_proc.config.fields import MODEL_NAME, SLUG, check_name, problems_from_error
from ext_proc.config.model import DEFAULT_ENVIRONMENT, GatewayConfig, Provider
from ext_proc.routing.credentials import load_credentials
from ext_proc.settings import Settings
from ext_proc.stores.catalog import CatalogNotMigrated, CatalogSpecs, specs_of
from ext_proc.stores.postgres import DATABASE_ERRORS
from ext_proc.usage.record import UsageRecord
from ext_proc.usage.rollups import rollup

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
AUDIT_LIMIT = 1000
_CEL_TYPES = {bool: "bool", int: "int", float: "double", str: "string"}


class Backend(Protocol):
    """What the admin API needs from the process it runs in (``Service``)."""

    settings: Settings

    @property
    def pool(self) -> asyncpg.Pool | None: ...

    @property
    def redis(self) -> Any: ...

    @property
    def activity(self) -> ActivityFeed | None: ...

    @property
    def config_dir(self) -> Path | None: ...

    @property
    def running_config(self) -> GatewayConfig | None: ...

    async def readiness(self) -> tuple[int, dict[str, Any]]: ...

    async def reload(self) -> str: ...


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERROR_TEXT = {
    400: "invalid parameter or body (error.param names it)",
    401: "no, unknown, revoked or expired token",
    403: "the token's role or organization does not allow this",
    404: "no such object",
    409: "conflict: exists already, or still in use (error.used_by)",
    413: "body too large",
    502: "the provider could not be reached",
    503: "Postgres is unavailable (retry-after)",
}


def doc(
    ok: int,
    answer: str | None,
    *errors_: int,
    body: str | None = None,
    summary: str = "",
    media: str = "application/json",
) -> dict[str, Any]:
    """The decorator arguments documenting one operation."""
    responses: dict[int | str, Any] = {
        ok: {
            "description": "success",
            "content": {media: {"schema": _ref(answer) if answer else {"type": "string"}}},
        }
    }
    for status in errors_:
        responses[status] = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    extra: dict[str, Any] = {}
    if body is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return {
        "status_code": ok,
        "responses": responses,
        "openapi_extra": extra or None,
        "summary": summary or None,
        "response_class": JsonResponse,
    }


READ = (401, 403, 503)
WRITE = (400, 401, 403, 503)


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(
        title="ext-proc gateway admin API",
        version="1",
        description=(
            "The control plane of the LLM gateway: gateway.yaml's objects, API keys, "
            "admin tokens, usage, activity and audit. Authorization: Bearer <token>."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        default_response_class=JsonResponse,
    )
    app.state.backend = backend
    errors.install(app)
    _health_routes(app, backend)
    for section in schemas.sections().values():
        _catalog_routes(app, backend, section)
    _provider_routes(app, backend)
    _policy_routes(app, backend)
    _key_routes(app, backend)
    _token_routes(app, backend)
    _observe_routes(app, backend)
    ui.mount(app)  # the web console's static files at /ui/ (open, like /healthz)
    _install_openapi(app)
    return app


# --- helpers -------------------------------------------------------------------------


def _pool(backend: Backend, what: str) -> asyncpg.Pool:
    pool = backend.pool
    if pool is None:
        raise unavailable(what, None)
    return pool


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (400 otherwise, 413 over 1 MiB)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes", "body_too_large")
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
        raise ApiError(
            400, f"send JSON (content-type application/json), not {content_type}", "invalid_body"
        )
    try:
        value = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_body")
    return value


def parse_model(model: type[BaseModel], data: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_error(exc, model)
        raise invalid(
            [
                {"field": ".".join(str(p) for p in problem.loc), "message": problem.message}
                for problem in problems
            ]
        ) from None


def _object(name: str, spec: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, **spec, **meta}


def _org_of(section: str, name: str, spec: Mapping[str, Any] | None) -> str | None:
    if section == "organizations":
        return name
    if section == "applications" and spec is not None:
        org = spec.get("org")
        return org if isinstance(org, str) else None
    return None


async def _with_timeout(what: str, call: Any) -> Any:
    try:
        return await asyncio.wait_for(call, QUERY_TIMEOUT)
    except CatalogNotMigrated as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None
    except asyncpg.DataError as exc:  # a value Postgres cannot take: the caller's
        raise ApiError(400, f"{what}: invalid value: {exc}", "invalid_parameter") from None
    except DATABASE_ERRORS as exc:
        raise unavailable(what, exc) from None


# --- health ------------------------------------------------------------------------


def _health_routes(app: FastAPI, backend: Backend) -> None:
    @app.get("/healthz", tags=["health"], **doc(200, "Health", summary="the process is alive"))
    async def healthz() -> Any:
        # Which catalog this process serves (its fingerprint): asks no dependency, so a
        # change's arrival on every replica can be watched without /readyz's probes.
        config = backend.running_config
        body: dict[str, Any] = {"status": "ok"}
        if config is not None:
            body["config"] = config.fingerprint[:12]
        return JsonResponse(body)

    ready = doc(200, "Health", summary="can it serve (ok, degraded) or not (503)")
    ready["responses"][503] = {
        "description": "unavailable: it cannot serve (reasons)",
        "content": {"application/json": {"schema": _ref("Health")}},
    }

    @app.get("/readyz", tags=["health"], **ready)
    async def readyz() -> Any:
        status, body = await backend.readiness()
        return JsonResponse(body, status_code=status)

    reload_doc = doc(200, "Reloaded", 401, 403, 503, summary="re-read the catalog and credentials")
    reload_doc["responses"][422] = {
        "description": "the catalog does not validate; the running config is kept",
        "content": {"application/json": {"schema": _ref("Error")}},
    }

    @app.post("/v1/reload", tags=["health"], **reload_doc)
    async def reload(principal: Writer) -> Any:
        try:
            fingerprint = await asyncio.wait_for(backend.reload(), QUERY_TIMEOUT)
        except ConfigError as exc:
            raise ApiError(
                422,
                "invalid gateway config; the running one is kept",
                "invalid_config",
                extra={"issues": [str(i) for i in exc.issues]},
            ) from None
        except CatalogNotMigrated as exc:
            raise ApiError(
                503, f"the database is not migrated: {exc}", "service_unavailable"
            ) from None
        except DATABASE_ERRORS as exc:
            raise unavailable("reload", exc) from None
        return JsonResponse({"reloaded": True, "fingerprint": fingerprint})


# --- the catalog's objects ----------------------------------------------------------


def _catalog_routes(app: FastAPI, backend: Backend, resource: schemas.Section) -> None:
    section, kind = resource.section, resource.kind
    tag: list[str | Enum] = [section]
    pattern = MODEL_NAME if section == "models" else SLUG
    org_owned = section in ("organizations", "applications")

    def scope_write(principal: Principal, name: str, spec: Mapping[str, Any] | None) -> None:
        if section == "organizations":
            if spec is None or principal.org is None:
                principal.require_unscoped("creating or deleting an organization")
            principal.require_org(name, f"organization {name}")
        elif section == "applications":
            principal.require_org(_org_of(section, name, spec), f"application {name}")
        else:
            principal.require_unscoped(f"{kind} {name}")

    async def answer(name: str, change: edits.Change, status: int) -> Any:
        pool = _pool(backend, f"reading {kind} {name}")
        meta = (await edits.object_meta(pool, section, name)).get(name, {})
        body = _object(name, change.after or {}, meta)
        body["warnings"] = change.warnings
        return JsonResponse(body, status_code=status)

    @app.get(
        f"/v1/{section}",
        tags=tag,
        operation_id=f"list_{section}",
        **doc(200, resource.list_name, *READ, summary=f"every {kind} this token may see"),
    )
    async def list_objects(principal: Reader) -> Any:
        pool = _pool(backend, f"listing {section}")
        snapshot = await edits.read_catalog(pool)
        meta = await edits.object_meta(pool, section)
        data = [
            _object(name, spec, meta.get(name, {}))
            for name, spec in snapshot.specs.section(section).items()
            if not org_owned or principal.sees(_org_of(section, name, spec))
        ]
        return JsonResponse({"data": data})

    @app.post(
        f"/v1/{section}",
        tags=tag,
        operation_id=f"create_{kind}",
        **doc(
            201,
            resource.object_name,
            *WRITE,
            409,
            413,
            body=resource.create_name,
            summary=f"create a {kind} (its gateway.yaml fields plus name)",
        ),
    )
    async def create_object(request: Request, principal: Writer) -> Any:
        body = await json_object(request)
        name = _name(body.pop("name", None), kind, pattern)
        scope_write(principal, name, body)
        pool = _pool(backend, f"creating {kind} {name}")
        if section == "applications":
            await _check_org_exists(pool, body.get("org"))
        change = await edits.edit_object(
            pool,
            backend.redis,
            backend.settings.redis_prefix,
            principal,
            section,
            name,
            body,
            action="create",
            expect_exists=False,
            request_id=request.headers.get("x-request-id"),
        )
        return await answer(name, change, 201)

    @app.get(
        f"/v1/{section}/{{name}}",
        tags=tag,
        operation_id=f"get_{kind}",
        **doc(200, resource.object_name, *READ, 404, summary=f"one {kind}"),
    )
    async def get_object(name: str, principal: Reader) -> Any:
        pool = _pool(backend, f"reading {kind} {name}")
        snapshot = await edits.read_catalog(pool)
        spec = snapshot.specs.section(section).get(name)
        if spec is None:
            raise ApiError(404, f"no {kind} named {name}", "not_found")
        if org_owned:
            principal.require_org(_org_of(section, name, spec), f"{kind} {name}")
        meta = (await edits.object_meta(pool, section, name)).get(name, {})
        return JsonResponse(_object(name, spec, meta))

    @app.patch(
        f"/v1/{section}/{{name}}",
        tags=tag,
        operation_id=f"update_{kind}",
        **doc(
            200,
            resource.object_name,
            *WRITE,
            404,
            409,
            413,
            body="Patch",
            summary=f"change a {kind}: a JSON merge patch of its fields",
        ),
    )
    async def update_object(name: str, request: Request, principal: Writer) -> Any:
        patch = await json_object(request)
        if "name" in patch and patch["name"] != name:
            raise ApiError(
                400,
                f"a {kind} cannot be renamed: create {patch['name']} and delete {name}",
                "invalid_parameter",
                "name",
            )
        patch.pop("name", None)
        pool = _pool(backend, f"changing {kind} {name}")
        snapshot = await edits.read_catalog(pool)
        current = snapshot.specs.section(section).get(name)
        if current is None:
            raise ApiError(404, f"no {kind} named {name}", "not_found")
        spec = edits.merge_patch(current, patch)
        if org_owned:
            scope_write(principal, name, current)
            scope_write(principal, name, spec)
        else:
            scope_write(principal, name, spec)
        if section == "applications" and spec.get("org") != current.get("org"):
            await _check_org_exists(pool, spec.get("org"))
        change = await edits.edit_object(
            pool,
            backend.redis,
            backend.settings.redis_prefix,
            principal,
            section,
            name,
            spec,
            action="update",
            expect_exists=True,
            request_id=request.headers.get("x-request-id"),
        )
        return await answer(name, change, 200)

    @app.delete(
        f"/v1/{section}/{{name}}",
        tags=tag,
        operation_id=f"delete_{kind}",
        **doc(200, "Deleted", *READ, 404, 409, summary=f"delete a {kind} nothing uses any more"),
    )
    async def delete_object(name: str, request: Request, principal: Writer) -> Any:
        pool = _pool(backend, f"deleting {kind} {name}")
        snapshot = await edits.read_catalog(pool)
        current = snapshot.specs.section(section).get(name)
        if current is None:
            raise ApiError(404, f"no {kind} named {name}", "not_found")
        scope_write(principal, name, None if section == "organizations" else current)
        change = await edits.edit_object(
            pool,
            backend.redis,
            backend.settings.redis_prefix,
            principal,
            section,
            name,
            None,
            action="delete",
            expect_exists=True,
            request_id=request.headers.get("x-request-id"),
        )
        return JsonResponse({"name": name, "deleted": True, "warnings": change.warnings})


def _name(value: Any, kind: str, pattern: Any) -> str:
    if value is None:
        raise ApiError(
            400, f"missing required field 'name' (the {kind}'s name)", "invalid_parameter", "name"
        )
    if not isinstance(value, str) or not value:
        raise ApiError(
            400, f"name must be a non-empty string, not {value!r}", "invalid_parameter", "name"
        )
    problem = check_name(value, kind, pattern)
    if problem is not None:
        raise ApiError(400, problem, "invalid_parameter", "name")
    return value


async def _check_org_exists(pool: asyncpg.Pool, org: Any) -> None:
    if not isinstance(org, str):
        return  # the application's own validation names the field
    exists = await _with_timeout(
        "checking the organization",
        pool.fetchval("SELECT 1 FROM organizations WHERE name = $1", org),
    )
    if not exists:
        raise ApiError(
            400,
            f"unknown organization '{org}': create it first (POST /v1/organizations)",
            "invalid_parameter",
            "org",
        )


# --- providers: test and rotate credentials --------------------------------------------


async def _provider(backend: Backend, name: str, spec: Mapping[str, Any] | None = None) -> Provider:
    if spec is None:
        snapshot = await edits.read_catalog(_pool(backend, f"reading provider {name}"))
        spec = snapshot.specs.providers.get(name)
        if spec is None:
            raise ApiError(404, f"no provider named {name}", "not_found")
    try:
        config = build_config({"providers": {name: dict(spec)}}, "postgres")
    except ConfigError as exc:
        raise invalid(
            errors.field_errors(exc.issues, ("providers", name)), f"provider {name}"
        ) from None
    return config.providers[name]


def _credential(backend: Backend, provider: Provider) -> str | None:
    """The provider's credential as this process reads it (its env var or file)."""
    single = GatewayConfig(
        providers=MappingProxyType({provider.name: provider}),
        models=MappingProxyType({}),
        policies=MappingProxyType({}),
        applications=MappingProxyType({}),
        model_index=MappingProxyType({}),
        source="admin",
        fingerprint="",
    )
    return load_credentials(single, base_dir=backend.config_dir).get(provider.name)


def _provider_routes(app: FastAPI, backend: Backend) -> None:
    @app.post(
        "/v1/providers/{name}/test",
        tags=["providers"],
        operation_id="test_provider",
        **doc(200, "ProviderTest", *READ, 404, summary="reach the provider with its credential"),
    )
    async def test_provider(name: str, principal: Writer) -> Any:
        provider = await _provider(backend, name)
        result = await probe(provider, _credential(backend, provider))
        return JsonResponse({"provider": name, "test": result.as_dict()})

    @app.post(
        "/v1/providers/{name}/rotate-credentials",
        tags=["providers"],
        operation_id="rotate_provider_credentials",
        **doc(
            200,
            "CredentialsRotated",
            *WRITE,
            404,
            409,
            502,
            body="RotateCredentials",
            summary="switch to a new credential reference or re-read it; tested first",
        ),
    )
    async def rotate_credentials(name: str, request: Request, principal: Writer) -> Any:
        principal.require_unscoped(f"provider {name}")
        body = parse_model(schemas.RotateCredentials, await json_object(request))
        if body.api_key_env is not None and body.api_key_file is not None:
            raise ApiError(
                400,
                "give api_key_env or api_key_file, not both",
                "invalid_parameter",
                "api_key_file",
            )
        pool = _pool(backend, f"rotating provider {name}'s credentials")
        snapshot = await edits.read_catalog(pool)
        current = snapshot.specs.providers.get(name)
        if current is None:
            raise ApiError(404, f"no provider named {name}", "not_found")
        spec = dict(current)
        if body.api_key_env is not None or body.api_key_file is not None:
            spec.pop("api_key_env", None)
            spec.pop("api_key_file", None)
            if body.api_key_env is not None:
                spec["api_key_env"] = body.api_key_env
            else:
                spec["api_key_file"] = body.api_key_file
        provider = await _provider(backend, name, spec)
        if not provider.has_credential:
            raise ApiError(
                400, f"provider {name} declares no credential to rotate", "invalid_parameter"
            )
        credential = _credential(backend, provider)
        reference = (
            {"api_key_env": provider.api_key_env}
            if provider.api_key_env
            else {"api_key_file": str(provider.api_key_file)}
        )
        field = next(iter(reference))
        if credential is None:
            raise ApiError(
                400,
                f"{reference[field]} holds no credential in this process: set it first "
                "(every replica reads it from its own environment)",
                "credential_missing",
                field,
            )
        result = await probe(provider, credential)
        if not result.ok:
            status = 502 if result.status is None else 400
            raise ApiError(
                status,
                f"the new credential was not accepted, nothing changed: {result.error}",
                "provider_unreachable" if result.status is None else "credential_rejected",
                field,
                extra={"test": result.as_dict()},
            )
        changed = spec != current
        if changed:
            await edits.edit_object(
                pool,
                backend.redis,
                backend.settings.redis_prefix,
                principal,
                "providers",
                name,
                spec,
                action="rotate-credentials",
                expect_exists=True,
                request_id=request.headers.get("x-request-id"),
            )
        else:
            async with pool.acquire() as conn, conn.transaction():
                await edits.audit(
                    conn,
                    principal,
                    "rotate-credentials",
                    "provider",
                    name,
                    before=reference,
                    after=reference,
                    request_id=request.headers.get("x-request-id"),
                )
                # Every replica re-reads its credentials (a reload), through Postgres too.
                await conn.execute("SELECT pg_notify('ext_proc_invalidate', 'config:*')")
            await edits.announce(backend.redis, backend.settings.redis_prefix)
        await backend.reload()  # here at once; requests in flight finish on the old one
        return JsonResponse(
            {
                "provider": name,
                "credential": reference,
                "changed_reference": changed,
                "test": result.as_dict(),
                "warnings": [
                    f"tested from this replica; every replica reads {reference[field]} from "
                    "its own environment (set it there before rotating) and switches on its "
                    "next reload, within a second"
                ],
            }
        )


# --- policies: types and validation ------------------------------------------------------


@functools.cache
def _policy_type_list() -> list[dict[str, Any]]:
    data = []
    for name, policy_type in policy_types().items():
        variables = None
        if policy_type.cel_variables is not None:
            variables = {
                field: {var: _CEL_TYPES.get(kind, kind.__name__) for var, kind in names.items()}
                for field, names in policy_type.cel_variables.items()
            }
        data.append(
            {
                "type": name,
                "description": " ".join((policy_type.spec.__doc__ or "").split()),
                "fields": list(policy_type.fields),
                "parameters": TypeAdapter(policy_type.spec).json_schema(),
                "cel_variables": variables,
            }
        )
    return data


def _policy_routes(app: FastAPI, backend: Backend) -> None:
    @app.get(
        "/v1/policy-types",
        tags=["policies"],
        operation_id="list_policy_types",
        **doc(
            200, "PolicyTypeList", *READ, summary="each policy type: its parameters, CEL variables"
        ),
    )
    async def list_policy_types(principal: Reader) -> Any:
        return JsonResponse({"data": _policy_type_list()})

    @app.post(
        "/v1/policies/validate",
        tags=["policies"],
        operation_id="validate_policy",
        **doc(
            200,
            "PolicyValidation",
            400,
            401,
            403,
            413,
            body="PolicyCreate",
            summary="check a policy body (and its CEL) without saving it",
        ),
    )
    async def validate_policy(request: Request, principal: Reader) -> Any:
        body = await json_object(request)
        raw_name = body.pop("name", None)
        name = (
            raw_name
            if isinstance(raw_name, str) and not check_name(raw_name, "policy")
            else "policy"
        )
        specs = await _current_specs(backend)
        after = specs.replace("policies", {**specs.policies, name: body})
        _, issues = edits.issues_of(after)
        own = [issue for issue in issues if issue.loc[:2] == ("policies", name)]
        found = errors.field_errors(own, ("policies", name))
        if raw_name is not None and name == "policy" and raw_name != "policy":
            found.insert(0, {"field": "name", "message": f"invalid policy name {raw_name!r}"})
        return JsonResponse({"valid": not found, "errors": found})


async def _current_specs(backend: Backend) -> CatalogSpecs:
    """The catalog (what a body is checked against), else the running config."""
    pool = backend.pool
    if pool is not None:
        try:
            return (await edits.read_catalog(pool)).specs
        except ApiError:
            pass  # Postgres is down: check against what this replica runs
    config = backend.running_config
    if config is None:
        return CatalogSpecs({}, {}, {}, {})
    return specs_of(config)


# --- API keys ---------------------------------------------------------------------------


def _key(info: KeyInfo, now: datetime) -> dict[str, Any]:
    return {
        "id": info.key_id,
        "prefix": info.prefix,
        "app": info.app,
        "org": info.org,
        "environment": info.environment,
        "name": info.description,
        "status": info.status(now),
        "created_at": info.created_at.isoformat(),
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
        "rotated_from": info.rotated_from,
        "replaced_by": info.replaced_by,
    }


async def _app_org(pool: asyncpg.Pool, app: str) -> str:
    org = await _with_timeout(
        "reading the application",
        pool.fetchval(
            "SELECT o.name FROM applications a JOIN organizations o ON o.id = a.organization_id "
            "WHERE a.name = $1",
            app,
        ),
    )
    if org is None:
        raise ApiError(400, f"unknown application '{app}'", "invalid_parameter", "app")
    return str(org)


async def _key_info(pool: asyncpg.Pool, principal: Principal, key_id: str) -> KeyInfo:
    info = await _with_timeout("reading the key", key_store.get_key(pool, key_id))
    if info is None:
        raise ApiError(404, f"no key with id '{key_id}'", "not_found")
    principal.require_org(info.org, f"key {key_id}")
    return info


def _key_routes(app: FastAPI, backend: Backend) -> None:
    @app.post(
        "/v1/keys",
        tags=["keys"],
        operation_id="create_key",
        **doc(
            201,
            "KeyCreated",
            *WRITE,
            413,
            body="KeyCreate",
            summary="a new API key (shown once) for an application's environment",
        ),
    )
    async def create_key(request: Request, principal: Writer) -> Any:
        body: schemas.KeyCreate = parse_model(schemas.KeyCreate, await json_object(request))
        pool = _pool(backend, "creating a key")
        principal.require_org(await _app_org(pool, body.app), f"application {body.app}")
        now = datetime.now(UTC)
        expires_in = None
        if body.expires_at is not None:
            expires_at = (
                body.expires_at if body.expires_at.tzinfo else body.expires_at.replace(tzinfo=UTC)
            )
            expires_in = (expires_at - now).total_seconds()
            if expires_in <= 0:
                raise ApiError(
                    400, "expires_at must be in the future", "invalid_parameter", "expires_at"
                )
        try:
            new = await _with_timeout(
                "creating a key",
                key_store.create_key(
                    pool,
                    body.app,
                    environment=body.environment or DEFAULT_ENVIRONMENT,
                    description=body.name,
                    expires_in=expires_in,
                ),
            )
        except key_store.UnknownEnvironment as exc:
            raise ApiError(400, str(exc), "invalid_parameter", "environment") from None
        except key_store.KeyStoreError as exc:
            raise ApiError(400, str(exc), "invalid_parameter", "app") from None
        answer = _key(new.info, now)
        await _audit(
            pool, principal, "create", "key", new.info.key_id, new.info.org, None, answer, request
        )
        return JsonResponse({**answer, "key": new.key, "replaced": None}, status_code=201)

    @app.get(
        "/v1/keys",
        tags=["keys"],
        operation_id="list_keys",
        **doc(200, "KeyList", 400, 401, 403, 503, summary="keys (never the keys themselves)"),
    )
    async def list_keys(
        principal: Reader,
        app_name: Annotated[str | None, Query(alias="app", description="one application")] = None,
        include_inactive: Annotated[
            bool, Query(alias="all", description="revoked and expired too")
        ] = False,
    ) -> Any:
        pool = _pool(backend, "listing keys")
        if app_name is not None:
            principal.require_org(await _app_org(pool, app_name), f"application {app_name}")
        try:
            found = await _with_timeout(
                "listing keys",
                key_store.list_keys(pool, app=app_name, include_inactive=include_inactive),
            )
        except key_store.UnknownApplication as exc:
            raise ApiError(400, str(exc), "invalid_parameter", "app") from None
        now = datetime.now(UTC)
        return JsonResponse({"data": [_key(k, now) for k in found if principal.sees(k.org)]})

    @app.post(
        "/v1/keys/{key_id}/revoke",
        tags=["keys"],
        operation_id="revoke_key",
        **doc(
            200,
            "KeyObject",
            *READ,
            404,
            summary="revoke a key: every replica refuses it within a second",
        ),
    )
    async def revoke_key(key_id: str, request: Request, principal: Writer) -> Any:
        pool = _pool(backend, "revoking a key")
        before = await _key_info(pool, principal, key_id)
        revoked = await _with_timeout(
            "revoking a key",
            key_store.revoke_key(
                pool, key_id, redis=backend.redis, prefix=backend.settings.redis_prefix
            ),
        )
        now = datetime.now(UTC)
        answer = _key(revoked.info, now)
        await _audit(
            pool, principal, "revoke", "key", key_id, before.org, _key(before, now), answer, request
        )
        return JsonResponse(answer)

    @app.post(
        "/v1/keys/{key_id}/rotate",
        tags=["keys"],
        operation_id="rotate_key",
        **doc(
            201,
            "KeyCreated",
            *WRITE,
            404,
            409,
            413,
            body="KeyRotate",
            summary="a new key; the old one works for the grace period",
        ),
    )
    async def rotate_key(key_id: str, request: Request, principal: Writer) -> Any:
        body: schemas.KeyRotate = parse_model(schemas.KeyRotate, await json_object(request))
        pool = _pool(backend, "rotating a key")
        before = await _key_info(pool, principal, key_id)
        grace = DEFAULT_GRACE if body.grace_period is None else body.grace_period
        try:
            new = await _with_timeout(
                "rotating a key",
                key_store.rotate_key(
                    pool,
                    key_id,
                    grace=grace,
                    redis=backend.redis,
                    prefix=backend.settings.redis_prefix,
                ),
            )
        except key_store.KeyNotActive as exc:
            raise ApiError(409, str(exc), "key_not_active") from None
        now = datetime.now(UTC)
        answer = _key(new.info, now)
        replaced = _key(new.replaced, now) if new.replaced is not None else None
        await _audit(
            pool,
            principal,
            "rotate",
            "key",
            key_id,
            before.org,
            _key(before, now),
            replaced,
            request,
        )
        return JsonResponse({**answer, "key": new.key, "replaced": replaced}, status_code=201)


async def _audit(
    pool: asyncpg.Pool,
    principal: Principal,
    action: str,
    kind: str,
    name: str,
    org: str | None,
    before: Any,
    after: Any,
    request: Request,
) -> None:
    await _with_timeout(
        "writing the audit log",
        edits.audit(
            pool,
            principal,
            action,
            kind,
            name,
            org=org,
            before=before,
            after=after,
            request_id=request.headers.get("x-request-id"),
        ),
    )


# --- admin tokens -----------------------------------------------------------------------


def _token_routes(app: FastAPI, backend: Backend) -> None:
    @app.post(
        "/v1/tokens",
        tags=["tokens"],
        operation_id="create_token",
        **doc(
            201,
            "TokenCreated",
            *WRITE,
            409,
            413,
            body="TokenCreate",
            summary="a new admin token (shown once): admin or viewer, optionally one org's",
        ),
    )
    async def create_token(request: Request, principal: Writer) -> Any:
        body: schemas.TokenCreate = parse_model(schemas.TokenCreate, await json_object(request))
        org = body.org if body.org is not None else principal.org
        principal.require_org(
            org, "a token for " + (f"organization {org}" if org else "every organization")
        )
        pool = _pool(backend, "creating a token")
        try:
            async with pool.acquire(timeout=QUERY_TIMEOUT) as conn:
                token, info = await admin_tokens.create_token(
                    conn,
                    body.name,
                    body.role,  # type: ignore[arg-type]  # OneOf(ROLES)
                    org=org,
                    created_by=principal.name,
                    expires_at=body.expires_at,
                )
        except admin_tokens.UnknownOrganization as exc:
            raise ApiError(400, str(exc), "invalid_parameter", "org") from None
        except admin_tokens.TokenExists as exc:
            raise ApiError(409, str(exc), "already_exists", "name") from None
        except DATABASE_ERRORS as exc:
            raise unavailable("creating a token", exc) from None
        answer = info.as_dict()
        await _audit(pool, principal, "create", "token", info.name, org, None, answer, request)
        return JsonResponse({**answer, "token": token}, status_code=201)

    @app.get(
        "/v1/whoami",
        tags=["tokens"],
        operation_id="whoami",
        **doc(200, "WhoAmI", *READ, summary="the calling token: its name, role and organization"),
    )
    async def whoami(principal: Reader) -> Any:
        # The console asks once at sign-in, to disable what a viewer cannot do.
        return JsonResponse({"name": principal.name, "role": principal.role, "org": principal.org})

    @app.get(
        "/v1/tokens",
        tags=["tokens"],
        operation_id="list_tokens",
        **doc(200, "TokenList", *READ, summary="usable admin tokens (never the tokens themselves)"),
    )
    async def list_tokens(principal: Reader) -> Any:
        pool = _pool(backend, "listing tokens")
        found = await _with_timeout(
            "listing tokens", admin_tokens.list_tokens(pool, org=principal.org)
        )
        return JsonResponse({"data": [t.as_dict() for t in found]})

    @app.post(
        "/v1/tokens/{name}/revoke",
        tags=["tokens"],
        operation_id="revoke_token",
        **doc(
            200, "TokenList", *READ, 404, summary="revoke a token: refused from its next request"
        ),
    )
    async def revoke_token(name: str, request: Request, principal: Writer) -> Any:
        pool = _pool(backend, "revoking a token")
        current = await _with_timeout(
            "reading the token", admin_tokens.get_active_token(pool, name)
        )
        if current is None:
            raise ApiError(404, f"no usable admin token named '{name}'", "not_found")
        principal.require_org(current.org, f"token {name}")
        revoked = await _with_timeout("revoking a token", admin_tokens.revoke_token(pool, name))
        answer = revoked.as_dict()
        await _audit(
            pool,
            principal,
            "revoke",
            "token",
            name,
            current.org,
            current.as_dict(),
            answer,
            request,
        )
        return JsonResponse({"data": [answer]})


# --- usage, activity, audit -----------------------------------------------------------


def _observe_routes(app: FastAPI, backend: Backend) -> None:
    usage_doc = doc(200, "UsageAnswer", 400, *READ, summary="usage rollups with cost")

    @app.get("/v1/usage", tags=["usage"], operation_id="usage", **usage_doc)
    async def usage(
        request: Request,
        principal: Reader,
        by: Annotated[str | None, Query(description="group keys, e.g. app_id,model")] = None,
        since: Annotated[str | None, Query(description="24h, 7d, or an ISO time")] = None,
        until: Annotated[str | None, Query()] = None,
        org: Annotated[str | None, Query()] = None,
        app_: Annotated[str | None, Query(alias="app")] = None,
        model: Annotated[str | None, Query()] = None,
        limit: Annotated[str | None, Query(description="1..100000, default 1000")] = None,
    ) -> Any:
        try:
            query = usage_query(request.url.query)
        except BadParameter as exc:
            raise ApiError(400, exc.message, "invalid_parameter", exc.param) from None
        if principal.org is not None:
            if query["org"] is not None:
                principal.require_org(query["org"], f"usage of organization {query['org']}")
            query["org"] = principal.org
        pool = _pool(backend, "usage")
        rows = await _with_timeout(
            "usage",
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
        )
        return JsonResponse(
            {
                "group_by": query["by"],
                "since": query["since"].isoformat(),
                "until": query["until"].isoformat(),
                "rows": [_exact_cost(r.as_dict()) for r in rows],
            }
        )

    activity_doc = doc(
        200,
        None,
        *READ,
        media="text/event-stream",
        summary="a live stream (SSE) of finished requests: one `event: request` each",
    )

    @app.get("/v1/activity", tags=["usage"], operation_id="activity", **activity_doc)
    async def activity(
        principal: Reader,
        app_: Annotated[str | None, Query(alias="app")] = None,
        model: Annotated[str | None, Query()] = None,
        decision: Annotated[str | None, Query()] = None,
    ) -> Any:
        feed = backend.activity
        if feed is None:
            raise ApiError(503, "this process has no activity feed", "service_unavailable")

        def accepts(record: UsageRecord) -> bool:  # on the request path: attribute reads
            return (
                principal.sees(record.org_id)
                and (app_ is None or record.app_id == app_)
                and (model is None or record.model == model)
                and (decision is None or record.decision == decision)
            )

        try:
            subscription = feed.subscribe(accepts)
        except OverflowError as exc:
            raise ApiError(
                503, str(exc), "service_unavailable", headers={"retry-after": "5"}
            ) from None
        return StreamingResponse(
            sse(subscription),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    audit_doc = doc(200, "AuditList", 400, 401, 403, 503, summary="the audit log, newest first")

    @app.get("/v1/audit", tags=["audit"], operation_id="audit", **audit_doc)
    async def audit_log(
        principal: Reader,
        kind: Annotated[str | None, Query()] = None,
        name: Annotated[str | None, Query()] = None,
        actor: Annotated[str | None, Query()] = None,
        before: Annotated[
            int | None, Query(description="entries older than this id", ge=1, le=2**63 - 1)
        ] = None,
        limit: Annotated[int, Query(ge=1, le=AUDIT_LIMIT)] = 100,
    ) -> Any:
        conditions: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("kind", kind),
            ("name", name),
            ("actor", actor),
            ("org", principal.org),
        ):
            if value is not None:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        if before is not None:
            args.append(before)
            conditions.append(f"id < ${len(args)}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        args.append(limit)
        pool = _pool(backend, "the audit log")
        rows = await _with_timeout(
            "the audit log",
            pool.fetch(
                "SELECT id, at, actor, actor_role, action, kind, name, org, before::text, "
                f"after::text, request_id FROM audit_log{where} "
                f"ORDER BY id DESC LIMIT ${len(args)}",
                *args,
            ),
        )
        return JsonResponse(
            {
                "data": [
                    {
                        "id": row["id"],
                        "at": row["at"].isoformat(),
                        "actor": row["actor"],
                        "actor_role": row["actor_role"],
                        "action": row["action"],
                        "kind": row["kind"],
                        "name": row["name"],
                        "org": row["org"],
                        "before": orjson.loads(row["before"]) if row["before"] else None,
                        "after": orjson.loads(row["after"]) if row["after"] else None,
                        "request_id": row["request_id"],
                    }
                    for row in rows
                ]
            }
        )


def _exact_cost(row: dict[str, Any]) -> dict[str, Any]:
    """``cost_usd`` as a decimal string with its 10 places (``"0.0000000000"``, never
    ``"0E-10"``), as the usage records' column holds it."""
    cost = row.get("cost_usd")
    if isinstance(cost, str):
        row["cost_usd"] = f"{Decimal(cost):.10f}"
    return row


# --- the OpenAPI document ---------------------------------------------------------------


def _install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            components.update(schemas.openapi_components())
            document["security"] = [{"HTTPBearer": []}]
            for path, operations in document.get("paths", {}).items():
                for operation in operations.values():
                    if path in ("/healthz", "/readyz"):
                        operation["security"] = []
                    _tidy(operation)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _tidy(operation: dict[str, Any]) -> None:
    """Only what the routes declare: FastAPI adds a 422 for parameter validation (this
    API answers 400) and a default schema beside the declared ``$ref``."""
    responses = operation.get("responses", {})
    generated = responses.get("422", {}).get("content", {}).get("application/json", {})
    if generated.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
        del responses["422"]
    for response in responses.values():
        for media in response.get("content", {}).values():
            schema = media.get("schema", {})
            if "$ref" in schema:
                media["schema"] = {"$ref": schema["$ref"]}
