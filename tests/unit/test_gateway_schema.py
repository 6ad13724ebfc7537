"""schema/gateway.schema.json: generated from the declared models, kept current, and
usable on its own (the example files validate against it; typos and bad values do not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from ext_proc.config.jsonschema import SCHEMA_FILE, gateway_schema, render_schema
from ext_proc.policies import POLICY_TYPES
from ext_proc.routing.providers import PROVIDER_TYPES


class _EditorLoader(yaml.SafeLoader):
    """YAML as editors read it (1.2: `2024-10-21` is a string, not a date)."""


_EditorLoader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(text: str) -> Any:
    return yaml.load(text, Loader=_EditorLoader)


def test_the_checked_in_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text() == render_schema(), (
        "schema/gateway.schema.json is stale: run "
        "`.venv/bin/ext-proc schema -o schema/gateway.schema.json`"
    )


def test_every_provider_and_policy_type_is_a_variant() -> None:
    schema = gateway_schema()
    providers = schema["properties"]["providers"]["patternProperties"]
    (variants,) = providers.values()
    assert set(variants["discriminator"]["mapping"]) == set(PROVIDER_TYPES)
    policies = schema["properties"]["policies"]["anyOf"][0]["patternProperties"]
    (variants,) = policies.values()
    assert set(variants["discriminator"]["mapping"]) == set(POLICY_TYPES)


@pytest.mark.parametrize("name", ["gateway.yaml", "production.yaml"])
def test_example_files_validate(repo_root: Path, name: str) -> None:
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA_FILE.read_text()))
    document = load((repo_root / "examples" / name).read_text())
    assert [str(e) for e in validator.iter_errors(document)] == []


@pytest.mark.parametrize(
    "text",
    [
        "providers: {o: {type: openia, base_url: 'https://a.b'}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b', timeout: 60x}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b', api_version: '2024-10-21'}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b'}}\n"
        "policies: {p: {type: rate_limit, requests: 0, window: 1s}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b'}}\n"
        "policies: {p: {type: rate_limit, requests: 1, windw: 1s}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b'}}\n"
        "models: {m: {provider: o, price: {input: 1}}}\n",
        "providers: {o: {type: openai, base_url: 'https://a.b'}}\nmodel: {}\n",
        "providers: {OpenAI: {type: openai, base_url: 'https://a.b'}}\n",
    ],
)
def test_mistakes_are_caught_by_the_schema_alone(text: str) -> None:
    validator = jsonschema_rs.validator_for(gateway_schema())
    assert not validator.is_valid(load(text))


def test_x_keys_hold_anchors() -> None:
    validator = jsonschema_rs.validator_for(gateway_schema())
    text = "x-base: &b {type: openai}\nproviders: {o: {<<: *b, base_url: 'https://a.b'}}\n"
    assert validator.is_valid(load(text))
