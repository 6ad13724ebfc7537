"""gateway.yaml loading: typed values, and every problem reported at its line and column."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from ext_proc.config import (
    DEFAULT_ENVIRONMENT,
    ConfigError,
    ConfigIssue,
    DurationError,
    GatewayConfig,
    load_config,
    parse_config,
    parse_duration,
)
from ext_proc.policies.custom_cel import CustomCelParams
from ext_proc.policies.model_allowlist import ModelAllowlistParams
from ext_proc.policies.rate_limit import RateLimitParams
from ext_proc.policies.request_size import RequestSizeParams
from ext_proc.policies.token_limit import TokenLimitParams

DESIGN_EXAMPLE = """\
providers:
  openai:        {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
  azure-eastus:  {type: azure_openai, base_url: "https://contoso.openai.azure.com",
                  api_version: "2024-10-21", api_key_env: AZURE_OPENAI_API_KEY}
models:                      # the name apps send  ->  where it is served
  gpt-4o-mini:   {provider: azure-eastus, deployment: gpt-4o-mini-prod}
  gpt-4.1:       {provider: openai}
policies:
  sixty-per-minute:  {type: rate_limit, requests: 60, window: 60s}          # scope: app
  tokens-per-minute: {type: token_limit, tokens: 100000, window: 60s}
  mini-only:         {type: model_allowlist, models: [gpt-4o-mini]}
  small-requests:    {type: request_size, max_bytes: 262144, max_messages: 64}
  short-prompts:     {type: custom_cel, pre_check_expression: "estimated_tokens < 4000",
                      post_check_expression: "total_tokens < 8000",
                      message: "prompts must stay under 4000 tokens"}
applications:
  support-bot:   {org: acme, policies: [sixty-per-minute, tokens-per-minute, mini-only]}
"""

OPENAI = """\
providers:
  openai: {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
"""


def issues(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    return list(info.value.issues)


def only_issue(text: str) -> ConfigIssue:
    found = issues(text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def position(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the `occurrence`-th `needle` in `text`."""
    index = -1
    for _ in range(occurrence + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def at(issue: ConfigIssue) -> tuple[int, int]:
    return issue.line, issue.column


# --- the valid example ---------------------------------------------------------


def test_design_example_parses_with_the_right_values() -> None:
    config = parse_config(DESIGN_EXAMPLE, "gateway.yaml")

    assert isinstance(config, GatewayConfig)
    assert config.source == "gateway.yaml"
    assert list(config.providers) == ["openai", "azure-eastus"]
    openai, azure = config.providers["openai"], config.providers["azure-eastus"]
    assert (openai.type, openai.base_url, openai.api_key_env) == (
        "openai",
        "https://api.openai.com",
        "OPENAI_API_KEY",
    )
    assert openai.has_credential and openai.tls and openai.port == 443
    assert dict(openai.options) == {} and openai.inject_stream_usage is True
    assert (openai.timeout, openai.connect_timeout) == (60.0, 5.0)
    assert openai.retries.attempts == 1
    assert openai.retries.on == ("connect-failure", "reset", "retriable-status-codes")
    assert openai.retries.retriable_status_codes == (502, 503, 504)
    assert azure.type == "azure_openai" and azure.options["api_version"] == "2024-10-21"
    assert azure.host == "contoso.openai.azure.com"

    assert list(config.models) == ["gpt-4o-mini", "gpt-4.1"]
    mini = config.models["gpt-4o-mini"]
    assert (mini.provider, mini.deployment) == ("azure-eastus", "gpt-4o-mini-prod")
    assert config.models["gpt-4.1"].deployment == "gpt-4.1"  # defaults to the model name
    assert config.provider_of(mini) is azure
    assert mini.encoding_name == "o200k_base"

    assert list(config.policies) == [
        "sixty-per-minute",
        "tokens-per-minute",
        "mini-only",
        "small-requests",
        "short-prompts",
    ]
    assert config.policies["sixty-per-minute"].params == RateLimitParams(60, 60.0, "app")
    assert config.policies["tokens-per-minute"].params == TokenLimitParams(
        100000, 60.0, "app", 4096
    )
    allowlist = config.policies["mini-only"].params
    assert isinstance(allowlist, ModelAllowlistParams)
    assert allowlist.models == ("gpt-4o-mini",)
    assert config.policies["small-requests"].params == RequestSizeParams(262144, 64)
    cel_params = config.policies["short-prompts"].params
    assert isinstance(cel_params, CustomCelParams)
    assert cel_params.message == "prompts must stay under 4000 tokens"
    assert cel_params.status == 403
    assert all(p.enabled and p.on_error == "allow" for p in config.policies.values())

    app = config.applications["support-bot"]
    assert app.org == "acme" and app.description is None
    assert app.policies == ("sixty-per-minute", "tokens-per-minute", "mini-only")
    assert list(app.environments) == [DEFAULT_ENVIRONMENT]
    assert [p.name for p in config.application_policies("support-bot")] == list(app.policies)


def test_config_objects_are_immutable() -> None:
    config = parse_config(DESIGN_EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers["openai"].base_url = "http://evil"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["new"] = config.models["gpt-4.1"]  # type: ignore[index]


def test_examples_gateway_yaml_loads(repo_root: Path) -> None:
    config = load_config(repo_root / "examples" / "gateway.yaml")

    mock = config.providers["mock"]
    assert (mock.type, mock.base_url, mock.has_credential) == (
        "openai",
        "http://127.0.0.1:8001",
        False,
    )
    assert set(config.models) == {
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1",
        "text-embedding-3-small",
        "gpt-4o-azure",
        "claude-sonnet-4",
    }
    # The mock plays all three provider types, on the same port.
    assert {p.type for p in config.providers.values()} == {"openai", "azure_openai", "anthropic"}
    assert {p.base_url for p in config.providers.values()} == {"http://127.0.0.1:8001"}
    assert config.models["claude-sonnet-4"].provider == "mock-anthropic"
    assert config.applications["demo-app"].org == "demo"


def test_examples_production_yaml_loads(repo_root: Path) -> None:
    config = load_config(repo_root / "examples" / "production.yaml")
    assert all(p.tls and p.has_credential for p in config.providers.values())
    assert config.models["gpt-4o-mini"].deployment == "gpt-4o-mini-prod"


# --- errors, each at its line and column --------------------------------------


def test_bad_window_points_at_the_value_and_lists_units() -> None:
    text = OPENAI + "policies:\n  per-minute: {type: rate_limit, requests: 60, window: 60x}\n"
    issue = only_issue(text)
    assert issue.path == "policies.per-minute.window"
    assert at(issue) == position(text, "60x")
    assert "'60x'" in issue.message and "ms, s, m, h or d" in issue.message


def test_unknown_policy_type_lists_the_known_ones() -> None:
    text = OPENAI + "policies:\n  p:\n    type: rate_limt\n    requests: 1\n"
    issue = only_issue(text)
    assert issue.path == "policies.p.type"
    assert at(issue) == position(text, "rate_limt")
    assert "did you mean 'rate_limit'?" in issue.message
    for known in ("rate_limit", "token_limit", "model_allowlist", "request_size", "custom_cel"):
        assert known in issue.message


def test_model_on_an_undeclared_provider_names_it_and_the_declared_ones() -> None:
    text = OPENAI + "models:\n  gpt-4.1: {provider: azure}\n"
    issue = only_issue(text)
    assert issue.path == "models.gpt-4.1.provider"
    assert at(issue) == position(text, "azure")
    assert "unknown provider 'azure'" in issue.message and "declared: openai" in issue.message


def test_a_provider_with_errors_does_not_also_fail_its_models() -> None:
    text = (
        "providers:\n  local: {type: openai, base_url: nope}\nmodels:\n  llama: {provider: local}\n"
    )
    assert [issue.path for issue in issues(text)] == ["providers.local.base_url"]


def test_binding_to_a_missing_policy_points_at_the_list_item() -> None:
    text = (
        OPENAI + "policies:\n  limit: {type: rate_limit, requests: 1, window: 1s}\n"
        "applications:\n  bot: {org: acme, policies: [limit, limt]}\n"
    )
    issue = only_issue(text)
    assert issue.path == "applications.bot.policies[1]"
    assert at(issue) == position(text, "limt]")
    assert "unknown policy 'limt'" in issue.message and "did you mean 'limit'?" in issue.message


def test_duplicate_key_is_an_error_at_the_second_key() -> None:
    text = OPENAI + "models:\n  gpt-4.1: {provider: openai}\n  gpt-4.1: {provider: openai}\n"
    issue = only_issue(text)
    assert issue.path == "models.gpt-4.1"
    assert at(issue) == position(text, "gpt-4.1:", occurrence=1)
    assert "duplicate key 'gpt-4.1'" in issue.message and "line 4" in issue.message


def test_duplicate_field_inside_an_entry_is_an_error() -> None:
    text = OPENAI + "models:\n  gpt-4.1: {provider: openai, provider: other}\n"
    issue = only_issue(text)
    assert issue.path == "models.gpt-4.1.provider"
    assert at(issue) == position(text, "provider: other")


def test_unknown_field_suggests_the_closest_name() -> None:
    text = OPENAI + "policies:\n  p:\n    type: rate_limit\n    requests: 5\n    windw: 60s\n"
    found = issues(text)
    unknown = next(issue for issue in found if issue.path == "policies.p.windw")
    assert at(unknown) == position(text, "windw")
    assert unknown.message == "unknown field 'windw'; did you mean 'window'?"
    assert any(i.message == "missing required field 'window'" for i in found)


def test_unknown_top_level_key_suggests_and_x_keys_are_allowed() -> None:
    text = OPENAI + "x-defaults: &d {type: openai}\nmodel:\n  a: {provider: openai}\n"
    issue = only_issue(text)
    assert issue.path == "model"
    assert at(issue) == position(text, "model:")
    assert "did you mean 'models'?" in issue.message


def test_wrong_types_name_the_expected_type() -> None:
    text = OPENAI + "policies:\n  p: {type: rate_limit, requests: sixty, window: 60s}\n"
    issue = only_issue(text)
    assert issue.path == "policies.p.requests"
    assert at(issue) == position(text, "sixty")
    assert issue.message == "expected an integer, got a string ('sixty')"

    text = "providers:\n  - openai\n"
    issue = only_issue(text)
    assert issue.path == "providers"
    assert "expected a mapping" in issue.message and "got a list" in issue.message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("api.openai.com", "must start with http:// or https://"),
        ("ftp://example.com", "must start with http:// or https://"),
        ("https://", "has no host"),
        ("https://user:secret@example.com", "must not hold credentials"),
        ("https://example.com/v1?x=1", "must not have a query"),
        ("http://localhost:99999", "invalid port"),
    ],
)
def test_bad_base_url_is_rejected(url: str, problem: str) -> None:
    text = f'providers:\n  p: {{type: openai, base_url: "{url}"}}\n'
    issue = only_issue(text)
    assert issue.path == "providers.p.base_url"
    assert at(issue) == position(text, f'"{url}"')
    assert problem in issue.message


def test_base_url_keeps_a_path_prefix_and_drops_the_trailing_slash() -> None:
    text = (
        "providers:\n"
        "  proxy: {type: openai, base_url: 'https://Gateway.Example.com:8443/proxy/'}\n"
        "  local: {type: openai, base_url: 'http://127.0.0.1:8001/'}\n"
    )
    config = parse_config(text)
    proxy, local = config.providers["proxy"], config.providers["local"]
    assert proxy.base_url == "https://gateway.example.com:8443/proxy"
    assert (proxy.host, proxy.port, proxy.path_prefix) == ("gateway.example.com", 8443, "/proxy")
    assert local.base_url == "http://127.0.0.1:8001" and not local.tls
    assert not local.has_credential


def test_azure_provider_without_api_version_points_at_the_provider() -> None:
    text = (
        'providers:\n  azure-eastus: {type: azure_openai, base_url: "https://x.openai.azure.com"}\n'
    )
    issue = only_issue(text)
    assert issue.path == "providers.azure-eastus.api_version"
    assert at(issue) == position(text, "azure-eastus")
    assert issue.message == "missing required field 'api_version'"


def test_unquoted_api_version_is_kept_as_written() -> None:
    text = (
        "providers:\n  az:\n    type: azure_openai\n    base_url: https://x.openai.azure.com\n"
        "    api_version: 2024-10-21\n"
    )
    assert parse_config(text).providers["az"].options["api_version"] == "2024-10-21"


def test_api_version_on_a_non_azure_provider_is_rejected() -> None:
    text = 'providers:\n  o: {type: openai, base_url: "https://a.b", api_version: "2024-10-21"}\n'
    assert only_issue(text).path == "providers.o.api_version"


def test_anthropic_defaults_and_stream_usage_injection() -> None:
    text = "providers:\n  claude: {type: anthropic, base_url: https://api.anthropic.com}\n"
    claude = parse_config(text).providers["claude"]
    assert claude.options["anthropic_version"] == "2023-06-01"
    assert claude.inject_stream_usage is False

    text = (
        "providers:\n  claude: {type: anthropic, base_url: https://api.anthropic.com,"
        " inject_stream_usage: true}\n"
    )
    assert only_issue(text).path == "providers.claude.inject_stream_usage"


def test_provider_credentials_are_env_names_or_files_not_both() -> None:
    text = 'providers:\n  o: {type: openai, base_url: "https://a.b", api_key_env: "sk-abc"}\n'
    issue = only_issue(text)
    assert issue.path == "providers.o.api_key_env"
    assert "not an environment variable name" in issue.message

    text = (
        "providers:\n  o: {type: openai, base_url: 'https://a.b', api_key_env: K,"
        " api_key_file: /run/key}\n"
    )
    assert only_issue(text).path == "providers.o.api_key_file"

    text = "providers:\n  o: {type: openai, base_url: 'https://a.b', api_key_file: /run/key}\n"
    provider = parse_config(text).providers["o"]
    assert provider.api_key_file == "/run/key" and provider.has_credential


def test_unknown_provider_type_lists_the_known_types() -> None:
    text = "providers:\n  o: {type: openia, base_url: 'https://a.b'}\n"
    issue = only_issue(text)
    assert issue.path == "providers.o.type"
    assert all(name in issue.message for name in ("openai", "azure_openai", "anthropic"))
    assert "did you mean 'openai'?" in issue.message


def test_provider_headers_reject_hop_by_hop_and_credentials() -> None:
    text = (
        "providers:\n  o:\n    type: openai\n    base_url: https://a.b\n    headers:\n"
        "      X-Team: platform\n      Connection: close\n      Authorization: Bearer x\n"
    )
    found = {issue.path: issue for issue in issues(text)}
    assert set(found) == {"providers.o.headers.Connection", "providers.o.headers.Authorization"}
    assert "hop-by-hop" in found["providers.o.headers.Connection"].message
    assert "api_key_env" in found["providers.o.headers.Authorization"].message
    assert at(found["providers.o.headers.Authorization"]) == position(text, "Authorization")

    ok = "providers:\n  o: {type: openai, base_url: https://a.b, headers: {X-Team: platform}}\n"
    assert dict(parse_config(ok).providers["o"].headers) == {"x-team": "platform"}


def test_pass_headers_names_only_the_scoping_headers() -> None:
    text = (
        "providers:\n  o:\n    type: openai\n    base_url: https://a.b\n"
        "    pass_headers: [OpenAI-Organization, x-team]\n"
    )
    issue = only_issue(text)
    assert issue.path == "providers.o.pass_headers[1]"
    assert "openai-organization, openai-project, anthropic-beta" in issue.message

    ok = "providers:\n  o: {type: openai, base_url: https://a.b, pass_headers: [OpenAI-Project]}\n"
    provider = parse_config(ok).providers["o"]
    assert provider.pass_headers == ("openai-project",)
    assert provider.stripped_headers == ("openai-organization", "anthropic-beta")
    plain = parse_config("providers:\n  o: {type: openai, base_url: https://a.b}\n")
    assert plain.providers["o"].stripped_headers == (
        "openai-organization",
        "openai-project",
        "anthropic-beta",
    )


def test_retries_read_the_on_key_as_a_name_and_check_conditions() -> None:
    text = (
        "providers:\n  o:\n    type: openai\n    base_url: https://a.b\n"
        "    timeout: 2m\n    connect_timeout: 500ms\n"
        "    retries: {attempts: 3, on: [5xx, reset]}\n"
    )
    provider = parse_config(text).providers["o"]
    assert (provider.timeout, provider.connect_timeout) == (120.0, 0.5)
    assert (provider.retries.attempts, provider.retries.on) == (3, ("5xx", "reset"))

    bad = text.replace("[5xx, reset]", "[5xx, rest]").replace("attempts: 3", "attempts: 6")
    found = {issue.path: issue for issue in issues(bad)}
    assert set(found) == {"providers.o.retries.attempts", "providers.o.retries.on[1]"}
    assert at(found["providers.o.retries.on[1]"]) == position(bad, "rest]")
    assert "did you mean 'reset'?" in found["providers.o.retries.on[1]"].message
    assert "between 0 and 5" in found["providers.o.retries.attempts"].message


def test_encoding_follows_the_served_model_then_the_name() -> None:
    text = OPENAI + (
        "models:\n"
        "  my-gpt4: {provider: openai, deployment: gpt-4}\n"  # the model served decides
        "  gpt-35-turbo: {provider: openai, deployment: prod-chat}\n"  # else the name
        "  gpt-4o: {provider: openai, deployment: prod-chat, encoding: cl100k_base}\n"
        "  acme: {provider: openai, deployment: acme-7b}\n"  # else the default
    )
    models = parse_config(text).models
    assert models["my-gpt4"].encoding_name == "cl100k_base"
    assert models["gpt-35-turbo"].encoding_name == "cl100k_base"
    assert models["gpt-4o"].encoding_name == "cl100k_base"  # the override wins
    assert models["acme"].encoding_name == "o200k_base"


def test_model_names_aliases_and_encodings() -> None:
    text = OPENAI + (
        "models:\n"
        "  meta/llama-3.1:8b: {provider: openai, encoding: cl100k_base}\n"
        "  gpt-4.1: {provider: openai, aliases: [gpt-4.1-latest, best]}\n"
    )
    config = parse_config(text)
    assert config.models["meta/llama-3.1:8b"].encoding_name == "cl100k_base"
    assert config.find_model("best") is config.models["gpt-4.1"]
    assert config.find_model("gpt-4.1") is config.models["gpt-4.1"]
    assert config.find_model("nope") is None

    clash = OPENAI + (
        "models:\n  a: {provider: openai, aliases: [b]}\n  b: {provider: openai, aliases: [x]}\n"
        "  c: {provider: openai, aliases: [x], encoding: p50k}\n"
    )
    found = {issue.path: issue for issue in issues(clash)}
    assert set(found) == {"models.a.aliases[0]", "models.c.aliases[0]", "models.c.encoding"}
    assert "already a model name" in found["models.a.aliases[0]"].message
    assert "already an alias of model 'b'" in found["models.c.aliases[0]"].message
    assert "o200k_base" in found["models.c.encoding"].message


def test_names_are_validated() -> None:
    text = (
        "providers:\n  OpenAI: {type: openai, base_url: 'https://a.b'}\n"
        "models:\n  'bad model': {provider: OpenAI}\n"
    )
    found = {issue.path: issue for issue in issues(text)}
    assert set(found) == {"providers.OpenAI", "models.bad model"}
    assert "invalid provider name 'OpenAI'" in found["providers.OpenAI"].message
    assert at(found["models.bad model"]) == position(text, "'bad model'")


def test_application_environments_add_policies_after_the_apps_own() -> None:
    text = OPENAI + (
        "policies:\n  a: {type: rate_limit, requests: 1, window: 1s}\n"
        "  b: {type: request_size, max_bytes: 10}\n"
        "applications:\n  bot:\n    org: acme\n    policies: [a]\n"
        "    environments:\n      prod: {policies: [b]}\n      dev:\n"
    )
    app = parse_config(text).applications["bot"]
    assert list(app.environments) == ["default", "prod", "dev"]
    assert app.policy_names("prod") == ("a", "b")
    assert app.policy_names("dev") == ("a",)

    bad = text.replace("[b]", "[a]")
    issue = only_issue(bad)
    assert issue.path == "applications.bot.environments.prod.policies[0]"
    assert "already bound to the application" in issue.message


def test_application_needs_an_org_slug_and_unique_policies() -> None:
    text = OPENAI + (
        "policies:\n  a: {type: rate_limit, requests: 1, window: 1s}\n"
        "applications:\n  bot: {policies: [a, a]}\n  other: {org: 'ACME Inc'}\n"
    )
    found = {issue.path: issue for issue in issues(text)}
    assert set(found) == {
        "applications.bot.org",
        "applications.bot.policies[1]",
        "applications.other.org",
    }
    assert found["applications.bot.org"].message == "missing required field 'org'"
    assert at(found["applications.bot.org"]) == position(text, "bot:")


def test_several_errors_are_all_reported_sorted_by_line() -> None:
    text = (
        "providers:\n"
        "  azure: {type: azure_openai, base_url: https://x.openai.azure.com}\n"
        "models:\n  gpt-4.1: {provider: nowhere}\n"
        "policies:\n  p: {type: rate_limit, requests: 0, window: 60x}\n"
        "applications:\n  bot: {org: acme, policies: [missing]}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    error = info.value
    assert [issue.path for issue in error.issues] == [
        "providers.azure.api_version",
        "models.gpt-4.1.provider",
        "policies.p.requests",
        "policies.p.window",
        "applications.bot.policies[0]",
    ]
    lines = str(error).splitlines()
    assert len(lines) == 5
    assert (
        lines[0] == "gw.yaml:2:3: providers.azure.api_version: missing required field 'api_version'"
    )
    assert lines[2].startswith("gw.yaml:6:") and "must be at least 1" in lines[2]


def test_yaml_syntax_error_is_one_issue_with_its_line() -> None:
    text = OPENAI + "models:\n  gpt-4.1: {provider: openai\n  other: 1\n"
    issue = only_issue(text)
    assert issue.line in (5, 6)  # where the parser noticed the unclosed flow mapping
    assert issue.message.startswith("invalid YAML:")
    assert "line 4" in issue.message  # where the mapping started


def test_empty_file_declares_no_providers() -> None:
    issue = only_issue("# nothing yet\n")
    assert (issue.path, issue.message) == ("providers", "no providers declared")
    assert only_issue("providers: {}\n").message == "no providers declared"


def test_merge_keys_share_fields() -> None:
    text = (
        "x-base: &base {type: openai, timeout: 10s}\n"
        "providers:\n"
        "  a: {<<: *base, base_url: 'http://a:1'}\n"
        "  b: {<<: *base, base_url: 'http://b:1', timeout: 20s}\n"
    )
    config = parse_config(text)
    assert config.providers["a"].timeout == 10.0 and config.providers["b"].timeout == 20.0


def test_load_config_reports_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read the file" in str(info.value)

    path = tmp_path / "latin1.yaml"
    path.write_bytes(OPENAI.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.column) == (str(path), 3, 6)
    assert "not UTF-8" in issue.message


def test_issue_format() -> None:
    issue = ConfigIssue("gw.yaml", 3, 7, "policies.p.window", "bad")
    assert str(issue) == "gw.yaml:3:7: policies.p.window: bad"
    assert str(ConfigIssue("gw.yaml", 1, 1, "", "invalid YAML")) == "gw.yaml:1:1: invalid YAML"
    error = ConfigError([issue, ConfigIssue("gw.yaml", 1, 2, "a", "first")])
    assert str(error).splitlines() == ["gw.yaml:1:2: a: first", str(issue)]


# --- fingerprint ----------------------------------------------------------------


def test_fingerprint_ignores_key_order_layout_and_explicit_defaults() -> None:
    reordered = """\
applications:
  support-bot:
    policies: [sixty-per-minute, tokens-per-minute, mini-only]
    org: acme
policies:
  short-prompts:
    message: "prompts must stay under 4000 tokens"
    post_check_expression: "total_tokens < 8000"
    pre_check_expression: "estimated_tokens < 4000"
    type: custom_cel
  small-requests: {max_messages: 64, max_bytes: 262144, type: request_size}
  mini-only: {models: [gpt-4o-mini], type: model_allowlist}
  tokens-per-minute: {window: 1m, tokens: 100000, type: token_limit}
  sixty-per-minute: {window: 60, requests: 60, type: rate_limit, scope: app, enabled: true}
models:
  gpt-4.1: {provider: openai}
  gpt-4o-mini: {deployment: gpt-4o-mini-prod, provider: azure-eastus}
providers:
  azure-eastus:
    api_key_env: AZURE_OPENAI_API_KEY
    api_version: "2024-10-21"
    base_url: "https://contoso.openai.azure.com/"
    type: azure_openai
  openai: {api_key_env: OPENAI_API_KEY, base_url: "https://api.openai.com", type: openai}
"""
    original = parse_config(DESIGN_EXAMPLE)
    assert len(original.fingerprint) == 64
    assert parse_config(reordered).fingerprint == original.fingerprint
    assert parse_config(DESIGN_EXAMPLE).fingerprint == original.fingerprint


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("window: 60s}", "window: 61s}"),
        ("[sixty-per-minute, tokens-per-minute, mini-only]", "[tokens-per-minute, mini-only]"),
        ("gpt-4o-mini-prod", "gpt-4o-mini-canary"),
        ('"total_tokens < 8000"', '"total_tokens < 8001"'),
    ],
)
def test_fingerprint_changes_with_the_content(old: str, new: str) -> None:
    changed = DESIGN_EXAMPLE.replace(old, new, 1)
    assert changed != DESIGN_EXAMPLE
    assert parse_config(changed).fingerprint != parse_config(DESIGN_EXAMPLE).fingerprint


def test_fingerprint_follows_application_policy_order() -> None:
    swapped = DESIGN_EXAMPLE.replace(
        "[sixty-per-minute, tokens-per-minute, mini-only]",
        "[tokens-per-minute, sixty-per-minute, mini-only]",
    )
    assert parse_config(swapped).fingerprint != parse_config(DESIGN_EXAMPLE).fingerprint


# --- durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("45", 45.0),
        (60, 60.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["60x", "", "s", "-5s", "1h30", "5 m", -1, 0, "0s", True])
def test_parse_duration_rejects(value: str | int | float) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(value)
    assert str(info.value)


def test_parse_duration_error_lists_units_and_zero_can_be_allowed() -> None:
    with pytest.raises(DurationError, match=r"ms, s, m, h or d"):
        parse_duration("60x")
    assert parse_duration("0s", allow_zero=True) == 0.0


def test_a_file_with_two_documents_is_rejected() -> None:
    text = textwrap.dedent(
        """\
        providers:
          o: {type: openai, base_url: 'https://a.b'}
        ---
        models: {}
        """
    )
    issue = only_issue(text)
    assert issue.line == 3 and issue.message.startswith("invalid YAML:")
