"""``ext-proc apply -f gateway.yaml``: make the Postgres catalog match the file.

Precedence — which wins when:

* Postgres is the runtime truth. Every replica serves what the catalog tables hold
  (``ext_proc.stores.catalog.load_config``), never the file directly.
* ``apply`` makes the database match the file for every object the file declares
  (providers, models, policies, applications with their environments and policy
  bindings), overwriting any admin API edit to those objects.
* Objects in the database that the file does not declare (created through the admin
  API, or dropped from the file) are left alone and listed as "kept"; ``--prune``
  deletes them.
* An admin API edit persists until the next ``apply`` that declares that object.
* ``apply`` never deletes an application, or an environment, that still has active API
  keys (revoke them first), nor a policy that stays bound to an application.

How: the file is validated first and rejected whole, with every problem as
``FILE:LINE:COL: field: message``, before the database is touched. ``plan`` compares
each object of the file with the database (by meaning, so reformatting the file is not
a change) and lists creates, updates, deletes and kept objects; ``apply`` writes the plan
in one transaction, only if the catalog did not change since the plan was made, bumps
the version of every changed policy (a database trigger does it for any writer),
records the file's fingerprint, and then publishes ``config:*`` (and ``key:*`` when an
application's org changed) so replicas reload within a second. Applying the same file
again writes nothing. Migrations are not run here: ``ext-proc migrate`` does that.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ext_proc.auth.store import KEY_CACHE_NAME, KEY_KIND
from ext_proc.config.errors import ConfigError
from ext_proc.config.loader import load_config
from ext_proc.config.model import GatewayConfig
from ext_proc.settings import Settings
from ext_proc.stores.cache import invalidate_shared
from ext_proc.stores.catalog import (
    CONFIG_KIND,
    POSTGRES_SOURCE,
    SECTIONS,
    CatalogError,
    CatalogSpecs,
    Spec,
    read_snapshot,
    specs_of,
    split_spec,
)
from ext_proc.stores.invalidation import ALL, publish
from ext_proc.stores.postgres import DATABASE_ERRORS, create_pool, database_error_message
from ext_proc.stores.redis import create_redis

Kind = Literal["provider", "model", "policy", "application", "binding"]
Action = Literal["create", "update", "delete", "keep"]


EXIT_OK = 0
EXIT_REFUSED = 1  # the plan cannot be applied as it is (nothing written)
EXIT_INVALID = 2  # invalid file, database unreachable or not migrated (nothing written)

_KIND_OF_SECTION: Mapping[str, Kind] = {
    "providers": "provider",
    "models": "model",
    "policies": "policy",
    "applications": "application",
}
_SECTION_OF_KIND: Mapping[str, str] = {kind: section for section, kind in _KIND_OF_SECTION.items()}
# Bindings: the app's own list is keyed None; an environment's additions by its name.
_Lists = dict[str | None, list[str]]


@dataclass(frozen=True, slots=True)
class Change:
    """One object to create, update, delete, or keep (in the database, not in the file).

    ``before`` / ``after`` are specs (gateway.yaml fields); for a ``binding`` they are
    the ordered policy names, and ``name`` is the application, or ``app/env`` for an
    environment's own list.
    """

    kind: Kind
    name: str
    action: Action
    before: Any = None
    after: Any = None
    details: tuple[str, ...] = ()  # what changes, e.g. "requests 60 -> 100"


@dataclass(frozen=True, slots=True)
class Plan:
    config: GatewayConfig  # the file
    prune: bool
    changes: tuple[Change, ...]  # creates and updates, then deletes, in write order
    kept: tuple[Change, ...]  # in the database but not in the file (only without --prune)
    refusals: tuple[str, ...]  # why it cannot be applied; empty when it can
    notes: tuple[str, ...]  # things worth knowing that do not stop it
    revision: int  # the catalog revision the plan was made against
    fingerprint: str  # the catalog's fingerprint once applied
    desired: CatalogSpecs
    policy_versions: Mapping[str, int]  # current versions in the database

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def count(self, action: Action) -> int:
        """Objects to create/update/delete/keep, as ``format_plan`` shows them: a new
        application's policy lists are part of it, a changed list is an update."""
        if action == "keep":
            return len(self.kept)
        created = {c.name for c in self.changes if c.kind == "application" and c.action == "create"}
        counted = 0
        for change in self.changes:
            shown = change.action
            if change.kind == "binding":
                if change.name.partition("/")[0] in created:
                    continue
                shown = "update"
            counted += shown == action
        return counted


