"""The runtime catalog in Postgres: providers, models, policies, applications, bindings.

Postgres is the runtime truth (DESIGN.md "Configuration"): ``ext-proc apply`` writes a
gateway.yaml into these tables (``ext_proc.apply``), the admin API edits them, and every
replica builds its ``GatewayConfig`` from them with ``load_config(pool)``.

How objects are stored: each one keeps its fields the way gateway.yaml writes them — a
few relational columns (names, foreign keys, a policy's type/enabled/on_error) and the
rest in a ``config`` jsonb object (``{"requests": 60, "window": "1m"}``). Loading puts
the rows back together into one gateway document and validates it with the declared
schema the file and the admin API use (``ext_proc.config.document.build_config``, issues
named against "postgres"), so the catalog gets the same checks, CEL compilation and
fingerprint as the file: a config applied from a file and loaded back has the file's
fingerprint (``specs_of`` checks that round trip before anything is written).

Each object also says who manages it (``managed_by``: ``file`` when ``apply`` wrote it,
``api`` when the admin API created or last edited it); ``apply`` reads it to decide what
it may overwrite (``ext_proc.apply``).

``specs_of(config)`` is the other direction: a validated ``GatewayConfig`` as those
per-object field mappings ("specs"), with every default written out, so two specs are
equal exactly when the objects mean the same thing.

Application bindings: ``policies`` of an application is stored with ``environment_id``
NULL (the app's own list, every environment); an environment's ``policies`` are its
additions, applied after the app's (see schema/0002_catalog.sql).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from ext_proc.config.document import build_config
from ext_proc.config.errors import ConfigError
from ext_proc.config.model import (
    DEFAULT_ENVIRONMENT,
    Application,
    GatewayConfig,
    Model,
    Organization,
    Policy,
    Provider,
    Target,
)
from ext_proc.routing.providers import PROVIDER_TYPES
from ext_proc.usage.pricing import Price, json_number

# What a config loaded from the catalog names as its source (and its issues' file).
POSTGRES_SOURCE = "postgres"
# The invalidation kind of the catalog: "config:*" tells every ext_proc to reload it.
CONFIG_KIND = "config"
# In the order objects are created (a section's objects refer to earlier sections').
SECTIONS: tuple[str, ...] = ("organizations", "providers", "models", "policies", "applications")
# What makes a catalog a config: organizations alone do not.
_CONFIG_SECTIONS: tuple[str, ...] = ("providers", "models", "policies", "applications")
# Who manages an object (the `managed_by` column).
MANAGED_BY_FILE = "file"
MANAGED_BY_API = "api"

# One object's fields as gateway.yaml would write them (JSON values).
Spec = dict[str, Any]


class CatalogError(RuntimeError):
    """The catalog cannot be read or written as asked; the message says why."""


class CatalogNotMigrated(CatalogError):
    """The database has no catalog tables yet."""

    def __init__(self) -> None:
        super().__init__(
            "the database has no catalog tables (schema/0002_catalog.sql); "
            "run `ext-proc migrate` first"
        )


@dataclass(frozen=True, slots=True)
class CatalogSpecs:
    """Every object of a catalog as its spec, by section ("providers", ...) and name."""

    providers: Mapping[str, Spec]
    models: Mapping[str, Spec]
    policies: Mapping[str, Spec]
    applications: Mapping[str, Spec]
    organizations: Mapping[str, Spec] = dataclasses.field(default_factory=dict)

    def section(self, name: str) -> Mapping[str, Spec]:
        value: Mapping[str, Spec] = getattr(self, name)
        return value

    @property
    def is_empty(self) -> bool:
        """Nothing that makes a config (organizations alone do not)."""
        return not any(self.section(name) for name in _CONFIG_SECTIONS)

    def document(self) -> dict[str, Any]:
        return {name: dict(self.section(name)) for name in SECTIONS if self.section(name)}

    def text(self) -> str:
        return orjson.dumps(self.document(), option=orjson.OPT_INDENT_2).decode()

    def parse(self, filename: str = POSTGRES_SOURCE) -> GatewayConfig:
        """The validated config (raises ``ConfigError`` naming ``filename``)."""
        return build_config(self.document(), filename, require_providers=False)

    def replace(self, section: str, objects: Mapping[str, Spec]) -> CatalogSpecs:
        """A copy with ``section`` holding ``objects``."""
        return dataclasses.replace(self, **{section: dict(objects)})


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """The catalog as stored, read in one consistent snapshot."""

    revision: int
    specs: CatalogSpecs
    policy_versions: Mapping[str, int]
    # (section, name) -> who manages the object: MANAGED_BY_FILE or MANAGED_BY_API.
    managed_by: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppliedState:
    revision: int  # +1 for every statement that changed the catalog
    fingerprint: str | None  # of the catalog now; None until (re)computed
    changed_at: datetime | None
    applied_fingerprint: str | None  # of the last file applied
    applied_source: str | None
    applied_at: datetime | None


# --- GatewayConfig -> specs -----------------------------------------------------------


def specs_of(config: GatewayConfig) -> CatalogSpecs:
    """``config`` as per-object specs; raises ``CatalogError`` if they would not load
    back to the same config (the fingerprint is compared), so nothing unfaithful is
    ever written."""
    specs = CatalogSpecs(
        providers={name: provider_spec(p) for name, p in config.providers.items()},
        models={name: model_spec(m) for name, m in config.models.items()},
        policies={name: policy_spec(p) for name, p in config.policies.items()},
        applications={name: application_spec(a) for name, a in config.applications.items()},
        organizations={
            name: organization_spec(o) for name, o in config.organizations.items() if not o.implied
        },
    )
    try:
        loaded = specs.parse(f"{config.source} (as stored)")
    except ConfigError as exc:
        raise CatalogError(
            "the config cannot be stored faithfully: as stored it would not load "
            f"(a bug in ext_proc.stores.catalog: please report it with the file):\n{exc}"
        ) from exc
    if loaded.fingerprint != config.fingerprint:
        expected, got = config.canonical(), loaded.canonical()
        differ = [
            f"{section}.{name}"
            for section in SECTIONS
            for name, item in expected[section].items()
            if got[section].get(name) != item
        ]
        raise CatalogError(
            "the config cannot be stored faithfully: "
            f"{', '.join(differ) or 'the document'} would load back differently "
            "(a bug in ext_proc.stores.catalog: please report it with the file)"
        )
    return specs


def provider_spec(provider: Provider) -> Spec:
    spec: Spec = {"type": provider.type, "base_url": provider.base_url}
    optional = {"api_key_env": provider.api_key_env, "api_key_file": provider.api_key_file}
    spec.update({key: value for key, value in optional.items() if value is not None})
    # The type's own fields, as gateway.yaml writes them (its module parsed them).
    spec.update({key: value for key, value in provider.options.items() if value is not None})
    if provider.headers:
        spec["headers"] = dict(provider.headers)
    spec["timeout"] = duration_text(provider.timeout)
    spec["connect_timeout"] = duration_text(provider.connect_timeout)
    retries: Spec = {"attempts": provider.retries.attempts, "on": list(provider.retries.on)}
    if "retriable-status-codes" in provider.retries.on:  # the loader refuses them otherwise
        retries["retriable_status_codes"] = list(provider.retries.retriable_status_codes)
    spec["retries"] = retries
    if PROVIDER_TYPES[provider.type].stream_usage_injectable:
        spec["inject_stream_usage"] = provider.inject_stream_usage
    if provider.pass_headers:
        spec["pass_headers"] = list(provider.pass_headers)
    return spec


def model_spec(model: Model) -> Spec:
    spec: Spec = {"provider": model.provider, "deployment": model.deployment}
    if model.encoding is not None:
        spec["encoding"] = model.encoding
    if model.aliases:
        spec["aliases"] = list(model.aliases)
    if model.price is not None:
        spec["price"] = price_spec(model.price)
    if model.fallbacks is not None:
        spec["fallbacks"] = [target_spec(target) for target in model.fallbacks]
    if model.weight is not None:
        spec["weight"] = model.weight
    if model.attempt_timeout is not None:
        spec["attempt_timeout"] = model.attempt_timeout
    return spec


def target_spec(target: Target) -> Spec:
    """One of a model's ``fallbacks:`` (every field explicit)."""
    spec: Spec = {
        "provider": target.provider,
        "deployment": target.deployment,
        "weight": target.weight,
        "priority": target.priority,
    }
    if target.price is not None:
        spec["price"] = price_spec(target.price)
    return spec


