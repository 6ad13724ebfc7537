"""The runtime catalog in Postgres: providers, models, policies, applications, bindings.

Postgres is the runtime truth (DESIGN.md "Configuration"): ``ext-proc apply`` writes a
gateway.yaml into these tables (``ext_proc.apply``), the admin API edits them, and every
replica builds its ``GatewayConfig`` from them with ``load_config(pool)``.

How objects are stored: each one keeps its fields the way gateway.yaml writes them — a
few relational columns (names, foreign keys, a policy's type/enabled/on_error) and the
rest in a ``config`` jsonb object (``{"requests": 60, "window": "1m"}``). Loading puts
the rows back together into one gateway document (JSON, which is YAML) and validates it
with the file's own loader (``parse_config(text, filename="postgres")``), so the catalog
gets the same checks, CEL compilation and fingerprint as the file: a config applied from
a file and loaded back has the file's fingerprint (``specs_of`` checks that round trip
before anything is written).

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

from ext_proc.config.errors import ConfigError
from ext_proc.config.loader import parse_config
from ext_proc.config.model import (
    DEFAULT_ENVIRONMENT,
    Application,
    GatewayConfig,
    Model,
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
SECTIONS: tuple[str, ...] = ("providers", "models", "policies", "applications")

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

    def section(self, name: str) -> Mapping[str, Spec]:
        value: Mapping[str, Spec] = getattr(self, name)
        return value

    @property
    def is_empty(self) -> bool:
        return not any(self.section(name) for name in SECTIONS)

    def document(self) -> dict[str, Any]:
        return {name: dict(self.section(name)) for name in SECTIONS if self.section(name)}

    def text(self) -> str:
        # Indented so that issues found when loading point at distinct lines.
        return orjson.dumps(self.document(), option=orjson.OPT_INDENT_2).decode()

    def parse(self, filename: str = POSTGRES_SOURCE) -> GatewayConfig:
        """The validated config (raises ``ConfigError`` naming ``filename``)."""
        return parse_config(self.text(), filename)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """The catalog as stored, read in one consistent snapshot."""

    revision: int
    specs: CatalogSpecs
    policy_versions: Mapping[str, int]


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
    "providers": ("type", "base_url"),
    "models": ("provider", "deployment"),
    "policies": ("type", "enabled", "on_error"),
    "applications": ("org", "description", "policies", "environments"),
}


async def is_migrated(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('catalog_state') IS NOT NULL"))


async def read_snapshot(conn: asyncpg.Connection) -> CatalogSnapshot:
    """Every catalog row as specs, read in one repeatable-read snapshot."""
    if not await is_migrated(conn):
        raise CatalogNotMigrated()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _read(conn)


async def _read(conn: asyncpg.Connection) -> CatalogSnapshot:
    revision = await conn.fetchval("SELECT revision FROM catalog_state")

    providers: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT name, type, base_url, config::text AS config FROM providers ORDER BY name"
    ):
        providers[row["name"]] = {
            "type": row["type"],
            "base_url": row["base_url"],
            **orjson.loads(row["config"]),
        }

    models: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT m.name, p.name AS provider, m.deployment, m.config::text AS config "
        "FROM models m JOIN providers p ON p.id = m.provider_id ORDER BY m.name"
    ):
        models[row["name"]] = {
            "provider": row["provider"],
            "deployment": row["deployment"],
            **orjson.loads(row["config"]),
        }

    policies: dict[str, Spec] = {}
    versions: dict[str, int] = {}
    for row in await conn.fetch(
        "SELECT name, type, config::text AS config, enabled, on_error, version "
        "FROM policies ORDER BY name"
    ):
        policies[row["name"]] = {
            "type": row["type"],
            **orjson.loads(row["config"]),
            "enabled": row["enabled"],
            "on_error": row["on_error"],
        }
        versions[row["name"]] = row["version"]

    applications: dict[str, Spec] = {}
    for row in await conn.fetch(
        "SELECT a.name, o.name AS org, a.description FROM applications a "
        "JOIN organizations o ON o.id = a.organization_id ORDER BY a.name"
    ):
        spec: Spec = {"org": row["org"]}
        if row["description"] is not None:
            spec["description"] = row["description"]
        spec["policies"] = []
        spec["environments"] = {}
        applications[row["name"]] = spec
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
            providers=providers, models=models, policies=policies, applications=applications
        ),
        policy_versions=versions,
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