@dataclass(frozen=True, slots=True)
class ApplyResult:
    created: int
    updated: int
    deleted: int
    fingerprint: str  # of the catalog now
    revision: int
    policy_versions: Mapping[str, int]  # created or updated policies -> their version now
    published: bool  # the invalidations reached Redis
    publish_error: str | None = None


class PlanRefused(CatalogError):
    def __init__(self, refusals: Sequence[str]) -> None:
        self.refusals = tuple(refusals)
        super().__init__("; ".join(self.refusals))


class StalePlan(CatalogError):
    """The catalog changed between ``plan`` and ``apply``; make a new plan."""


# --- plan --------------------------------------------------------------------------------


async def plan(pool: asyncpg.Pool, config: GatewayConfig, *, prune: bool) -> Plan:
    """What ``apply`` would do to make the catalog match ``config``. Writes nothing.

    Raises ``CatalogNotMigrated`` before ``ext-proc migrate``, and ``CatalogError`` if
    the config cannot be stored faithfully (a bug: reported, never written).
    """
    desired = specs_of(config)
    async with pool.acquire() as conn:
        snapshot = await read_snapshot(conn)
        active_keys = await _active_keys(conn)
    notes: list[str] = []
    current = _normalized(snapshot.specs, notes)
    versions = snapshot.policy_versions

    changes: list[Change] = []
    deletes: list[Change] = []
    kept: list[Change] = []
    for section in SECTIONS:
        kind = _KIND_OF_SECTION[section]
        now, want = current.section(section), desired.section(section)
        for name, spec in want.items():
            if name not in now:
                changes.append(Change(kind, name, "create", None, spec))
            elif kind == "application":
                before, after = _app_attributes(now[name]), _app_attributes(spec)
                if before != after:
                    details = _diff(before, after)
                    changes.append(Change(kind, name, "update", now[name], spec, details))
            elif now[name] != spec:
                details = _diff(now[name], spec)
                if kind == "policy":
                    version = versions.get(name, 1)
                    details += (f"version {version} -> {version + 1}",)
                changes.append(Change(kind, name, "update", now[name], spec, details))
        for name, spec in now.items():
            if name not in want:
                (deletes if prune else kept).append(
                    Change(kind, name, "delete" if prune else "keep", spec, None)
                )
    changes.extend(_binding_changes(current.applications, desired.applications))
    # Deletes last, dependents first: applications, policies, models, providers.
    order = {"application": 0, "policy": 1, "model": 2, "provider": 3}
    changes.extend(sorted(deletes, key=lambda change: order[change.kind]))

    final = _final(current, desired, prune)
    refusals = _refusals(current, desired, final, deletes, active_keys)
    fingerprint = ""
    if not final.is_empty:
        try:
            fingerprint = final.parse(f"{POSTGRES_SOURCE} (after apply)").fingerprint
        except ConfigError as exc:
            refusals.append(
                "the catalog would not be valid after this apply (objects kept from the "
                "database conflict with the file; --prune removes them):\n  "
                + "\n  ".join(str(issue) for issue in exc.issues)
            )
    return Plan(
        config=config,
        prune=prune,
        changes=tuple(changes),
        kept=tuple(kept),
        refusals=tuple(refusals),
        notes=tuple(notes),
        revision=snapshot.revision,
        fingerprint=fingerprint,
        desired=desired,
        policy_versions=dict(versions),
    )


def _normalized(stored: CatalogSpecs, notes: list[str]) -> CatalogSpecs:
    """The stored catalog in the same normal form as the file's specs (so equal means
    same meaning), or as stored if it does not validate (then compared as written)."""
    if stored.is_empty:
        return stored
    try:
        return specs_of(stored.parse())
    except (ConfigError, CatalogError) as exc:
        notes.append(
            "the catalog in Postgres does not validate as it is; objects are compared as "
            f"stored, and this apply replaces every object the file declares ({exc})"
        )
        return stored


