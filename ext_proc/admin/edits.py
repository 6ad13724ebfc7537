"""Changing the catalog through the admin API: one object at a time, checked against the
whole catalog, written with its audit row in one transaction, announced to every replica.

An edit is validated the way a file is: the catalog as it would be after the edit is
built with ``ext_proc.config.document.build_config`` (the declared schema), so an object
gets the same checks and messages as in gateway.yaml, and a reference it breaks is found
wherever it is (a provider still used by a model, a model named by an allowlist, a
policy still bound). Problems of the object itself answer 400 naming the field; what it
would break elsewhere answers 409 naming who holds it. Only problems the edit introduces
count: a catalog already inconsistent (plain SQL) does not block unrelated edits.

Writes take the catalog's row lock (as ``apply`` does), store the object as the file
would write it (``specs_of``: defaults written out) with ``managed_by = 'api'``, add an
``audit_log`` row (who, what, before, after) and commit; the commit NOTIFYs
``config:*`` (schema/0006) and Redis pub/sub gets the same message, so every replica
reloads within a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from ext_proc.admin.auth import Principal
from ext_proc.admin.errors import QUERY_TIMEOUT, ApiError, field_errors, invalid, unavailable
from ext_proc.config.errors import ConfigError, ConfigIssue
from ext_proc.config.model import GatewayConfig
from ext_proc.stores.catalog import (
    CONFIG_KIND,
    MANAGED_BY_API,
    CatalogNotMigrated,
    CatalogSnapshot,
    CatalogSpecs,
    Spec,
    delete_object,
    is_migrated,
    read_in_transaction,
    specs_of,
    write_bindings,
    write_object,
)
from ext_proc.stores.invalidation import ALL, publish
from ext_proc.stores.postgres import DATABASE_ERRORS

log = logging.getLogger(__name__)

KIND_OF_SECTION: Mapping[str, str] = {
    "organizations": "organization",
    "providers": "provider",
    "models": "model",
    "policies": "policy",
    "applications": "application",
}

# What each object's listing adds to its fields (besides its name).
_META = {
    "organizations": "SELECT name, managed_by, created_at, updated_at FROM organizations",
    "providers": "SELECT name, managed_by, created_at, updated_at FROM providers",
    "models": "SELECT name, managed_by, created_at, updated_at FROM models",
    "policies": "SELECT name, managed_by, created_at, updated_at, version FROM policies",
    "applications": "SELECT name, managed_by, created_at, updated_at FROM applications",
}


@dataclass(slots=True)
class Change:
    """What an edit did: the object before and after (None: absent), and what the
    gateway's other parts need to know (Envoy must be re-rendered, ...)."""

    section: str
    name: str
    action: str  # create, update, delete
    before: Spec | None
    after: Spec | None
    revision: int
    warnings: list[str] = field(default_factory=list)
    published: bool = False


async def read_catalog(pool: asyncpg.Pool) -> CatalogSnapshot:
    """The catalog now, as stored (503 when Postgres cannot answer)."""
    try:
        async with pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            if not await is_migrated(conn):
                raise CatalogNotMigrated()
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await asyncio.wait_for(read_in_transaction(conn), QUERY_TIMEOUT)
    except CatalogNotMigrated as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None
    except DATABASE_ERRORS as exc:
        raise unavailable("reading the catalog", exc) from None


async def object_meta(
    pool: asyncpg.Pool, section: str, name: str | None = None
) -> dict[str, dict[str, Any]]:
    """name -> {managed_by, created_at, updated_at[, version]} of a section's objects."""
    query = _META[section]
    args: list[Any] = []
    if name is not None:
        query += " WHERE name = $1"
        args.append(name)
    try:
        rows = await asyncio.wait_for(pool.fetch(query, *args), QUERY_TIMEOUT)
    except DATABASE_ERRORS as exc:
        raise unavailable("reading the catalog", exc) from None
    meta: dict[str, dict[str, Any]] = {}
    for row in rows:
        item: dict[str, Any] = {
            "managed_by": row["managed_by"],
            "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
        }
        if section == "policies":
            item["version"] = row["version"]
        meta[row["name"]] = item
    return meta


def issues_of(specs: CatalogSpecs) -> tuple[GatewayConfig | None, list[ConfigIssue]]:
    try:
        return specs.parse(), []
    except ConfigError as exc:
        return None, list(exc.issues)


