"""The declared schema of gateway.yaml's objects (pydantic), and what each one becomes.

One model per object: ``ProviderSpec`` (each provider type extends it in its own module,
``ext_proc.routing.providers.*``, with its own fields), ``ModelSpec`` (with ``PriceSpec``
and ``TargetSpec`` fallbacks), ``PolicySpec`` (each policy type's module declares its
params model), ``ApplicationSpec``, ``EnvironmentSpec``, ``OrganizationSpec``. The file
loader, the catalog in Postgres and the admin API validate through these models (see
``ext_proc.config.document``); the OpenAPI document and ``schema/gateway.schema.json``
are generated from them (``ext_proc.config.jsonschema``).

References to other objects (a model's provider, an application's policies, an
allowlist's models) are checked against the names the validation's ``SpecContext``
declares; validated on its own (no context) an object skips those checks.

Each model turns itself into the immutable runtime object (``ext_proc.config.model``)
with ``to_*(name)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from ext_proc.config.errors import did_you_mean
from ext_proc.config.fields import (
    MODEL_NAME,
    MODEL_NAME_HELP,
    Bool,
    IntRange,
    IsAmount,
    IsDuration,
    Items,
    NameOf,
    Problem,
    SpecModel,
    Text,
    check_name,
    collect,
    fail,
    fail_at,
    raise_problems,
    read_list,
    read_mapping,
    read_text,
    spec_context,
    validate_nested,
)
from ext_proc.config.model import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENVIRONMENT,
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    DEFAULT_TIMEOUT,
    MAX_TARGETS,
    MAX_WEIGHT,
    RETRY_ON_CONDITIONS,
    SCOPING_HEADERS,
    Application,
    Environment,
    Model,
    Organization,
    Provider,
    RetryPolicy,
    Target,
)
from ext_proc.tokens.encodings import ENCODING_FILES
from ext_proc.usage.pricing import Price

if TYPE_CHECKING:
    from ext_proc.routing.providers.base import ProviderType

_AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# USD per million tokens: no model costs anywhere near this; with at most 6 decimal
# places a price has at most 11 significant digits, so it survives the catalog's JSON
# (a double) exactly.
MAX_PRICE = Decimal(100_000)
PRICE_PLACES = 6

# Static provider headers must not touch what Envoy manages per connection or request,
# nor carry credentials (those come from api_key_env / api_key_file, kept out of the file).
_FORBIDDEN_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"),
            "is a hop-by-hop header, managed by Envoy per connection",
        ),
        "transfer-encoding": "is a hop-by-hop header, managed by Envoy per connection",
        "host": "is set from base_url",
        "content-length": "is set from the request body",
        **dict.fromkeys(
            ("authorization", "api-key", "x-api-key", "proxy-authorization", "cookie"),
            "carries a credential: use api_key_env or api_key_file instead",
        ),
    }
)


# --- providers ------------------------------------------------------------------------


def _base_url(value: Any) -> str:
    text = read_text(value)
    problem = None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif any(char.isspace() for char in text):
        problem = "must not contain spaces"
    elif not parts.hostname:
        problem = "has no host"
    elif parts.username is not None or parts.password is not None:
        problem = "must not hold credentials: use api_key_env or api_key_file"
    elif parts.query or parts.fragment:
        problem = "must not have a query or fragment"
    else:
        try:
            _ = parts.port  # raises ValueError for a bad port
        except ValueError:
            problem = "has an invalid port"
    if problem is not None:
        fail(f"'{text}' {problem}")
    return f"{parts.scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _env_var(value: Any) -> str:
    text = read_text(value)
    if not _ENV_VAR.fullmatch(text):
        fail(f"'{text}' is not an environment variable name")
    return text


def _headers(value: Any) -> dict[str, str]:
    """Static headers: lower-case names, single-line values."""
    entries = read_mapping(value, "a mapping of header name to value")
    result: dict[str, str] = {}
    problems: list[Problem] = []
    for name, raw in entries.items():
        lower = name.lower()
        problem = None
        if not _HEADER_NAME.fullmatch(name):
            problem = f"'{name}' is not a valid header name"
        elif lower in _FORBIDDEN_HEADERS:
            problem = f"'{name}' {_FORBIDDEN_HEADERS[lower]}"
        elif lower.startswith("x-envoy-"):
            problem = f"'{name}': x-envoy-* headers are Envoy's own"
        elif lower in result:
            problem = f"'{name}' is set twice (header names ignore case)"
        if problem is not None:
            problems.append(Problem((name,), problem, "key"))
            continue
        text = collect(problems, (name,), read_text, raw)
        if text is None:
            continue
        if "\r" in text or "\n" in text:
            problems.append(Problem((name,), "header values must be a single line"))
        else:
            result[lower] = text
    if problems:
        raise_problems(problems)
    return result


def _pass_headers(value: Any) -> list[str]:
    """The scoping headers let through, lower-case, each once."""
    items = read_list(value, "names")
    problems: list[Problem] = []
    result: list[str] = []
    for index, raw in enumerate(items):
        name = collect(problems, (index,), read_text, raw)
        if name is None:
            continue
        lower = name.lower()
        if lower not in SCOPING_HEADERS:
            problems.append(
                Problem(
                    (index,),
                    f"'{name}' is not a header the gateway holds back (those are "
                    f"{', '.join(SCOPING_HEADERS)}); other app headers pass anyway"
                    + did_you_mean(lower, SCOPING_HEADERS),
                )
            )
            break
        if lower not in result:
            result.append(lower)
    if problems:
        raise_problems(problems)
    return result


def _retry_conditions(value: Any) -> list[str]:
    items = read_list(value, "names")
    problems: list[Problem] = []
    result: list[str] = []
    known = ", ".join(sorted(RETRY_ON_CONDITIONS))
    for index, raw in enumerate(items):
        condition = collect(problems, (index,), read_text, raw)
        if condition is None:
            continue
        if condition not in RETRY_ON_CONDITIONS:
            problems.append(
                Problem(
                    (index,),
                    f"unknown retry condition '{condition}' (known: {known})"
                    + did_you_mean(condition, RETRY_ON_CONDITIONS),
                )
            )
        result.append(condition)
    if problems:
        raise_problems(problems)
    return result


class RetriesSpec(SpecModel):
    """Envoy's retries of one upstream try (``retries:``)."""

    attempts: Annotated[int, IntRange(0, 5)] = Field(1, description="retries after the first try")
    on: Annotated[
        list[str],
        Field(json_schema_extra={"items": {"enum": sorted(RETRY_ON_CONDITIONS)}}),
        BeforeValidator(_retry_conditions),
    ] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    retriable_status_codes: (
        Annotated[list[Annotated[int, IntRange(400, 599)]], Items("HTTP status codes")] | None
    ) = None

    @model_validator(mode="after")
    def _consistent(self) -> RetriesSpec:
        if not self.on and self.attempts:
            fail_at("on", "list at least one condition, or set attempts: 0")
        fields = self.model_fields_set
        if "retriable_status_codes" in fields and "retriable-status-codes" not in self.on:
            fail_at(
                "retriable_status_codes",
                "has no effect unless 'on' lists retriable-status-codes",
            )
        return self

    def to_policy(self) -> RetryPolicy:
        return RetryPolicy(
            attempts=self.attempts,
            on=tuple(self.on),
            retriable_status_codes=tuple(self.retriable_status_codes or ())
            or DEFAULT_RETRIABLE_STATUS_CODES,
        )