def price_spec(price: Price) -> Spec:
    """A model's ``price:`` as numbers (stored in the model's ``config`` jsonb)."""
    spec: Spec = {"input": json_number(price.input), "output": json_number(price.output)}
    if price.cached_input is not None:
        spec["cached_input"] = json_number(price.cached_input)
    if price.cache_write is not None:
        spec["cache_write"] = json_number(price.cache_write)
    return spec


def policy_spec(policy: Policy) -> Spec:
    """``type``, the type's parameters as YAML fields, then ``enabled`` and ``on_error``.

    Parameters are read generically from the params dataclass (a field per YAML key,
    compared fields only: compiled programs and derived lookups are rebuilt on load).
    Floats are durations: a ``ParamReader`` has no other way to produce one (amounts of
    money are ``Decimal``).
    """
    spec: Spec = {"type": policy.type}
    for field in dataclasses.fields(policy.params):
        value = getattr(policy.params, field.name)
        if field.compare and value is not None:
            spec[field.name] = _param_value(value)
    spec["enabled"] = policy.enabled
    spec["on_error"] = policy.on_error
    return spec


def application_spec(application: Application) -> Spec:
    spec: Spec = {"org": application.org}
    if application.description is not None:
        spec["description"] = application.description
    spec["policies"] = list(application.policies)
    spec["environments"] = {
        name: {"policies": list(environment.policies)}
        for name, environment in application.environments.items()
    }
    return spec