def check_edit(
    before: CatalogSpecs, after: CatalogSpecs, section: str, name: str, what: str
) -> GatewayConfig:
    """The config after the edit, or 400 (the object's own problems) / 409 (what it
    breaks elsewhere); problems the catalog had before do not count."""
    config, issues = issues_of(after)
    if not issues:
        assert config is not None
        return config
    _, old = issues_of(before)
    known = {(issue.path, issue.message) for issue in old}
    new = [issue for issue in issues if (issue.path, issue.message) not in known]
    if not new:  # the catalog was inconsistent already, and this edit adds nothing to it
        raise ApiError(
            409,
            "the catalog does not validate as it is (edited by SQL?), so this change cannot "
            "be checked: " + "; ".join(str(issue) for issue in issues[:3]),
            "catalog_invalid",
        )
    prefix = (section, name)
    own = [issue for issue in new if issue.loc[:2] == prefix]
    if own:
        raise invalid(field_errors(own, prefix), what)
    holders = sorted({".".join(str(part) for part in issue.loc[:2]) for issue in new})
    raise ApiError(
        409,
        f"{KIND_OF_SECTION[section]} {name} is still used by {', '.join(holders)}: "
        + "; ".join(f"{issue.path}: {issue.message}" for issue in new[:5]),
        "in_use",
        extra={"used_by": holders, "errors": field_errors(new, prefix)},
    )


