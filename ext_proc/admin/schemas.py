"""The admin API's bodies and answers, declared from the gateway.yaml models.

A catalog object's body is its gateway.yaml entry plus ``name`` (the name is the id): the
same model (``ext_proc.config.specs``, each provider type's and each policy type's own)
with a ``name`` field; providers and policies are unions discriminated on ``type``. An
object as answered adds who manages it (``managed_by``), its timestamps (and a policy's
``version``), and after a change the ``warnings`` the change carries (Envoy to
re-render).

These models are declared for the OpenAPI document (``openapi_components``); bodies are
validated by the catalog edit (``ext_proc.admin.edits``), which checks them against the
whole catalog with the declared schema, or, for keys and tokens, with the models here.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from ext_proc.config.document import policy_types, provider_types
from ext_proc.config.fields import (
    MAX_NAME,
    MODEL_NAME,
    SLUG,
    IsDuration,
    OneOf,
    SpecModel,
    Text,
)
from ext_proc.config.specs import ApplicationSpec, ModelSpec, OrganizationSpec

SlugName = Annotated[
    str, Field(pattern=f"^{SLUG.pattern}$", max_length=MAX_NAME, description="the name (its id)")
]
ModelName = Annotated[
    str,
    Field(pattern=f"^{MODEL_NAME.pattern}$", max_length=MAX_NAME, description="the name apps send"),
]
ManagedBy = Literal["file", "api"]


def _create(spec: type[BaseModel], name_type: Any) -> type[BaseModel]:
    base = spec.__name__.removesuffix("Spec")
    return create_model(f"{base}Create", __base__=spec, __doc__=spec.__doc__, name=(name_type, ...))


def _object(create: type[BaseModel], *, version: bool = False) -> type[BaseModel]:
    base = create.__name__.removesuffix("Create")
    fields: dict[str, Any] = {
        "managed_by": (
            ManagedBy,
            Field(description="file: `ext-proc apply` wrote it; api: the admin API"),
        ),
        "created_at": (datetime, ...),
        "updated_at": (datetime, ...),
        "warnings": (
            list[str] | None,
            Field(None, description="after a change: what it needs beyond this API (Envoy)"),
        ),
    }
    if version:
        fields["version"] = (int, Field(description="+1 on every change of what it enforces"))
    return create_model(f"{base}Object", __base__=create, __doc__=create.__doc__, **fields)


def _union(members: list[type[BaseModel]]) -> Any:
    return Annotated[Union[tuple(members)], Field(discriminator="type")]  # noqa: UP007


class Section:
    """One catalog resource: its path, its body and object models."""

    def __init__(self, section: str, kind: str, create: Any, obj: Any, name_type: Any) -> None:
        self.section = section
        self.kind = kind
        self.create = create
        self.object = obj
        self.name_type = name_type
        title = kind.title().replace("_", "")
        self.create_name = f"{title}Create"
        self.object_name = f"{title}Object"
        self.list_name = f"{title}List"


@functools.cache
def sections() -> dict[str, Section]:
    found: dict[str, Section] = {}
    for section, kind, spec, name_type in (
        ("organizations", "organization", OrganizationSpec, SlugName),
        ("models", "model", ModelSpec, ModelName),
        ("applications", "application", ApplicationSpec, SlugName),
    ):
        create = _create(spec, name_type)
        found[section] = Section(section, kind, create, _object(create), name_type)
    provider_creates = [_create(t.spec, SlugName) for t in provider_types().values()]
    found["providers"] = Section(
        "providers",
        "provider",
        _union(provider_creates),
        _union([_object(c) for c in provider_creates]),
        SlugName,
    )
    policy_creates = [_create(t.spec, SlugName) for t in policy_types().values()]
    found["policies"] = Section(
        "policies",
        "policy",
        _union(policy_creates),
        _union([_object(c, version=True) for c in policy_creates]),
        SlugName,
    )
    return dict(sorted(found.items(), key=lambda item: _ORDER.index(item[0])))


_ORDER = ("organizations", "applications", "providers", "models", "policies")


# --- everything else ----------------------------------------------------------------


class _Body(SpecModel):
    """A request body: unknown fields refused, null means absent."""


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    """The gateway's error shape; some errors add details (``errors``, ``used_by``)."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    code: str
    param: str | None


class Error(BaseModel):
    error: ErrorDetail


class Patch(BaseModel):
    """A JSON merge patch (RFC 7386) of the object's gateway.yaml fields: a field given
    replaces it, a nested object merges, ``null`` removes a field (back to its default).
    The whole object after the patch is validated as on create."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"minProperties": 1})


class Deleted(_Answer):
    name: str
    deleted: Literal[True]
    warnings: list[str]


class KeyCreate(_Body):
    """A new API key for an application's environment; ``key`` is answered once."""

    app: Text = Field(description="the application")
    environment: Text | None = Field(None, description="default: default")
    name: Text | None = Field(None, description="what the key is for (shown in listings)")
    expires_at: datetime | None = Field(None, description="when it stops working (default: never)")