def _app_attributes(spec: Spec) -> Spec:
    """What an application change is about; its policy lists are binding changes."""
    attributes = {key: value for key, value in spec.items() if key not in ("policies",)}
    attributes["environments"] = sorted(spec.get("environments", {}))
    attributes.setdefault("description", None)
    return attributes


def _lists(spec: Spec | None) -> _Lists:
    if spec is None:
        return {}
    lists: _Lists = {None: list(spec.get("policies", []))}
    for env, env_spec in spec.get("environments", {}).items():
        lists[env] = list((env_spec or {}).get("policies", []))
    return lists


def _binding_changes(now: Mapping[str, Spec], want: Mapping[str, Spec]) -> list[Change]:
    changes: list[Change] = []
    for app, spec in want.items():
        before, after = _lists(now.get(app)), _lists(spec)
        for env, policies in after.items():
            name = app if env is None else f"{app}/{env}"
            old = before.get(env)
            if old is None and policies:
                changes.append(Change("binding", name, "create", [], policies))
            elif old is not None and old != policies:
                changes.append(Change("binding", name, "update", old, policies))
    return changes


def _final(current: CatalogSpecs, desired: CatalogSpecs, prune: bool) -> CatalogSpecs:
    """The catalog as it will be after the apply."""
    sections: dict[str, dict[str, Spec]] = {}
    for section in SECTIONS:
        merged = {} if prune else dict(current.section(section))
        merged.update(desired.section(section))
        sections[section] = merged
    return CatalogSpecs(**sections)


def _refusals(
    current: CatalogSpecs,
    desired: CatalogSpecs,
    final: CatalogSpecs,
    deletes: Sequence[Change],
    active_keys: Mapping[tuple[str, str], int],
) -> list[str]:
    refusals: list[str] = []
    for change in deletes:
        if change.kind != "application":
            continue
        count = sum(n for (app, _), n in active_keys.items() if app == change.name)
        if count:
            refusals.append(
                f"application {change.name} still has {count} active API key(s): revoke "
                f"them first (ext-proc keys list --app {change.name}), or keep the "
                "application in the file"
            )
    for app, spec in desired.applications.items():
        old_envs = set(current.applications.get(app, {}).get("environments", {}))
        for env in sorted(old_envs - set(spec.get("environments", {}))):
            count = active_keys.get((app, env), 0)
            if count:
                refusals.append(
                    f"environment {env} of application {app} still has {count} active API "
                    f"key(s): revoke them first (ext-proc keys list --app {app}), or keep "
                    "the environment in the file"
                )
    deleted_policies = {change.name for change in deletes if change.kind == "policy"}
    for app, spec in final.applications.items():
        for env, policies in _lists(spec).items():
            for policy in deleted_policies.intersection(policies):
                where = "" if env is None else f" (environment {env})"
                refusals.append(
                    f"policy {policy} is still bound to application {app}{where}; unbind it first"
                )
    return refusals


async def _active_keys(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        "SELECT a.name AS app, e.name AS env, count(*) AS n FROM api_keys k "
        "JOIN applications a ON a.id = k.application_id "
        "JOIN application_environments e ON e.id = k.environment_id "
        "WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()) "
        "GROUP BY a.name, e.name"
    )
    return {(row["app"], row["env"]): row["n"] for row in rows}


# --- apply -------------------------------------------------------------------------------