class ProviderSpec(SpecModel):
    """The fields every provider has; each provider type's module extends it with its
    own (``type`` becomes that type's name) as ``ProviderType.spec``."""

    type: Text = Field(description="the provider type (a module of ext_proc.routing.providers)")
    base_url: Annotated[str, Field(pattern="^https?://"), BeforeValidator(_base_url)] = Field(
        description="scheme://host[:port][/prefix]; request paths follow it"
    )
    api_key_env: (
        Annotated[str, Field(pattern=f"^{_ENV_VAR.pattern}$"), BeforeValidator(_env_var)] | None
    ) = Field(None, description="the environment variable holding the credential (never the key)")
    api_key_file: Text | None = Field(
        None, description="or a file holding it (relative: to the config file's folder)"
    )
    headers: Annotated[dict[str, str], BeforeValidator(_headers)] | None = Field(
        None, description="static headers sent upstream"
    )
    timeout: Annotated[float, IsDuration()] = Field(
        DEFAULT_TIMEOUT, description="whole-answer deadline; 504 past it"
    )
    connect_timeout: Annotated[float, IsDuration()] = DEFAULT_CONNECT_TIMEOUT
    retries: RetriesSpec | None = None
    inject_stream_usage: Bool | None = Field(
        None,
        description="ask streams for their usage (stream_options.include_usage); "
        "types whose streams report it anyway refuse this field",
    )
    pass_headers: Annotated[list[str], BeforeValidator(_pass_headers)] | None = Field(
        None,
        description="scoping headers apps may send to this provider "
        f"({', '.join(SCOPING_HEADERS)})",
    )

    @model_validator(mode="after")
    def _common(self) -> ProviderSpec:
        fields = self.model_fields_set
        if "api_key_env" in fields and "api_key_file" in fields:
            fail_at("api_key_file", "set api_key_env or api_key_file, not both")
        if "inject_stream_usage" in fields and not _injectable(self.type):
            injectable = sorted(
                t.name for t in _provider_types().values() if t.stream_usage_injectable
            )
            fail_at(
                "inject_stream_usage",
                f"{self.type} streams report usage themselves; "
                f"this applies to {', '.join(injectable)} providers",
            )
        return self

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """The type's own fields (beside the common ones)."""
        return tuple(name for name in cls.model_fields if name not in ProviderSpec.model_fields)

    def to_provider(self, name: str) -> Provider:
        return Provider(
            name=name,
            type=self.type,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            api_key_file=self.api_key_file,
            options=MappingProxyType({field: getattr(self, field) for field in self.own_fields()}),
            headers=MappingProxyType(dict(self.headers or {})),
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            retries=self.retries.to_policy() if self.retries is not None else RetryPolicy(),
            inject_stream_usage=(
                self.inject_stream_usage is not False if _injectable(self.type) else False
            ),
            pass_headers=tuple(self.pass_headers) if self.pass_headers else None,
        )