class KeyRotate(_Body):
    """A new key for the same application and environment; the old one keeps working
    for the grace period."""

    grace_period: Annotated[float, IsDuration(allow_zero=True)] | None = Field(
        None, description="how long the old key keeps working (default 24h; 0: not at all)"
    )


class KeyObject(_Answer):
    id: str
    prefix: str
    app: str
    org: str
    environment: str
    name: str | None
    status: Literal["active", "expired", "revoked", "rotating"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_from: str | None
    replaced_by: str | None


class KeyCreated(KeyObject):
    key: str = Field(description="the key itself: shown this once, stored nowhere")
    replaced: KeyObject | None = None


class KeyList(_Answer):
    data: list[KeyObject]


class TokenCreate(_Body):
    """A new admin API token; ``token`` is answered once."""

    name: Annotated[str, Field(pattern=f"^{SLUG.pattern}$", max_length=MAX_NAME)] = Field(
        description="unique among usable tokens; the audit log's actor"
    )
    role: Annotated[str, OneOf(("admin", "viewer"))] = Field(
        description="admin reads and writes; viewer reads"
    )
    org: Text | None = Field(None, description="scope it to one organization")
    expires_at: datetime | None = None


class TokenObject(_Answer):
    id: str
    name: str
    role: Literal["admin", "viewer"]
    org: str | None
    prefix: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenObject):
    token: str = Field(description="the token itself: shown this once, stored nowhere")


class TokenList(_Answer):
    data: list[TokenObject]


class WhoAmI(_Answer):
    """The token making the request (``GET /v1/whoami``)."""

    name: str = Field(description="the token's name (the audit log's actor)")
    role: Literal["admin", "viewer"]
    org: str | None = Field(description="the one organization it sees, or null: every one")


class FieldError(BaseModel):
    model_config = ConfigDict(extra="allow")

    field: str
    message: str
    line: int | None = None
    column: int | None = None


class PolicyValidation(_Answer):
    valid: bool
    errors: list[FieldError]


class PolicyTypeInfo(_Answer):
    type: str
    description: str
    fields: list[str]
    parameters: dict[str, Any] = Field(description="the type's fields as JSON Schema")
    cel_variables: dict[str, dict[str, str]] | None = Field(
        None, description="per expression field, the variables it can read and their CEL types"
    )


class PolicyTypeList(_Answer):
    data: list[PolicyTypeInfo]


class ProbeAnswer(_Answer):
    ok: bool
    status: int | None
    latency_ms: float | None
    error: str | None
    url: str
    has_credential: bool


class ProviderTest(_Answer):
    provider: str
    test: ProbeAnswer


class RotateCredentials(_Body):
    """Switch to another credential reference (one of the two), or give neither to
    re-read the current one (a rotated secret behind the same env var or file)."""

    api_key_env: Text | None = None
    api_key_file: Text | None = None


class CredentialsRotated(_Answer):
    provider: str
    credential: dict[str, str]
    changed_reference: bool
    test: ProbeAnswer
    warnings: list[str]


class UsageAnswer(_Answer):
    group_by: list[str]
    since: datetime
    until: datetime
    rows: list[dict[str, Any]] = Field(
        description="per group: requests, tokens, cost_usd (a decimal string or null), ..."
    )


class AuditEntry(_Answer):
    id: int
    at: datetime
    actor: str
    actor_role: str | None
    action: str
    kind: str
    name: str
    org: str | None
    before: Any
    after: Any
    request_id: str | None


class AuditList(_Answer):
    data: list[AuditEntry]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str


class Reloaded(_Answer):
    reloaded: bool
    fingerprint: str


def component_types() -> dict[str, Any]:
    """Every schema the OpenAPI document names, by component name."""
    found: dict[str, Any] = {}
    for section in sections().values():
        found[section.create_name] = section.create
        found[section.object_name] = section.object
        found[section.list_name] = create_model(
            section.list_name,
            data=(list[section.object], ...),  # type: ignore[name-defined]
        )
    for model in (
        Error,
        Patch,
        Deleted,
        KeyCreate,
        KeyRotate,
        KeyCreated,
        KeyList,
        TokenCreate,
        TokenCreated,
        TokenList,
        WhoAmI,
        PolicyValidation,
        PolicyTypeList,
        ProviderTest,
        RotateCredentials,
        CredentialsRotated,
        UsageAnswer,
        AuditList,
        Health,
        Reloaded,
    ):
        found[model.__name__] = model
    return found


@functools.cache
def openapi_components() -> dict[str, Any]:
    """The ``components.schemas`` of the OpenAPI document."""
    schemas: dict[str, Any] = {}
    for name, type_ in component_types().items():
        schema = TypeAdapter(type_).json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return schemas
