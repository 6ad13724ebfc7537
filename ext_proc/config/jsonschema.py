"""The JSON Schema of gateway.yaml, generated from the declared models.

``schema/gateway.schema.json`` is this schema, checked in so editors (the YAML language
server: ``# yaml-language-server: $schema=../schema/gateway.schema.json``) and CI can
use it without the gateway; ``tests/unit/test_gateway_schema.py`` keeps it current
(``ext-proc schema -o schema/gateway.schema.json`` rewrites it). The schema describes
shapes and ranges; what needs the whole config (references between objects, CEL
compilation) only ``ext-proc validate`` checks.

Providers and policies are unions discriminated on ``type``: each type's own model (its
module's ``spec``) is a variant, so a new type appears here by itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ext_proc.config.document import SECTIONS, policy_types, provider_types
from ext_proc.config.fields import MAX_NAME, MODEL_NAME, SLUG
from ext_proc.config.specs import ApplicationSpec, ModelSpec, OrganizationSpec

SCHEMA_ID = "https://ext-proc.dev/schema/gateway.schema.json"
# Where the checked-in copy lives (the repository's schema/ folder).
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schema" / "gateway.schema.json"

SlugKey = Annotated[str, Field(pattern=f"^{SLUG.pattern}$", max_length=MAX_NAME)]
ModelKey = Annotated[str, Field(pattern=f"^{MODEL_NAME.pattern}$", max_length=MAX_NAME)]


def provider_union() -> Any:
    """Every provider type's model, discriminated on ``type``."""
    variants = tuple(t.spec for t in provider_types().values())
    return Annotated[Union[variants], Field(discriminator="type")]  # noqa: UP007


def policy_union() -> Any:
    """Every policy type's params model, discriminated on ``type``."""
    variants = tuple(t.spec for t in policy_types().values())
    return Annotated[Union[variants], Field(discriminator="type")]  # noqa: UP007


@functools.cache
def gateway_file_model() -> type[BaseModel]:
    """The whole file as one model (for its schema: loading goes through
    ``ext_proc.config.document``, which reports every problem with its position)."""
    providers: Any = dict[SlugKey, provider_union()]  # type: ignore[misc]  # built at run time
    policies: Any = dict[SlugKey, policy_union()] | None  # type: ignore[misc]
    fields: dict[str, Any] = {
        "providers": (
            providers,
            Field(description="where models are served, by name"),
        ),
        "models": (
            dict[ModelKey, ModelSpec] | None,
            Field(None, description="the names apps send -> where each is served"),
        ),
        "policies": (
            policies,
            Field(None, description="checks and limits, bound to applications by name"),
        ),
        "applications": (
            dict[SlugKey, ApplicationSpec] | None,
            Field(None, description="who calls the gateway: each with its org and policies"),
        ),
        "organizations": (
            dict[SlugKey, OrganizationSpec | None] | None,
            Field(
                None,
                description="organizations (those applications name need not be listed)",
            ),
        ),
    }
    assert tuple(fields) == SECTIONS
    return create_model(
        "GatewayFile",
        __config__=ConfigDict(extra="forbid", title="gateway.yaml"),
        __doc__="The gateway's configuration: providers, models, policies, applications.",
        **fields,
    )


def gateway_schema() -> dict[str, Any]:
    schema = gateway_file_model().model_json_schema()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }
    # Top-level keys starting with `x-` hold YAML anchors to share.
    schema["patternProperties"] = {"^x-": {}}
    schema["additionalProperties"] = False
    # An entry's name is held to its pattern (not merely described by it).
    for section in schema["properties"].values():
        for option in [section, *section.get("anyOf", [])]:
            if "patternProperties" in option:
                option["additionalProperties"] = False
    return schema


def render_schema() -> str:
    return json.dumps(gateway_schema(), indent=2, ensure_ascii=False) + "\n"