async def edit_object(
    pool: asyncpg.Pool,
    redis: Any,
    prefix: str,
    principal: Principal,
    section: str,
    name: str,
    spec: Spec | None,
    *,
    action: str,
    expect_exists: bool | None,
    request_id: str | None = None,
) -> Change:
    """Create (``expect_exists=False``), replace (True) or delete (``spec`` None) one
    object; ``ApiError`` for anything refused (nothing written then)."""
    kind = KIND_OF_SECTION[section]
    try:
        async with pool.acquire(timeout=QUERY_TIMEOUT) as conn, conn.transaction():
            if not await is_migrated(conn):
                raise CatalogNotMigrated()
            # One catalog writer at a time (apply takes the same lock).
            await conn.execute("SELECT revision FROM catalog_state FOR UPDATE")
            snapshot = await read_in_transaction(conn)
            current = snapshot.specs.section(section)
            before = current.get(name)
            if expect_exists is False and before is not None:
                raise ApiError(409, f"{kind} {name} exists already", "already_exists", "name")
            if expect_exists and before is None:
                raise ApiError(404, f"no {kind} named {name}", "not_found")
            if spec is None:
                await _check_delete(conn, section, name)
                objects = {k: v for k, v in current.items() if k != name}
            else:
                objects = {**current, name: spec}
            after_specs = snapshot.specs.replace(section, objects)
            config = check_edit(snapshot.specs, after_specs, section, name, f"{kind} {name}")
            stored: Spec | None = None
            if spec is None:
                await delete_object(conn, section, name)
            else:
                stored = specs_of(config).section(section).get(name, {})
                await write_object(conn, section, name, stored, MANAGED_BY_API)
                if section == "applications":
                    await write_bindings(conn, name, stored)
            revision = await conn.fetchval("SELECT revision FROM catalog_state")
            await audit(
                conn,
                principal,
                action,
                kind,
                name,
                org=_org_of(section, name, before, stored),
                before=before,
                after=stored,
                request_id=request_id,
            )
    except ApiError:
        raise
    except CatalogNotMigrated as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None
    except (asyncpg.ForeignKeyViolationError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise ApiError(409, f"the database refused the change: {exc}", "in_use") from None
    except DATABASE_ERRORS as exc:
        raise unavailable(f"changing {kind} {name}", exc) from None
    change = Change(section, name, action, before, stored, revision)
    change.warnings.extend(envoy_warnings(snapshot.specs, after_specs, section, name))
    change.published = await announce(redis, prefix)
    return change


async def _check_delete(conn: asyncpg.Connection, section: str, name: str) -> None:
    """409 naming what still holds an organization or an application (keys, tokens)."""
    if section == "organizations":
        apps = [
            r["name"]
            for r in await conn.fetch(
                "SELECT a.name FROM applications a JOIN organizations o "
                "ON o.id = a.organization_id WHERE o.name = $1 ORDER BY a.name",
                name,
            )
        ]
        tokens = [
            r["name"]
            for r in await conn.fetch(
                "SELECT t.name FROM admin_tokens t JOIN organizations o "
                "ON o.id = t.organization_id WHERE o.name = $1 AND t.revoked_at IS NULL",
                name,
            )
        ]
        holders = [f"applications.{a}" for a in apps] + [f"tokens.{t}" for t in tokens]
        if holders:
            raise ApiError(
                409,
                f"organization {name} still has {', '.join(holders)}: delete or move the "
                "applications and revoke the tokens first",
                "in_use",
                extra={"used_by": holders},
            )
        revoked = await conn.fetchval(
            "SELECT count(*) FROM admin_tokens t JOIN organizations o "
            "ON o.id = t.organization_id WHERE o.name = $1",
            name,
        )
        if revoked:  # revoked tokens keep their organization for the record
            await conn.execute(
                "DELETE FROM admin_tokens t USING organizations o "
                "WHERE o.id = t.organization_id AND o.name = $1 AND t.revoked_at IS NOT NULL",
                name,
            )
    elif section == "applications":
        keys = await active_keys(conn, name)
        if keys:
            raise ApiError(
                409,
                f"application {name} still has {sum(keys.values())} active API key(s) "
                f"({', '.join(f'{env}: {n}' for env, n in keys.items())}): revoke them first "
                f"(GET /v1/keys?app={name})",
                "in_use",
                extra={"used_by": [f"keys ({env})" for env in keys]},
            )


async def active_keys(conn: asyncpg.Connection, app: str) -> dict[str, int]:
    """Environment -> active keys of an application."""
    rows = await conn.fetch(
        "SELECT e.name AS env, count(*) AS n FROM api_keys k "
        "JOIN applications a ON a.id = k.application_id "
        "JOIN application_environments e ON e.id = k.environment_id "
        "WHERE a.name = $1 AND k.revoked_at IS NULL "
        "AND (k.expires_at IS NULL OR k.expires_at > now()) GROUP BY e.name ORDER BY e.name",
        app,
    )
    return {row["env"]: row["n"] for row in rows}


def _org_of(section: str, name: str, before: Spec | None, after: Spec | None) -> str | None:
    if section == "organizations":
        return name
    if section == "applications":
        spec = after or before or {}
        org = spec.get("org")
        return org if isinstance(org, str) else None
    return None


async def audit(
    conn: asyncpg.Connection | asyncpg.Pool,
    principal: Principal,
    action: str,
    kind: str,
    name: str,
    *,
    org: str | None = None,
    before: Any = None,
    after: Any = None,
    request_id: str | None = None,
) -> None:
    """One audit row: who (the token's name and role), what, before and after."""
    await conn.execute(
        "INSERT INTO audit_log (actor, actor_role, action, kind, name, org, before, after, "
        "request_id) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9)",
        principal.name,
        principal.role,
        action,
        kind,
        name,
        org,
        None if before is None else orjson.dumps(before).decode(),
        None if after is None else orjson.dumps(after).decode(),
        request_id,
    )


async def announce(redis: Any, prefix: str) -> bool:
    """Tell every replica to reload now (Redis pub/sub; the commit's NOTIFY did too)."""
    if redis is None:
        return False
    try:
        await asyncio.wait_for(publish(redis, prefix, CONFIG_KIND, ALL), 2.0)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("admin API: could not publish config:* (%s); NOTIFY carries it", exc)
        return False
    return True


# --- what needs Envoy re-rendered ------------------------------------------------------

ENVOY_HINT = (
    "re-render the Envoy config from the catalog (`ext-proc envoy-config --from-database "
    "-o envoy.yaml`) and reload Envoy"
)
# Provider fields Envoy's cluster and route for it are rendered from.
_ENVOY_PROVIDER_FIELDS = (
    "type",
    "base_url",
    "timeout",
    "connect_timeout",
    "retries",
    "pass_headers",
)
_ENVOY_MODEL_FIELDS = ("fallbacks", "weight", "attempt_timeout")


def envoy_warnings(before: CatalogSpecs, after: CatalogSpecs, section: str, name: str) -> list[str]:
    """What of this change Envoy does not know until its config is rendered again:
    Envoy's clusters and routes are static (``ext-proc envoy-config``)."""
    if section == "providers":
        old, new = before.providers.get(name), after.providers.get(name)
        if old is None and new is not None:
            return [
                f"provider {name} is new: Envoy has no cluster for it yet, so requests to its "
                f"models fail until you {ENVOY_HINT}"
            ]
        if new is None and old is not None:
            return [f"provider {name} is deleted: its Envoy cluster stays until you {ENVOY_HINT}"]
        changed = [f for f in _ENVOY_PROVIDER_FIELDS if _get(old, f) != _get(new, f)]
        if changed:
            return [
                f"provider {name}: {', '.join(changed)} changed, which Envoy applies (its "
                f"cluster and route): Envoy keeps the old ones until you {ENVOY_HINT}"
            ]
    if section == "models":
        old, new = before.models.get(name), after.models.get(name)
        changed = [f for f in _ENVOY_MODEL_FIELDS if _get(old, f) != _get(new, f)]
        if changed and (_get(old, "fallbacks") or _get(new, "fallbacks")):
            return [
                f"model {name}: its fallback chain ({', '.join(changed)}) changed; the "
                f"targets' Envoy clusters follow the rendered config: {ENVOY_HINT}"
            ]
    return []


def _get(spec: Mapping[str, Any] | None, key: str) -> Any:
    return None if spec is None else spec.get(key)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null removes a field, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