def organization_spec(organization: Organization) -> Spec:
    spec: Spec = {}
    if organization.description is not None:
        spec["description"] = organization.description
    return spec


def duration_text(seconds: float) -> str | float:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"1d"`` for whole seconds (the largest exact
    unit), else the number of seconds; both load back to exactly ``seconds``."""
    if not seconds.is_integer():
        return seconds
    whole = int(seconds)
    if whole == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _param_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return json_number(value)
    if isinstance(value, float):
        return duration_text(value)
    if isinstance(value, tuple | list):
        return [_param_value(item) for item in value]
    if isinstance(value, frozenset | set):
        return sorted(_param_value(item) for item in value)
    if isinstance(value, Mapping):
        return {str(key): _param_value(item) for key, item in value.items()}
    return value


# --- specs <-> rows ---------------------------------------------------------------


def split_spec(section: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any], Spec]:
    """(relational columns, the rest for the ``config`` jsonb) of one object's spec."""
    columns = _COLUMNS[section]
    return (
        {key: spec.get(key) for key in columns},
        {key: value for key, value in spec.items() if key not in columns},
    )


_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "organizations": ("description",),
    "providers": ("type", "base_url"),
    "models": ("provider", "deployment"),
    "policies": ("type", "enabled", "on_error"),
    "applications": ("org", "description", "policies", "environments"),
}


# --- writing objects (apply and the admin API) -----------------------------------------

# Insert or overwrite one object's row; $last is who manages it from now on.
_UPSERT: Mapping[str, str] = {
    "organizations": """
        INSERT INTO organizations (name, description, managed_by) VALUES ($1, $2, $3)
        ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description,
            managed_by = EXCLUDED.managed_by""",
    "providers": """
        INSERT INTO providers (name, type, base_url, config, managed_by)
        VALUES ($1, $2, $3, $4::jsonb, $5)
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, base_url = EXCLUDED.base_url,
            config = EXCLUDED.config, managed_by = EXCLUDED.managed_by""",
    "models": """
        INSERT INTO models (name, provider_id, deployment, config, managed_by)
        SELECT $1, p.id, $3, $4::jsonb, $5 FROM providers p WHERE p.name = $2
        ON CONFLICT (name) DO UPDATE SET provider_id = EXCLUDED.provider_id,
            deployment = EXCLUDED.deployment, config = EXCLUDED.config,
            managed_by = EXCLUDED.managed_by""",
    "policies": """
        INSERT INTO policies (name, type, enabled, on_error, config, managed_by)
        VALUES ($1, $2, $3, $4, $5::jsonb, $6)
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, enabled = EXCLUDED.enabled,
            on_error = EXCLUDED.on_error, config = EXCLUDED.config,
            managed_by = EXCLUDED.managed_by""",
}
_DELETE: Mapping[str, str] = {
    "organizations": "DELETE FROM organizations WHERE name = $1",
    "providers": "DELETE FROM providers WHERE name = $1",
    "models": "DELETE FROM models WHERE name = $1",
    "policies": "DELETE FROM policies WHERE name = $1",
    # Its environments, bindings and (inactive) keys go with it; a trigger refuses while
    # it has active keys.
    "applications": "DELETE FROM applications WHERE name = $1",
}