async def apply(
    pool: asyncpg.Pool, plan: Plan, redis: aioredis.Redis | None = None, prefix: str = "gw:"
) -> ApplyResult:
    """Write ``plan`` in one transaction, then publish the invalidations.

    A plan without changes writes nothing. Raises ``PlanRefused`` (its refusals, or
    what the database refused), and ``StalePlan`` when the catalog changed since the
    plan was made. A failure to publish is reported in the result, not raised: the
    database is written and replicas also poll ``config_version``.
    """
    if plan.refusals:
        raise PlanRefused(plan.refusals)
    if not plan.has_changes:
        return ApplyResult(0, 0, 0, plan.fingerprint, plan.revision, {}, published=False)
    async with pool.acquire() as conn, conn.transaction():
        # Row lock: one apply at a time, and catalog writers (whose triggers update this
        # row) wait for this transaction.
        revision = await conn.fetchval("SELECT revision FROM catalog_state FOR UPDATE")
        if revision != plan.revision:
            raise StalePlan(
                "the catalog changed since this plan was made (another apply or an admin "
                "edit); run apply again"
            )
        try:
            await _write(conn, plan)
        except (asyncpg.ForeignKeyViolationError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise PlanRefused([f"the database refused the change: {exc}"]) from exc
        revision = await conn.fetchval(
            "UPDATE catalog_state SET fingerprint = $1, applied_fingerprint = $2, "
            "applied_source = $3, applied_at = now() RETURNING revision",
            plan.fingerprint,
            plan.config.fingerprint,
            plan.config.source,
        )
        written = [
            change.name
            for change in plan.changes
            if change.kind == "policy" and change.action in ("create", "update")
        ]
        versions = {
            row["name"]: row["version"]
            for row in await conn.fetch(
                "SELECT name, version FROM policies WHERE name = ANY($1::text[])", written
            )
        }
    published, error = await _publish(plan, redis, prefix)
    return ApplyResult(
        created=plan.count("create"),
        updated=plan.count("update"),
        deleted=plan.count("delete"),
        fingerprint=plan.fingerprint,
        revision=revision,
        policy_versions=versions,
        published=published,
        publish_error=error,
    )


async def _write(conn: asyncpg.Connection, plan: Plan) -> None:
    orgs = sorted({spec["org"] for spec in plan.desired.applications.values()})
    if any(c.kind == "application" and c.action != "delete" for c in plan.changes):
        await conn.execute(
            "INSERT INTO organizations (name) SELECT unnest($1::text[]) "
            "ON CONFLICT (name) DO NOTHING",
            orgs,
        )
    for change in plan.changes:
        if change.action == "delete":
            await conn.execute(_DELETE[change.kind], change.name)
        elif change.kind == "binding":
            await _write_binding(conn, change.name, change.after)
        elif change.kind == "application":
            await _write_application(conn, change)
        else:
            section = _SECTION_OF_KIND[change.kind]
            # The columns in split_spec's order, which is the order _UPSERT takes them in.
            columns, rest = split_spec(section, change.after)
            await conn.execute(
                _UPSERT[change.kind], change.name, *columns.values(), orjson.dumps(rest).decode()
            )
    if plan.prune:
        await conn.execute(
            "DELETE FROM organizations o WHERE NOT EXISTS "
            "(SELECT 1 FROM applications a WHERE a.organization_id = o.id)"
        )


# Insert or overwrite; source becomes 'file'. Unchanged rows are never written (plan).
_UPSERT: Mapping[str, str] = {
    "provider": """
        INSERT INTO providers (name, type, base_url, config, source)
        VALUES ($1, $2, $3, $4::jsonb, 'file')
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, base_url = EXCLUDED.base_url,
            config = EXCLUDED.config, source = 'file'""",
    "model": """
        INSERT INTO models (name, provider_id, deployment, config, source)
        SELECT $1, p.id, $3, $4::jsonb, 'file' FROM providers p WHERE p.name = $2
        ON CONFLICT (name) DO UPDATE SET provider_id = EXCLUDED.provider_id,
            deployment = EXCLUDED.deployment, config = EXCLUDED.config, source = 'file'""",
    "policy": """
        INSERT INTO policies (name, type, enabled, on_error, config, source)
        VALUES ($1, $2, $3, $4, $5::jsonb, 'file')
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, enabled = EXCLUDED.enabled,
            on_error = EXCLUDED.on_error, config = EXCLUDED.config, source = 'file'""",
}
_DELETE: Mapping[str, str] = {
    "provider": "DELETE FROM providers WHERE name = $1",
    "model": "DELETE FROM models WHERE name = $1",
    "policy": "DELETE FROM policies WHERE name = $1",
    # Its environments, bindings and (inactive) keys go with it; a trigger refuses while
    # it has active keys.
    "application": "DELETE FROM applications WHERE name = $1",
}


async def _write_application(conn: asyncpg.Connection, change: Change) -> None:
    spec = change.after
    app_id = await conn.fetchval(
        """
        INSERT INTO applications (name, organization_id, description, source)
        SELECT $1, o.id, $3, 'file' FROM organizations o WHERE o.name = $2
        ON CONFLICT (name) DO UPDATE SET organization_id = EXCLUDED.organization_id,
            description = EXCLUDED.description, source = 'file'
        RETURNING id""",
        change.name,
        spec["org"],
        spec.get("description"),
    )
    environments = list(spec["environments"])
    await conn.execute(
        "INSERT INTO application_environments (application_id, name) "
        "SELECT $1, unnest($2::text[]) ON CONFLICT (application_id, name) DO NOTHING",
        app_id,
        environments,
    )
    await conn.execute(
        "DELETE FROM application_environments WHERE application_id = $1 "
        "AND NOT (name = ANY($2::text[]))",
        app_id,
        environments,
    )


async def _write_binding(conn: asyncpg.Connection, name: str, policies: list[str]) -> None:
    app, _, env = name.partition("/")
    app_id = await conn.fetchval("SELECT id FROM applications WHERE name = $1", app)
    env_id = (
        await conn.fetchval(
            "SELECT id FROM application_environments WHERE application_id = $1 AND name = $2",
            app_id,
            env,
        )
        if env
        else None
    )
    await conn.execute(
        "DELETE FROM application_policies WHERE application_id = $1 "
        "AND environment_id IS NOT DISTINCT FROM $2",
        app_id,
        env_id,
    )
    await conn.execute(
        "INSERT INTO application_policies (application_id, environment_id, policy_id, position) "
        "SELECT $1, $2, p.id, t.position - 1 "
        "FROM unnest($3::text[]) WITH ORDINALITY AS t(policy, position) "
        "JOIN policies p ON p.name = t.policy",
        app_id,
        env_id,
        policies,
    )


async def _publish(
    plan: Plan, redis: aioredis.Redis | None, prefix: str
) -> tuple[bool, str | None]:
    if redis is None:
        return False, "no Redis configured"
    org_changed = any(
        change.kind == "application"
        and change.action == "update"
        and change.before.get("org") != change.after.get("org")
        for change in plan.changes
    )
    try:
        if org_changed:  # cached keys carry their application's org
            await invalidate_shared(redis, prefix, KEY_CACHE_NAME, KEY_KIND, ALL)
        await publish(redis, prefix, CONFIG_KIND, ALL)
    except (RedisError, OSError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


# --- format_plan -------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+*-]+")


def format_plan(plan: Plan) -> str:
    """The plan as a readable diff, one line per object, then a summary line::

    + policy sixty-per-minute (rate_limit)
    ~ application support-bot: policies [a] -> [a, b]
    - model old (kept; --prune deletes)
    """
    lines: list[str] = []
    created_apps = {
        c.name for c in plan.changes if c.kind == "application" and c.action == "create"
    }
    folded: dict[str, list[str]] = {}
    for change in plan.changes:
        if change.kind == "binding" and change.name.partition("/")[0] in created_apps:
            app = change.name.partition("/")[0]
            folded.setdefault(app, []).append(_binding_text(change, folded=True))
    for change in plan.changes:
        if change.kind == "binding":
            app = change.name.partition("/")[0]
            if app not in created_apps:
                lines.append(f"~ application {app}: {_binding_text(change)}")
            continue
        if change.action == "create":
            line = f"+ {change.kind} {change.name}{_summary(change.kind, change.after)}"
            extra = folded.get(change.name) if change.kind == "application" else None
            lines.append(line + (": " + "; ".join(extra) if extra else ""))
        elif change.action == "update":
            lines.append(f"~ {change.kind} {change.name}: {'; '.join(change.details)}")
        else:
            lines.append(f"- {change.kind} {change.name}{_summary(change.kind, change.before)}")
    lines.extend(f"- {c.kind} {c.name} (kept; --prune deletes)" for c in plan.kept)
    if plan.has_changes:
        summary = (
            f"{plan.count('create')} to create, {plan.count('update')} to update, "
            f"{plan.count('delete')} to delete"
        )
        if plan.kept:
            summary += f"; {len(plan.kept)} not in the file, kept"
        lines.append(summary)
    else:
        lines.append("no changes")
    return "\n".join(lines)


def _summary(kind: Kind, spec: Spec | None) -> str:
    if not spec:
        return ""
    if kind == "provider":
        return f" ({spec.get('type')}, {spec.get('base_url')})"
    if kind == "model":
        return f" ({spec.get('provider')}/{spec.get('deployment')})"
    if kind == "policy":
        return f" ({spec.get('type')})"
    if kind == "application":
        return f" (org {spec.get('org')})"
    return ""


def _binding_text(change: Change, *, folded: bool = False) -> str:
    _, _, env = change.name.partition("/")
    field = f"environments.{env}.policies" if env else "policies"
    if folded:  # part of a new application's line
        return f"{field} {_value(change.after)}"
    return f"{field} {_value(change.before or [])} -> {_value(change.after)}"


def _diff(before: Mapping[str, Any], after: Mapping[str, Any], path: str = "") -> tuple[str, ...]:
    details: list[str] = []
    for key in _keys(before, after):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        name = f"{path}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            details.extend(_diff(old, new, f"{name}."))
        else:
            details.append(f"{name} {_value(old)} -> {_value(new)}")
    return tuple(details)


def _keys(*mappings: Mapping[str, Any]) -> Iterable[str]:
    seen: dict[str, None] = {}
    for mapping in mappings:
        seen.update(dict.fromkeys(mapping))
    return seen


def _value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) else orjson.dumps(value).decode()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- the CLI ----------------------------------------------------------------------------


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, help="the gateway.yaml to apply")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also delete objects in the database that the file does not declare",
    )


