"""What every policy type provides, and the declared schema its config is read with.

A policy type is one module in this package exporting ``POLICY_TYPE``: its name (the
``type:`` in gateway.yaml), its params model (a ``PolicySpec`` subclass: the declared
schema of its fields, their validation and messages, which the file loader, the catalog
and the admin API all use, and from which the JSON Schema and OpenAPI document are
generated), the frozen params dataclass its enforcer reads, and the enforcer.
``ext_proc.policies.POLICY_TYPES`` maps names to them; adding a type is adding its
module and one line there.

This module imports only the schema's building blocks from ``ext_proc.config``
(``ext_proc.config.fields``, which imports nothing of the policies), so there is no cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field, ValidationInfo

from ext_proc.config.fields import Bool, OneOf, SpecModel, Text, spec_context

if TYPE_CHECKING:
    from ext_proc.policies.limiter import LimitResult, LimitSpec
    from ext_proc.usage.pricing import Price

# Whose counter a limit draws from: the application's (default), the API key's or the org's.
Scope = Literal["app", "key", "org"]
SCOPES: tuple[Scope, ...] = ("app", "key", "org")

# When a policy's dependency (Redis for the limits) is down, or it cannot be evaluated:
# "allow" = carry on (limits fall back to an in-process limiter), "deny" = answer 503.
OnError = Literal["allow", "deny"]
ON_ERROR_CHOICES: tuple[OnError, ...] = ("allow", "deny")

# Fields every policy has, whatever its type.
COMMON_FIELDS: tuple[str, ...] = ("type", "enabled", "on_error")


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Base of each policy type's params dataclass (frozen, built once per config load)."""


class PolicySpec(SpecModel):
    """A policy as gateway.yaml writes it: the common fields here, each type's own in
    its module's subclass (whose ``type`` is its name). ``params`` builds the type's
    params dataclass from the validated fields."""

    mapping_description: ClassVar[str | None] = "a mapping with a type and its fields"

    type: Text = Field(description="the policy type")
    enabled: Bool = Field(True, description="false: bound but not enforced")
    on_error: Annotated[str, OneOf(ON_ERROR_CHOICES)] = Field(
        "allow",
        description="when its dependency (Redis) is down: allow (decide locally) or deny (503)",
    )

    def params(self, name: str) -> PolicyParams:
        """The params dataclass of policy ``name``."""
        raise NotImplementedError(f"{type(self).__name__} builds no params")


def policy_name(info: ValidationInfo) -> str:
    """The name of the policy being validated ("" when validated on its own)."""
    context = spec_context(info)
    return context.entry if context is not None else ""


def declared_models(info: ValidationInfo) -> Collection[str] | None:
    """Every app-facing model name of the config (names and aliases); None when the
    policy is validated on its own (no check against the models then)."""
    context = spec_context(info)
    return context.model_names if context is not None else None


_Params = TypeVar("_Params", bound=PolicyParams)