async def write_object(
    conn: asyncpg.Connection, section: str, name: str, spec: Spec, managed_by: str
) -> None:
    """Insert or overwrite one object from its (validated, normalized) spec. An
    application's row and environments are written here, its policy lists with
    ``write_binding``; the organization it names must exist (it is created if not)."""
    if section == "applications":
        await _write_application(conn, name, spec, managed_by)
        return
    if section == "organizations":
        await conn.execute(_UPSERT[section], name, spec.get("description"), managed_by)
        return
    # The columns in split_spec's order, which is the order _UPSERT takes them in.
    columns, rest = split_spec(section, spec)
    await conn.execute(
        _UPSERT[section], name, *columns.values(), orjson.dumps(rest).decode(), managed_by
    )


async def delete_object(conn: asyncpg.Connection, section: str, name: str) -> None:
    await conn.execute(_DELETE[section], name)


async def _write_application(
    conn: asyncpg.Connection, name: str, spec: Spec, managed_by: str
) -> None:
    await conn.execute(
        "INSERT INTO organizations (name, managed_by) VALUES ($1, $2) "
        "ON CONFLICT (name) DO NOTHING",
        spec["org"],
        managed_by,
    )
    app_id = await conn.fetchval(
        """
        INSERT INTO applications (name, organization_id, description, managed_by)
        SELECT $1, o.id, $3, $4 FROM organizations o WHERE o.name = $2
        ON CONFLICT (name) DO UPDATE SET organization_id = EXCLUDED.organization_id,
            description = EXCLUDED.description, managed_by = EXCLUDED.managed_by
        RETURNING id""",
        name,
        spec["org"],
        spec.get("description"),
        managed_by,
    )
    environments = list(spec.get("environments") or {DEFAULT_ENVIRONMENT: {}})
    await conn.execute(
        "INSERT INTO application_environments (application_id, name) "
        "SELECT $1, unnest($2::text[]) ON CONFLICT (application_id, name) DO NOTHING",
        app_id,
        environments,
    )
    # A trigger refuses to drop an environment that still has active keys.
    await conn.execute(
        "DELETE FROM application_environments WHERE application_id = $1 "
        "AND NOT (name = ANY($2::text[])) AND name <> $3",
        app_id,
        environments,
        DEFAULT_ENVIRONMENT,
    )


async def write_binding(
    conn: asyncpg.Connection, app: str, environment: str | None, policies: list[str]
) -> None:
    """An application's own policy list (``environment`` None) or an environment's."""
    app_id = await conn.fetchval("SELECT id FROM applications WHERE name = $1", app)
    env_id = (
        await conn.fetchval(
            "SELECT id FROM application_environments WHERE application_id = $1 AND name = $2",
            app_id,
            environment,
        )
        if environment
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


async def write_bindings(conn: asyncpg.Connection, app: str, spec: Spec) -> None:
    """Every policy list of an application: its own and each environment's."""
    await write_binding(conn, app, None, list(spec.get("policies") or []))
    for env, env_spec in (spec.get("environments") or {}).items():
        await write_binding(conn, app, env, list((env_spec or {}).get("policies") or []))


async def is_migrated(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('catalog_state') IS NOT NULL"))


async def read_snapshot(conn: asyncpg.Connection) -> CatalogSnapshot:
    """Every catalog row as specs, read in one repeatable-read snapshot."""
    if not await is_migrated(conn):
        raise CatalogNotMigrated()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await read_in_transaction(conn)


async def read_in_transaction(conn: asyncpg.Connection) -> CatalogSnapshot:
    """Every catalog row as specs, read on ``conn`` inside the caller's transaction."""
    revision = await conn.fetchval("SELECT revision FROM catalog_state")
    managed_by: dict[tuple[str, str], str] = {}

    organizations: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT name, description, managed_by FROM organizations ORDER BY name"
    ):
        organizations[row["name"]] = (
            {"description": row["description"]} if row["description"] is not None else {}
        )
        managed_by["organizations", row["name"]] = row["managed_by"]

    providers: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT name, type, base_url, config::text AS config, managed_by FROM providers "
        "ORDER BY name"
    ):
        providers[row["name"]] = {
            "type": row["type"],
            "base_url": row["base_url"],
            **orjson.loads(row["config"]),
        }
        managed_by["providers", row["name"]] = row["managed_by"]

    models: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT m.name, p.name AS provider, m.deployment, m.config::text AS config, "
        "m.managed_by FROM models m JOIN providers p ON p.id = m.provider_id ORDER BY m.name"
    ):
        models[row["name"]] = {
            "provider": row["provider"],
            "deployment": row["deployment"],
            **orjson.loads(row["config"]),
        }
        managed_by["models", row["name"]] = row["managed_by"]

    policies: dict[str, Spec] = {}
    versions: dict[str, int] = {}
    for row in await conn.fetch(
        "SELECT name, type, config::text AS config, enabled, on_error, version, managed_by "
        "FROM policies ORDER BY name"
    ):
        policies[row["name"]] = {
            "type": row["type"],
            **orjson.loads(row["config"]),
            "enabled": row["enabled"],
            "on_error": row["on_error"],
        }
        versions[row["name"]] = row["version"]
        managed_by["policies", row["name"]] = row["managed_by"]

    applications: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT a.name, o.name AS org, a.description, a.managed_by FROM applications a "
        "JOIN organizations o ON o.id = a.organization_id ORDER BY a.name"
    ):
        spec: Spec = {"org": row["org"]}
        if row["description"] is not None:
            spec["description"] = row["description"]
        spec["policies"] = []
        spec["environments"] = {}
        applications[row["name"]] = spec
        managed_by["applications", row["name"]] = row["managed_by"]
    for row in await conn.fetch(
        "SELECT a.name AS app, e.name AS env FROM application_environments e "
        "JOIN applications a ON a.id = e.application_id "
        "ORDER BY a.name, e.name <> $1, e.name",
        DEFAULT_ENVIRONMENT,
    ):
        applications[row["app"]]["environments"][row["env"]] = {"policies": []}
    for row in await conn.fetch(
        "SELECT a.name AS app, e.name AS env, p.name AS policy "
        "FROM application_policies b "
        "JOIN applications a ON a.id = b.application_id "
        "JOIN policies p ON p.id = b.policy_id "
        "LEFT JOIN application_environments e ON e.id = b.environment_id "
        "ORDER BY a.name, e.name NULLS FIRST, b.position"
    ):
        app = applications[row["app"]]
        target = app if row["env"] is None else app["environments"][row["env"]]
        target["policies"].append(row["policy"])

    return CatalogSnapshot(
        revision=revision,
        specs=CatalogSpecs(
            providers=providers,
            models=models,
            policies=policies,
            applications=applications,
            organizations=organizations,
        ),
        policy_versions=versions,
        managed_by=managed_by,
    )