def run_apply(ns: argparse.Namespace, settings: Settings) -> int:
    """``ext-proc apply``. Exit codes: 0 applied (or nothing to do, or a dry run),
    1 refused (nothing written), 2 invalid file, database unreachable or not migrated."""
    path = Path(ns.file)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        count = len(exc.issues)
        print(
            f"{path}: rejected, {count} problem{'s' if count != 1 else ''}; nothing was written",
            file=sys.stderr,
        )
        return EXIT_INVALID
    assert settings.database_url, "the caller checks DATABASE_URL"
    try:
        return asyncio.run(_run(ns, settings, config))
    except DATABASE_ERRORS as exc:
        message = database_error_message(settings.database_url, exc)
        print(f"ext-proc apply: {message}", file=sys.stderr)
        return EXIT_INVALID


async def _run(ns: argparse.Namespace, settings: Settings, config: GatewayConfig) -> int:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    redis = create_redis(settings.redis_url) if settings.redis_url and not ns.dry_run else None
    try:
        try:
            the_plan = await plan(pool, config, prune=ns.prune)
        except CatalogError as exc:  # CatalogNotMigrated too
            print(f"ext-proc apply: {exc}", file=sys.stderr)
            return EXIT_INVALID
        print(format_plan(the_plan))
        for note in the_plan.notes:
            print(f"note: {note}", file=sys.stderr)
        if the_plan.refusals:
            for refusal in the_plan.refusals:
                print(f"refused: {refusal}", file=sys.stderr)
            print("nothing was written", file=sys.stderr)
            return EXIT_REFUSED
        if ns.dry_run:
            print("dry run: nothing was written")
            return EXIT_OK
        if not the_plan.has_changes:
            return EXIT_OK
        try:
            result = await apply(pool, the_plan, redis, settings.redis_prefix)
        except (PlanRefused, StalePlan) as exc:
            print(f"refused: {exc}\nnothing was written", file=sys.stderr)
            return EXIT_REFUSED
        print(
            f"applied {config.source}: {result.created} created, {result.updated} updated, "
            f"{result.deleted} deleted (fingerprint {result.fingerprint[:12]})"
        )
        if not result.published:
            print(
                f"note: replicas were not notified ({result.publish_error}); they pick the "
                "change up when they next poll the catalog version",
                file=sys.stderr,
            )
        return EXIT_OK
    finally:
        if redis is not None:
            await redis.aclose()
        await pool.close()
