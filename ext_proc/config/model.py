"""The gateway config as typed, immutable objects (what gateway.yaml declares).

Field names are the YAML keys. Every mapping is read-only and keeps the file's order.
Objects are built from the declared schema (``ext_proc.config.specs``, each model's
``to_*``) by ``ext_proc.config.document`` only after the whole document validated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ext_proc.policies.base import OnError, PolicyParams
from ext_proc.tokens.encodings import encoding_name_for_model, known_encoding_name
from ext_proc.usage.pricing import Price, decimal_text

# A provider's `type:`; the known ones are the modules of ext_proc.routing.providers, each
# owning its own fields (`Provider.options`), adapter and usage format.
ProviderType = str

# App headers that scope a provider account or feature (which organization or project
# is billed, which beta is on): with the gateway's credential they would let an app act
# as any org/project that credential reaches, so they never reach a provider unless its
# `pass_headers` lets one through. (The gateway's key headers and its x-gateway-* headers
# never do: see envoy_config.)
SCOPING_HEADERS: tuple[str, ...] = ("openai-organization", "openai-project", "anthropic-beta")

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0

# Envoy's HTTP `retry_on` conditions a provider may list.
RETRY_ON_CONDITIONS: frozenset[str] = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
    }
)
DEFAULT_RETRY_ON: tuple[str, ...] = ("connect-failure", "reset", "retriable-status-codes")
DEFAULT_RETRIABLE_STATUS_CODES: tuple[int, ...] = (502, 503, 504)


# The environment of keys created without one; every application has it.
DEFAULT_ENVIRONMENT = "default"

# Field metadata: leave the field out of the canonical form while it is None, so adding
# an optional field does not change the fingerprint of configs that do not use it.
OMIT_IF_NONE: Mapping[str, bool] = MappingProxyType({"omit_if_none": True})


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1  # retries after the first try, 0..5
    on: tuple[str, ...] = DEFAULT_RETRY_ON  # Envoy retry_on conditions
    retriable_status_codes: tuple[int, ...] = DEFAULT_RETRIABLE_STATUS_CODES


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    type: ProviderType
    base_url: str  # scheme://host[:port][/prefix], no trailing slash; request paths follow it
    api_key_env: str | None = None  # name of the env var holding the key (never the key)
    api_key_file: str | None = None  # or a file holding it (relative: to the config's folder)
    # The type's own fields, as its ProviderType parsed them (azure_openai: api_version;
    # anthropic: anthropic_version). In the canonical form they sit beside the others,
    # as in the file.
    options: Mapping[str, Any] = field(
        default_factory=_empty_mapping, metadata=MappingProxyType({"flatten": True})
    )
    headers: Mapping[str, str] = field(default_factory=_empty_mapping)  # lower-case names
    timeout: float = DEFAULT_TIMEOUT  # seconds for the whole upstream response
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retries: RetryPolicy = RetryPolicy()
    # Add `stream_options.include_usage` to streaming requests (types whose streams
    # report usage only when asked; always False for the others).
    inject_stream_usage: bool = True
    # SCOPING_HEADERS the operator lets apps send to this provider (lower-case names;
    # None: none, and out of the canonical form).
    pass_headers: tuple[str, ...] | None = field(default=None, metadata=OMIT_IF_NONE)

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        """The scoping headers removed from app requests before they reach this provider."""
        passed = self.pass_headers or ()
        return tuple(h for h in SCOPING_HEADERS if h not in passed)

    @property
    def has_credential(self) -> bool:
        return self.api_key_env is not None or self.api_key_file is not None

    @property
    def tls(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path_prefix(self) -> str:
        """The path part of base_url ("" or e.g. "/proxy"), put before request paths."""
        return urlsplit(self.base_url).path


# Upstream fallback: at most this many targets per model (the primary included), and
# the bounds of a target's weight.
MAX_TARGETS = 8
MAX_WEIGHT = 10_000


@dataclass(frozen=True, slots=True)
class Target:
    """Where a model is served: its primary (``Model.targets[0]``) or a fallback.

    Targets are tried by ``priority`` (0 first; a fallback's default is one more than
    the target before it); targets of equal priority share the traffic by ``weight``.
    """

    provider: str  # a key of GatewayConfig.providers
    deployment: str  # Azure deployment, or the model name sent upstream
    weight: int = 1
    priority: int = 0
    # USD per million tokens for answers this target serves (None: the public table by
    # its deployment name).
    price: Price | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True, slots=True)
class Model:
    name: str  # what apps send
    provider: str  # a key of GatewayConfig.providers
    deployment: str  # Azure deployment, or the model name sent upstream
    encoding: str | None = None  # tiktoken encoding override
    aliases: tuple[str, ...] = ()  # more app-facing names for the same model
    # USD per million tokens as the file gives it (it wins over the public table, which
    # the routing catalog consults when this is None).
    price: Price | None = field(default=None, metadata=OMIT_IF_NONE)
    # Upstream fallback (None: the primary alone, the common case): the other targets in
    # the order they are tried, the primary's weight among targets of priority 0, and how
    # long one attempt may wait for its answer's first byte before the next is tried.
    fallbacks: tuple[Target, ...] | None = field(default=None, metadata=OMIT_IF_NONE)
    weight: int | None = field(default=None, metadata=OMIT_IF_NONE)
    attempt_timeout: float | None = field(default=None, metadata=OMIT_IF_NONE)

    @property
    def targets(self) -> tuple[Target, ...]:
        """The primary, then the fallbacks (as declared)."""
        primary = Target(self.provider, self.deployment, self.weight or 1, 0, self.price)
        return (primary, *(self.fallbacks or ()))

    @property
    def encoding_name(self) -> str:
        """What its prompts and answers are counted in: the ``encoding`` override, else
        the family of the model served (``deployment``), else of the name apps send (an
        Azure deployment's own name may say nothing, e.g. ``prod-chat``)."""
        return (
            self.encoding
            or known_encoding_name(self.deployment)
            or encoding_name_for_model(self.name)
        )


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    type: str  # a key of ext_proc.policies.POLICY_TYPES
    params: PolicyParams  # that type's params dataclass
    enabled: bool = True
    on_error: OnError = "allow"


@dataclass(frozen=True, slots=True)
class Environment:
    name: str
    policies: tuple[str, ...] = ()  # applied after the application's own


@dataclass(frozen=True, slots=True)
class Application:
    name: str
    org: str
    description: str | None = None
    policies: tuple[str, ...] = ()  # in evaluation order
    environments: Mapping[str, Environment] = field(
        default_factory=lambda: MappingProxyType(
            {DEFAULT_ENVIRONMENT: Environment(DEFAULT_ENVIRONMENT)}
        )
    )

    def policy_names(self, environment: str = DEFAULT_ENVIRONMENT) -> tuple[str, ...]:
        """The app's policies then the environment's (KeyError for an unknown environment)."""
        return self.policies + self.environments[environment].policies


@dataclass(frozen=True, slots=True)
class Organization:
    name: str
    description: str | None = field(default=None, metadata=OMIT_IF_NONE)
    # Named by an application but not declared under `organizations:` (not compared:
    # declared or implied, an organization means the same).
    implied: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    policies: Mapping[str, Policy]
    applications: Mapping[str, Application]
    # Every app-facing name (model names and aliases) -> its model.
    model_index: Mapping[str, Model]
    source: str  # the file it came from, or "<string>"
    fingerprint: str  # sha256 of the canonical form: equal iff the content means the same
    # Declared under `organizations:`, then those only named by applications.
    organizations: Mapping[str, Organization] = field(default_factory=_empty_mapping)

    def find_model(self, name: str) -> Model | None:
        """The model an app-facing name (or alias) stands for."""
        return self.model_index.get(name)

    def provider_of(self, model: Model) -> Provider:
        return self.providers[model.provider]

    def application_policies(
        self, application: str, environment: str = DEFAULT_ENVIRONMENT
    ) -> tuple[Policy, ...]:
        """The enabled policies bound to an app in an environment, in evaluation order."""
        names = self.applications[application].policy_names(environment)
        return tuple(self.policies[name] for name in names if self.policies[name].enabled)

    def canonical(self) -> dict[str, Any]:
        return canonical_form(
            self.providers, self.models, self.policies, self.applications, self.organizations
        )


def canonical_form(
    providers: Mapping[str, Provider],
    models: Mapping[str, Model],
    policies: Mapping[str, Policy],
    applications: Mapping[str, Application],
    organizations: Mapping[str, Organization],
) -> dict[str, Any]:
    """Plain JSON data for the config with defaults filled in; mapping order is
    irrelevant (keys are sorted when hashed), list order is kept (it means something).
    Organizations are every one declared or named by an application, so a file naming
    ``org: acme`` and a catalog holding the row ``acme`` mean the same."""
    return {
        "providers": _plain(providers),
        "models": _plain(models),
        "policies": _plain(policies),
        "applications": _plain(applications),
        "organizations": _plain(organizations),
    }


def fingerprint_of(canonical: Mapping[str, Any]) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields that are not compared (compiled CEL programs, derived lookups) are
        # derived from the ones that are, so they add nothing to the fingerprint.
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if not f.compare or (f.metadata.get("omit_if_none") and item is None):
                continue
            if f.metadata.get("flatten"):  # a mapping whose entries are fields themselves
                out.update(_plain(item))
            else:
                out[f.name] = _plain(item)
        return out
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(item) for item in value)
    if isinstance(value, Decimal):
        return decimal_text(value)  # JSON has no decimals; "2.5" and "2.50" mean the same
    return value
