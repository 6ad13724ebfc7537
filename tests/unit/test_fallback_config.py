"""A model's `fallbacks:`: targets, priorities, weights, prices, and errors naming the field."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ext_proc.config import ConfigError, ConfigIssue, Target, parse_config
from ext_proc.stores.catalog import specs_of
from ext_proc.usage.pricing import Price

HEAD = """\
providers:
  azure-east: {type: azure_openai, base_url: "https://east.openai.azure.com",
               api_version: "2024-10-21", api_key_env: AZ_E}
  azure-west: {type: azure_openai, base_url: "https://west.openai.azure.com",
               api_version: "2024-10-21", api_key_env: AZ_W}
  openai: {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
  anthropic: {type: anthropic, base_url: "https://api.anthropic.com",
              api_key_env: ANTHROPIC_API_KEY}
models:
"""


def issues(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + text, "gw.yaml")
    return list(info.value.issues)


def test_targets_in_order_with_default_priorities_and_weights() -> None:
    config = parse_config(
        HEAD + "  gpt-4o:\n"
        "    provider: azure-east\n"
        "    deployment: gpt-4o-prod\n"
        "    fallbacks:\n"
        "      - {provider: azure-west, deployment: gpt-4o-prod}\n"
        "      - {provider: openai}\n"
        "      - {provider: anthropic, deployment: claude-sonnet-4-5,\n"
        "         price: {input: 3, output: 15}}\n"
    )
    model = config.models["gpt-4o"]
    assert model.targets == (
        Target("azure-east", "gpt-4o-prod", 1, 0),
        Target("azure-west", "gpt-4o-prod", 1, 1),
        Target("openai", "gpt-4o", 1, 2),
        Target("anthropic", "claude-sonnet-4-5", 1, 3, Price(Decimal(3), Decimal(15))),
    )
    assert model.attempt_timeout is None


def test_weighted_targets_share_a_priority() -> None:
    config = parse_config(
        HEAD + "  gpt-4o:\n"
        "    provider: azure-east\n"
        "    deployment: gpt-4o-prod\n"
        "    weight: 3\n"
        "    attempt_timeout: 20s\n"
        "    fallbacks:\n"
        "      - {provider: azure-west, deployment: gpt-4o-prod, priority: 0, weight: 1}\n"
        "      - {provider: openai}\n"
    )
    model = config.models["gpt-4o"]
    assert [(t.provider, t.priority, t.weight) for t in model.targets] == [
        ("azure-east", 0, 3),
        ("azure-west", 0, 1),
        ("openai", 1, 1),
    ]
    assert model.attempt_timeout == 20.0


def test_a_model_without_fallbacks_has_one_target_and_an_unchanged_fingerprint() -> None:
    plain = parse_config(HEAD + "  gpt-4o: {provider: openai}\n")
    assert plain.models["gpt-4o"].targets == (Target("openai", "gpt-4o"),)
    assert "fallbacks" not in plain.canonical()["models"]["gpt-4o"]
    assert "weight" not in plain.canonical()["models"]["gpt-4o"]


def test_fallbacks_survive_the_catalogs_json_form() -> None:
    config = parse_config(
        HEAD + "  gpt-4o:\n"
        "    provider: azure-east\n"
        "    deployment: gpt-4o-prod\n"
        "    weight: 2\n"
        "    attempt_timeout: 5s\n"
        "    fallbacks: [{provider: openai, price: {input: 2.5, output: 10}}]\n"
    )
    specs = specs_of(config)  # raises unless the specs load back to the same config
    assert specs.models["gpt-4o"]["fallbacks"] == [
        {
            "provider": "openai",
            "deployment": "gpt-4o",
            "weight": 1,
            "priority": 1,
            "price": {"input": 2.5, "output": 10},
        }
    ]
    assert specs.parse().models["gpt-4o"] == config.models["gpt-4o"]


@pytest.mark.parametrize(
    ("entry", "path", "says"),
    [
        (
            "fallbacks: [{provider: opnai}]",
            "models.gpt-4o.fallbacks[0].provider",
            "did you mean 'openai'",
        ),
        (
            "fallbacks: [{deployment: x}]",
            "models.gpt-4o.fallbacks[0].provider",
            "missing required field",
        ),
        (
            "fallbacks: [{provider: openai, wieght: 2}]",
            "models.gpt-4o.fallbacks[0].wieght",
            "did you mean 'weight'",
        ),
        (
            "fallbacks: [{provider: openai, weight: 0}]",
            "models.gpt-4o.fallbacks[0].weight",
            "between 1 and 10000",
        ),
        ("fallbacks: []", "models.gpt-4o.fallbacks", "at least one fallback"),
        ("fallbacks: {provider: openai}", "models.gpt-4o.fallbacks", "a list of fallback targets"),
        (
            "fallbacks: [{provider: azure-east, deployment: gpt-4o-prod}]",
            "models.gpt-4o.fallbacks[0]",
            "already a target",
        ),
        (
            "fallbacks: [{provider: azure-west, deployment: 'bad name'}]",
            "models.gpt-4o.fallbacks[0].deployment",
            "not an Azure deployment name",
        ),
        (
            "fallbacks: [{provider: openai, price: {input: 1}}]",
            "models.gpt-4o.fallbacks[0].price.output",
            "missing required field",
        ),
        ("weight: 2", "models.gpt-4o.weight", "no effect without fallbacks"),
        ("attempt_timeout: 5s", "models.gpt-4o.attempt_timeout", "no effect without fallbacks"),
        (
            "fallbacks: [{provider: openai}, {provider: anthropic, deployment: c, priority: 0}]",
            "models.gpt-4o.fallbacks[1].priority",
            "below the target before it (1)",
        ),
        (
            "fallbacks: ["
            + ", ".join(f"{{provider: openai, deployment: {d}}}" for d in "abcdefgh")
            + "]",
            "models.gpt-4o.fallbacks",
            "at most 7 fallbacks",
        ),
    ],
)
def test_bad_fallbacks_name_the_field(entry: str, path: str, says: str) -> None:
    found = issues("  gpt-4o: {provider: azure-east, deployment: gpt-4o-prod, " + entry + "}\n")
    assert [issue.path for issue in found] == [path], [str(i) for i in found]
    assert says in found[0].message
    assert found[0].line == HEAD.count("\n") + 1