@dataclass(frozen=True, slots=True)
class PolicyType(Generic[_Params]):
    name: str  # the `type:` value in gateway.yaml
    params_type: type[_Params]
    spec: type[PolicySpec]  # its declared fields (``spec.params`` builds ``params_type``)
    # Builds the enforcer for one configured policy: (policy name, params, on_error).
    enforcer: Callable[[str, _Params, str], Enforcer] | None = None
    # What CEL expressions of this type can read, by phase (custom_cel).
    cel_variables: Mapping[str, Mapping[str, type]] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Its YAML fields beyond COMMON_FIELDS."""
        return tuple(name for name in self.spec.model_fields if name not in COMMON_FIELDS)


# --------------------------------------------------------------------- enforcement
#
# A policy is enforced at up to three points of a request, and declares which:
#   headers: before the body arrives (request-rate limits, cooldowns) - the cheapest place
#            to refuse, and the only checks that run for a request with no body;
#   body:    checks on the parsed request (allowlist, size, CEL pre-check) and, after
#            them, limit reservations (token limits);
#   after:   once the response is over (settle token reservations, CEL post-checks).
# Within a phase, checks that need no shared state run first, in bound order (first
# denial wins); limits are then taken together in one Redis call, all-or-nothing, so a
# request refused by a check never consumes a limit.

Phase = Literal["headers", "body"]


@dataclass(slots=True)
class RequestFacts:
    """What policies see about a request (the CEL variables are these names)."""

    request_id: str
    key_id: str
    app_id: str
    org_id: str
    environment: str
    endpoint: str = ""
    model: str = ""  # as the app named it (model, alias or Azure deployment)
    catalog_model: str = ""  # the catalog's name for it
    stream: bool = False
    request_size_bytes: int = 0
    message_count: int = 0
    max_tokens: int = 0  # max_tokens / max_completion_tokens, 0 when the request sets none
    estimated_tokens: int = 0  # filled before body checks when a bound policy needs it
    generates: bool = True  # False for embeddings: no completion tokens to reserve
    price: Price | None = None  # of the model served; None when it has none
    started: float = 0.0  # epoch seconds the request arrived (calendar budget periods)
    # Every app-facing name of the model that will serve the request (catalog name and
    # aliases), once it is resolved: the model allowlist judges these.
    served_names: tuple[str, ...] = ()

    def scope_id(self, scope: Scope) -> str:
        if scope == "key":
            return self.key_id
        if scope == "org":
            return self.org_id
        return self.app_id

    def cel_vars(self) -> dict[str, Any]:
        return {
            "request_size_bytes": self.request_size_bytes,
            "estimated_tokens": self.estimated_tokens,
            "model": self.model,
            "org_id": self.org_id,
            "app_id": self.app_id,
            "key_id": self.key_id,
            "environment": self.environment,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "message_count": self.message_count,
            "max_tokens": self.max_tokens,
        }


@dataclass(slots=True)
class Outcome:
    """How the call ended (post-checks and limit settlement read it)."""

    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    response_size_bytes: int
    failed: bool  # no usable answer: the provider erred, or nothing was generated
    cost_usd: Decimal | None = None  # the usage row's cost; None when the model has no price


@dataclass(frozen=True, slots=True)
class Denial:
    """A policy's refusal, answered to the app as an OpenAI-shaped error."""

    policy: str
    status: int
    code: str
    message: str
    retry_after: float | None = None


class Enforcer:
    """Base of every policy type's enforcer; each type overrides what it enforces."""

    phase: Phase = "body"
    needs_estimate = False  # reads RequestFacts.estimated_tokens
    is_limit = False  # provides limit_spec() (taken together, all-or-nothing)
    has_post_check = False
    cooldown: float | None = None  # after a post-check violation, block the app this long
    rate_limit_headers = True  # its limit results feed the x-ratelimit-* headers

    def __init__(self, name: str, on_error: str) -> None:
        self.name = name
        self.on_error = on_error

    def check(self, facts: RequestFacts) -> Denial | None:
        """A check on the request (no shared state); None lets it pass."""
        return None

    def limit_cost(self, facts: RequestFacts) -> int:
        """Units this request takes from the limit (limits only)."""
        raise NotImplementedError

    def limit_params(self) -> tuple[int, float, Scope, str]:
        """(limit, window seconds, scope, kind) of a limit policy."""
        raise NotImplementedError

    def settle_delta(self, reserved: int, outcome: Outcome) -> int:
        """After the call: units to add (or, negative, give back) to the reservation."""
        return 0

    def limit_applies(self, facts: RequestFacts) -> bool:
        """Whether this request draws from the limit at all (limits only; a budget lets
        a request to a model without a price pass uncharged)."""
        return True

    def limit_period(self, facts: RequestFacts) -> tuple[str, float] | None:
        """A limit counted per calendar period instead of a rolling window: (the
        period's label, seconds until it ends). None: a rolling window (GCRA)."""
        return None

    def limit_denial(self, spec: LimitSpec, result: LimitResult) -> Denial | None:
        """The answer when this limit refuses a request; None: the engine's default
        (429 ``rate_limit_exceeded``)."""
        return None

    def post_check(self, facts: RequestFacts, outcome: Outcome) -> bool:
        """True when the finished call violates the policy."""
        return False

    def allows_model(self, model: str) -> bool:
        """For GET /v1/models: would this policy let the app use ``model``?"""
        return True