def _provider_types() -> Mapping[str, ProviderType]:
    # At call time: the provider modules import this module to declare their specs.
    from ext_proc.routing.providers import PROVIDER_TYPES

    return PROVIDER_TYPES


def _injectable(type_name: str) -> bool:
    provider_type = _provider_types().get(type_name)
    return provider_type is not None and provider_type.stream_usage_injectable


# --- models -----------------------------------------------------------------------------


class PriceSpec(SpecModel):
    """USD per million tokens; the cached and cache-write prices default to ``input``."""

    input: Annotated[Decimal, IsAmount(minimum=Decimal(0), maximum=MAX_PRICE, places=PRICE_PLACES)]
    output: Annotated[Decimal, IsAmount(minimum=Decimal(0), maximum=MAX_PRICE, places=PRICE_PLACES)]
    cached_input: (
        Annotated[Decimal, IsAmount(minimum=Decimal(0), maximum=MAX_PRICE, places=PRICE_PLACES)]
        | None
    ) = None
    cache_write: (
        Annotated[Decimal, IsAmount(minimum=Decimal(0), maximum=MAX_PRICE, places=PRICE_PLACES)]
        | None
    ) = None

    def to_price(self) -> Price:
        return Price(
            input=self.input,
            output=self.output,
            cached_input=self.cached_input,
            cache_write=self.cache_write,
            source="config",
        )