# --- what replicas call -----------------------------------------------------------


async def load_config(pool: asyncpg.Pool) -> GatewayConfig | None:
    """The config the catalog holds now (``source == "postgres"``), or None when it is
    empty (nothing applied or created yet).

    Raises ``CatalogNotMigrated`` before ``ext-proc migrate``, and ``ConfigError`` (file
    "postgres", paths naming the objects) if edits left the catalog inconsistent.
    """
    async with pool.acquire() as conn:
        snapshot = await read_snapshot(conn)
    if snapshot.specs.is_empty:
        return None
    return snapshot.specs.parse()


async def config_version(pool: asyncpg.Pool) -> str:
    """The fingerprint of the catalog now ("" when empty): equal to the fingerprint of
    the file last applied while nothing else changed it. One row read while the catalog
    is unchanged; after a change the first caller loads and fingerprints it once and
    stores the result for everyone.

    Raises like ``load_config`` when the catalog is not migrated or does not validate.
    """
    row = await pool.fetchrow("SELECT revision, fingerprint FROM catalog_state")
    if row is None:
        raise CatalogNotMigrated()
    if row["fingerprint"] is not None:
        return str(row["fingerprint"])
    async with pool.acquire() as conn:
        snapshot = await read_snapshot(conn)
    fingerprint = "" if snapshot.specs.is_empty else snapshot.specs.parse().fingerprint
    # Only if nothing changed since the snapshot; else the next caller computes it.
    await pool.execute(
        "UPDATE catalog_state SET fingerprint = $1 WHERE revision = $2 AND fingerprint IS NULL",
        fingerprint,
        snapshot.revision,
    )
    return fingerprint


async def applied_state(pool: asyncpg.Pool) -> AppliedState:
    """The catalog's revision and what was last applied (for status pages and tests)."""
    if not await is_migrated(pool):
        raise CatalogNotMigrated()
    row = await pool.fetchrow("SELECT * FROM catalog_state")
    assert row is not None, "0002_catalog.sql inserts the catalog_state row"
    return AppliedState(
        revision=row["revision"],
        fingerprint=row["fingerprint"],
        changed_at=row["changed_at"],
        applied_fingerprint=row["applied_fingerprint"],
        applied_source=row["applied_source"],
        applied_at=row["applied_at"],
    )
