"""``ext-proc apply -f gateway.yaml``: make the Postgres catalog match the file.

Precedence — which wins when:

* Postgres is the runtime truth. Every replica serves what the catalog tables hold
  (``ext_proc.stores.catalog.load_config``), never the file directly.
* Every object says who manages it (``managed_by``): ``file`` once ``apply`` wrote it,
  ``api`` once the admin API created or edited it.
* ``apply`` makes the database match the file for every file-managed object the file
  declares (organizations, providers, models, policies, applications with their
  environments and policy bindings), and creates what the file declares that does not
  exist yet.
* An object the file declares that the admin API manages (created or edited there since)
  is not overwritten: ``apply`` lists it as skipped, with what differs; ``--force``
  overwrites it (and the file manages it again).
* Objects the file does not declare are kept and listed: file-managed ones (dropped from
  the file) are deleted with ``--prune``, API-managed ones only with ``--prune-api``.
* ``apply`` never deletes an application, or an environment, that still has active API
  keys (revoke them first), nor a policy that stays bound to an application, nor an
  organization that applications or admin tokens still belong to.
* Every object ``apply`` writes is recorded in the audit log (actor ``ext-proc apply``).

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
    MANAGED_BY_API,
    MANAGED_BY_FILE,
    POSTGRES_SOURCE,
    SECTIONS,
    CatalogError,
    CatalogSpecs,
    Spec,
    delete_object,
    read_snapshot,
    specs_of,
    write_binding,
    write_object,
)
from ext_proc.stores.invalidation import ALL, publish
from ext_proc.stores.postgres import DATABASE_ERRORS, create_pool, database_error_message
from ext_proc.stores.redis import create_redis

Kind = Literal["organization", "provider", "model", "policy", "application", "binding"]
Action = Literal["create", "update", "delete", "keep", "skip"]
APPLY_ACTOR = "ext-proc apply"  # the audit log's actor for what apply writes


EXIT_OK = 0
EXIT_REFUSED = 1  # the plan cannot be applied as it is (nothing written)
EXIT_INVALID = 2  # invalid file, database unreachable or not migrated (nothing written)

_KIND_OF_SECTION: Mapping[str, Kind] = {
    "organizations": "organization",
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
    managed_by_api: bool = False  # a kept or skipped object the admin API manages


@dataclass(frozen=True, slots=True)
class Plan:
    config: GatewayConfig  # the file
    prune: bool
    changes: tuple[Change, ...]  # creates and updates, then deletes, in write order
    kept: tuple[Change, ...]  # in the database but not in the file, not pruned
    skipped: tuple[Change, ...]  # declared, but managed by the admin API (without --force)
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


async def plan(
    pool: asyncpg.Pool,
    config: GatewayConfig,
    *,
    prune: bool,
    force: bool = False,
    prune_api: bool = False,
) -> Plan:
    """What ``apply`` would do to make the catalog match ``config``. Writes nothing.

    ``force``: overwrite declared objects the admin API manages (else they are skipped);
    ``prune``: delete file-managed objects the file does not declare; ``prune_api``:
    delete API-managed ones it does not declare too.

    Raises ``CatalogNotMigrated`` before ``ext-proc migrate``, and ``CatalogError`` if
    the config cannot be stored faithfully (a bug: reported, never written).
    """
    desired = specs_of(config)
    async with pool.acquire() as conn:
        snapshot = await read_snapshot(conn)
        active_keys = await _active_keys(conn)
        org_tokens = await _org_tokens(conn)
    notes: list[str] = []
    current = _normalized(snapshot.specs, notes)
    versions = snapshot.policy_versions

    changes: list[Change] = []
    deletes: list[Change] = []
    kept: list[Change] = []
    skipped: list[Change] = []
    skipped_apps: set[str] = set()
    for section in SECTIONS:
        kind = _KIND_OF_SECTION[section]
        now, want = current.section(section), desired.section(section)
        for name, spec in want.items():
            by_api = snapshot.managed_by.get((section, name)) == MANAGED_BY_API
            if name not in now:
                changes.append(Change(kind, name, "create", None, spec))
                continue
            if now[name] == spec:
                continue
            details = _diff(now[name], spec)
            if by_api and not force:
                skipped.append(Change(kind, name, "skip", now[name], spec, details, True))
                if kind == "application":
                    skipped_apps.add(name)
                continue
            if kind == "application":
                before, after = _app_attributes(now[name]), _app_attributes(spec)
                if before != after:
                    details = _diff(before, after)
                    changes.append(Change(kind, name, "update", now[name], spec, details))
                continue
            if kind == "policy":
                version = versions.get(name, 1)
                details += (f"version {version} -> {version + 1}",)
            changes.append(Change(kind, name, "update", now[name], spec, details))
        for name, spec in now.items():
            if name in want:
                continue
            by_api = snapshot.managed_by.get((section, name)) == MANAGED_BY_API
            if kind == "organization" and not by_api:
                continue  # implied by applications: pruned with them (see _write)
            if prune_api if by_api else prune:
                deletes.append(Change(kind, name, "delete", spec, None, (), by_api))
            else:
                kept.append(Change(kind, name, "keep", spec, None, (), by_api))
    changes.extend(
        change
        for change in _binding_changes(current.applications, desired.applications)
        if change.name.partition("/")[0] not in skipped_apps
    )

    final = _final(current, desired, deletes, skipped)
    # Organizations still named by an application are never deleted, nor listed as
    # kept: the file names them (or an application kept in the database does).
    named = {spec.get("org") for spec in final.applications.values()}
    deletes = [c for c in deletes if not (c.kind == "organization" and c.name in named)]
    kept = [c for c in kept if not (c.kind == "organization" and c.name in named)]
    final = _final(current, desired, deletes, skipped)
    # Deletes last, dependents first: applications, policies, models, providers, orgs.
    order = {"application": 0, "policy": 1, "model": 2, "provider": 3, "organization": 4}
    changes.extend(sorted(deletes, key=lambda change: order[change.kind]))

    refusals = _refusals(current, desired, final, deletes, active_keys)
    for change in deletes:
        if change.kind == "organization" and org_tokens.get(change.name):
            refusals.append(
                f"organization {change.name} still has {org_tokens[change.name]} admin "
                "token(s): revoke them first (POST /v1/tokens/NAME/revoke), or keep it"
            )
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
        skipped=tuple(skipped),
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


def _final(
    current: CatalogSpecs,
    desired: CatalogSpecs,
    deletes: Sequence[Change],
    skipped: Sequence[Change],
) -> CatalogSpecs:
    """The catalog as it will be after the apply."""
    gone = {(c.kind, c.name) for c in deletes}
    held = {(c.kind, c.name) for c in skipped}
    sections: dict[str, dict[str, Spec]] = {}
    for section in SECTIONS:
        kind = _KIND_OF_SECTION[section]
        merged = {
            name: spec
            for name, spec in current.section(section).items()
            if (kind, name) not in gone
        }
        merged.update(
            (name, spec)
            for name, spec in desired.section(section).items()
            if (kind, name) not in held
        )
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


async def _org_tokens(conn: asyncpg.Connection) -> dict[str, int]:
    """Organizations -> their usable admin tokens (which keep them from being deleted)."""
    rows = await conn.fetch(
        "SELECT o.name, count(*) AS n FROM admin_tokens t "
        "JOIN organizations o ON o.id = t.organization_id "
        "WHERE t.revoked_at IS NULL GROUP BY o.name"
    )
    return {row["name"]: row["n"] for row in rows}


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
    for change in plan.changes:
        if change.action == "delete":
            await delete_object(conn, _SECTION_OF_KIND[change.kind], change.name)
        elif change.kind == "binding":
            app, _, env = change.name.partition("/")
            await write_binding(conn, app, env or None, change.after)
        else:
            # An application's policy lists are binding changes of their own.
            await write_object(
                conn, _SECTION_OF_KIND[change.kind], change.name, change.after, MANAGED_BY_FILE
            )
    if plan.prune:
        # Organizations the file only implied (named by applications) go with their last
        # application; declared or API-managed ones are objects of their own (the plan).
        await conn.execute(
            "DELETE FROM organizations o WHERE o.managed_by = 'file' "
            "AND NOT (o.name = ANY($1::text[])) "
            "AND NOT EXISTS (SELECT 1 FROM applications a WHERE a.organization_id = o.id) "
            "AND NOT EXISTS (SELECT 1 FROM admin_tokens t WHERE t.organization_id = o.id)",
            list(plan.desired.organizations),
        )
    await conn.executemany(
        "INSERT INTO audit_log (actor, action, kind, name, org, before, after) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)",
        [
            (
                APPLY_ACTOR,
                change.action,
                change.kind,
                change.name,
                _org_of(change),
                _json_or_none(change.before),
                _json_or_none(change.after),
            )
            for change in plan.changes
        ],
    )


def _org_of(change: Change) -> str | None:
    if change.kind == "organization":
        return change.name
    if change.kind == "application":
        spec = change.after or change.before or {}
        org = spec.get("org")
        return org if isinstance(org, str) else None
    return None


def _json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


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
    ! policy tokens: managed by the admin API, not overwritten (--force): tokens 5 -> 9
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
    lines.extend(
        f"! {c.kind} {c.name}: managed by the admin API, not overwritten (--force "
        f"overwrites it): {'; '.join(c.details)}"
        for c in plan.skipped
    )
    lines.extend(
        f"- {c.kind} {c.name} (managed by the admin API; kept; --prune-api deletes)"
        if c.managed_by_api
        else f"- {c.kind} {c.name} (kept; --prune deletes)"
        for c in plan.kept
    )
    if plan.has_changes:
        summary = (
            f"{plan.count('create')} to create, {plan.count('update')} to update, "
            f"{plan.count('delete')} to delete"
        )
        if plan.skipped:
            summary += f"; {len(plan.skipped)} skipped (managed by the admin API)"
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
        help="also delete file-managed objects in the database that the file does not declare",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite declared objects the admin API manages (else they are skipped)",
    )
    parser.add_argument(
        "--prune-api",
        action="store_true",
        help="also delete objects the admin API manages that the file does not declare",
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
            the_plan = await plan(
                pool,
                config,
                prune=ns.prune,
                force=getattr(ns, "force", False),
                prune_api=getattr(ns, "prune_api", False),
            )
        except CatalogError as exc:  # CatalogNotMigrated too
            print(f"ext-proc apply: {exc}", file=sys.stderr)
            return EXIT_INVALID
        print(format_plan(the_plan))
        for note in the_plan.notes:
            print(f"note: {note}", file=sys.stderr)
        if the_plan.skipped:
            print(
                f"note: {len(the_plan.skipped)} object(s) the file declares are managed by the "
                "admin API and were not overwritten; --force overwrites them",
                file=sys.stderr,
            )
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