def _provider_ref(value: Any, info: ValidationInfo) -> str:
    name = read_text(value)
    context = spec_context(info)
    if context is not None and name not in context.providers:
        declared = ", ".join(context.providers) or "none"
        fail(
            f"unknown provider '{name}' (declared: {declared})"
            + did_you_mean(name, context.providers)
        )
    return name


def _provider_type(info: ValidationInfo) -> str | None:
    context = spec_context(info)
    provider = info.data.get("provider")
    if context is None or provider is None:
        return None
    return context.providers.get(provider)


def _deployment(value: Any, info: ValidationInfo) -> str:
    """Azure deployment, or the model name sent upstream; checked for the provider type."""
    deployment = read_text(value)
    if _provider_type(info) == "azure_openai":
        if not _AZURE_DEPLOYMENT.fullmatch(deployment):
            fail(
                f"'{deployment}' is not an Azure deployment name "
                "(letters, digits, '.', '_' and '-')"
            )
    elif any(char.isspace() for char in deployment):
        fail(f"'{deployment}' must not contain spaces")
    return deployment


def _default_deployment_problem(provider_type: str | None, model: str) -> str | None:
    if provider_type == "azure_openai" and not _AZURE_DEPLOYMENT.fullmatch(model):
        return f"'{model}' cannot be an Azure deployment name: set deployment"
    return None


ProviderRef = Annotated[str, Field(min_length=1), BeforeValidator(_provider_ref)]
Deployment = Annotated[str, Field(min_length=1), BeforeValidator(_deployment)]


class TargetSpec(SpecModel):
    """Where else a model is served (one of its ``fallbacks:``)."""

    provider: ProviderRef
    deployment: Deployment | None = Field(None, description="default: the model's name")
    weight: Annotated[int, IntRange(1, MAX_WEIGHT)] | None = Field(
        None, description="share among equal priorities"
    )
    priority: Annotated[int, IntRange(0, MAX_TARGETS - 1)] | None = Field(
        None, description="0 first; default: one more than the target before it"
    )
    price: PriceSpec | None = None

    @model_validator(mode="after")
    def _named_deployment(self, info: ValidationInfo) -> TargetSpec:
        context = spec_context(info)
        if self.deployment is None and context is not None:
            problem = _default_deployment_problem(
                context.providers.get(self.provider), context.entry
            )
            if problem is not None:
                fail_at(None, problem)
        return self


def _encoding(value: Any) -> str:
    name = read_text(value)
    if name not in ENCODING_FILES:
        fail(
            f"unknown encoding '{name}' (known: {', '.join(ENCODING_FILES)})"
            + did_you_mean(name, ENCODING_FILES)
        )
    return name


def _aliases(value: Any, info: ValidationInfo) -> list[str]:
    items = read_list(value, "names")
    context = spec_context(info)
    problems: list[Problem] = []
    result: list[str] = []
    for index, raw in enumerate(items):
        alias = collect(problems, (index,), read_text, raw)
        if alias is None:
            continue
        result.append(alias)
        if context is None:
            problem = check_name(alias, "alias", MODEL_NAME)
            if problem is not None:
                problems.append(Problem((index,), f"invalid alias '{alias}': {MODEL_NAME_HELP}"))
            continue
        owner = context.model_names.get(alias)
        if alias == context.entry:
            problems.append(Problem((index,), f"'{alias}' is the model's own name"))
        elif owner == alias:
            problems.append(Problem((index,), f"'{alias}' is already a model name"))
        elif alias in context.alias_owners and context.alias_owners[alias] != (
            context.entry,
            index,
        ):
            first = context.alias_owners[alias][0]
            problems.append(Problem((index,), f"'{alias}' is already an alias of model '{first}'"))
        elif check_name(alias, "alias", MODEL_NAME) is not None:
            problems.append(Problem((index,), f"invalid alias '{alias}': {MODEL_NAME_HELP}"))
    if problems:
        raise_problems(problems)
    return result


def _fallbacks(value: Any) -> list[Any]:
    items = read_list(value, "fallback targets")
    if not items:
        fail("list at least one fallback target, or leave it out")
    if len(items) + 1 > MAX_TARGETS:
        fail(f"at most {MAX_TARGETS - 1} fallbacks (each one is an attempt)")
    return items


class ModelSpec(SpecModel):
    """A model apps name (the key) and where it is served."""

    provider: ProviderRef = Field(description="a declared provider")
    deployment: Deployment | None = Field(
        None, description="Azure deployment, or the model name sent upstream (default: the name)"
    )
    encoding: (
        Annotated[
            str,
            BeforeValidator(_encoding),
            Field(json_schema_extra={"enum": list(ENCODING_FILES)}),
        ]
        | None
    ) = Field(None, description="tiktoken encoding for counting (default: by the model)")
    aliases: Annotated[list[str], BeforeValidator(_aliases)] | None = Field(
        None, description="more names apps may send"
    )
    price: PriceSpec | None = Field(
        None, description="USD per million tokens (default: the public price table)"
    )
    fallbacks: Annotated[list[TargetSpec], BeforeValidator(_fallbacks)] | None = Field(
        None, description="where else it is served, in the order tried"
    )
    weight: Annotated[int, IntRange(1, MAX_WEIGHT)] | None = Field(
        None, description="the primary's share among targets of priority 0"
    )
    attempt_timeout: Annotated[float, IsDuration()] | None = Field(
        None, description="how long one attempt may wait for its first byte"
    )

    @field_validator("fallbacks", mode="after")
    @classmethod
    def _targets_in_order(cls, targets: list[TargetSpec] | None, info: ValidationInfo) -> Any:
        if targets is None:
            return None
        context = spec_context(info)
        name = context.entry if context is not None else ""
        primary = info.data.get("provider")
        seen = {(primary, info.data.get("deployment") or name)}
        previous = 0
        problems: list[Problem] = []
        for index, target in enumerate(targets):
            deployment = target.deployment or name
            if target.priority is not None and target.priority < previous:
                problems.append(
                    Problem(
                        (index, "priority"),
                        f"{target.priority} is below the target before it ({previous}): "
                        "list targets in the order they are tried",
                    )
                )
            elif (target.provider, deployment) in seen:
                problems.append(
                    Problem(
                        (index,),
                        f"provider '{target.provider}' with deployment '{deployment}' "
                        "is already a target of this model",
                        "anchor",
                    )
                )
            else:
                previous = previous + 1 if target.priority is None else target.priority
            seen.add((target.provider, deployment))
        if problems:
            raise_problems(problems)
        return targets

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> ModelSpec:
        if self.fallbacks is None:
            for extra in ("weight", "attempt_timeout"):
                if extra in self.model_fields_set:
                    fail_at(extra, "has no effect without fallbacks")
        context = spec_context(info)
        if self.deployment is None and context is not None:
            problem = _default_deployment_problem(
                context.providers.get(self.provider), context.entry
            )
            if problem is not None:
                fail_at(None, problem)
        return self

    def to_model(self, name: str) -> Model:
        deployment = self.deployment or name
        targets: list[Target] = []
        previous = 0
        for target in self.fallbacks or ():
            priority = previous + 1 if target.priority is None else target.priority
            previous = priority
            targets.append(
                Target(
                    target.provider,
                    target.deployment or name,
                    target.weight or 1,
                    priority,
                    target.price.to_price() if target.price is not None else None,
                )
            )
        return Model(
            name=name,
            provider=self.provider,
            deployment=deployment,
            encoding=self.encoding,
            aliases=tuple(self.aliases or ()),
            price=self.price.to_price() if self.price is not None else None,
            fallbacks=tuple(targets) if self.fallbacks is not None else None,
            weight=self.weight,
            attempt_timeout=self.attempt_timeout,
        )


# --- applications, environments, organizations -------------------------------------------

INHERITED_POLICIES = "inherited_policies"  # validation context: the app's own policies


def policy_refs(value: Any, info: ValidationInfo) -> list[str]:
    """Policy names, in evaluation order: declared, each once, not already inherited."""
    names = read_list(value, "names")
    context = spec_context(info)
    inherited: Sequence[str] = ()
    if isinstance(info.context, Mapping):
        inherited = info.context.get(INHERITED_POLICIES) or ()
    problems: list[Problem] = []
    result: list[str] = []
    for index, raw in enumerate(names):
        policy = collect(problems, (index,), read_text, raw)
        if policy is None:
            continue
        problem = None
        if context is not None and policy not in context.policies:
            declared = context.policies
            problem = (
                f"unknown policy '{policy}' (declared: {', '.join(declared) or 'none'})"
                + did_you_mean(policy, declared)
            )
        elif policy in result:
            problem = f"'{policy}' is listed twice"
        elif policy in inherited:
            problem = f"'{policy}' is already bound to the application"
        if problem is not None:
            problems.append(Problem((index,), problem))
        result.append(policy)
    if problems:
        raise_problems(problems)
    return result


PolicyRefs = Annotated[list[str], BeforeValidator(policy_refs)]


class EnvironmentSpec(SpecModel):
    """An application's environment: policies applied after the application's own."""

    policies: PolicyRefs = Field(default_factory=list)

    def to_environment(self, name: str) -> Environment:
        return Environment(name, tuple(self.policies))


def _environments(value: Any, info: ValidationInfo) -> dict[str, EnvironmentSpec | None]:
    entries = read_mapping(value, "a mapping of environment name to its policies")
    inherited = info.data.get("policies") or ()
    problems: list[Problem] = []
    result: dict[str, EnvironmentSpec | None] = {}
    for name, raw in entries.items():
        problem = check_name(name, "environment")
        if problem is not None:
            problems.append(Problem((name,), problem, "key"))
        if raw is None:
            result[name] = None
            continue
        spec = collect(
            problems,
            (name,),
            validate_nested,
            EnvironmentSpec,
            raw,
            info,
            **{INHERITED_POLICIES: tuple(inherited)},
        )
        if spec is not None:
            result[name] = spec
    if problems:
        raise_problems(problems)
    return result


class ApplicationSpec(SpecModel):
    """An application (the key is its name): its org, its policies, its environments."""

    org: Annotated[str, NameOf("org")] = Field(description="the organization it belongs to")
    description: Text | None = None
    policies: PolicyRefs = Field(default_factory=list, description="in evaluation order")
    environments: Annotated[dict[str, EnvironmentSpec | None], BeforeValidator(_environments)] = (
        Field(
            default_factory=dict,
            description=f"keys belong to one ('{DEFAULT_ENVIRONMENT}' always exists); "
            "each adds policies after the application's own",
        )
    )

    def to_application(self, name: str) -> Application:
        environments = {DEFAULT_ENVIRONMENT: Environment(DEFAULT_ENVIRONMENT)}
        for env_name, spec in self.environments.items():
            environments[env_name] = (
                spec.to_environment(env_name) if spec is not None else Environment(env_name)
            )
        return Application(
            name=name,
            org=self.org,
            description=self.description,
            policies=tuple(self.policies),
            environments=MappingProxyType(environments),
        )


class OrganizationSpec(SpecModel):
    """An organization: applications belong to one; limits may count per org."""

    description: Text | None = None

    def to_organization(self, name: str) -> Organization:
        return Organization(name=name, description=self.description)


__all__ = [
    "MODEL_NAME",
    "ApplicationSpec",
    "EnvironmentSpec",
    "ModelSpec",
    "OrganizationSpec",
    "PolicyRefs",
    "PriceSpec",
    "ProviderRef",
    "ProviderSpec",
    "RetriesSpec",
    "TargetSpec",
    "policy_refs",
]
