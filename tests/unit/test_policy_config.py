"""Each policy type's params from gateway.yaml, and CEL checked at load."""

from __future__ import annotations

import dataclasses

import pytest

from ext_proc.config import ConfigError, ConfigIssue, GatewayConfig, parse_config
from ext_proc.policies import COMMON_FIELDS, POLICY_TYPES
from ext_proc.policies.custom_cel import (
    POST_CHECK_VARIABLES,
    PRE_CHECK_VARIABLES,
    CustomCelParams,
)
from ext_proc.policies.model_allowlist import ModelAllowlistParams
from ext_proc.policies.rate_limit import RateLimitParams
from ext_proc.policies.request_size import RequestSizeParams
from ext_proc.policies.token_limit import TokenLimitParams

HEAD = """\
providers:
  openai: {type: openai, base_url: "https://api.openai.com"}
models:
  gpt-4o-mini: {provider: openai, aliases: [mini]}
  gpt-4o: {provider: openai}
policies:
"""


def load(policies: str) -> GatewayConfig:
    return parse_config(HEAD + policies, "gw.yaml")


def issues(policies: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load(policies)
    return list(info.value.issues)


def only_issue(policies: str) -> ConfigIssue:
    found = issues(policies)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def position(policies: str, needle: str) -> tuple[int, int]:
    text = HEAD + policies
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def at(issue: ConfigIssue) -> tuple[int, int]:
    return issue.line, issue.column


def test_registry_holds_every_type_and_its_fields() -> None:
    assert set(POLICY_TYPES) == {
        "rate_limit",
        "token_limit",
        "budget",
        "model_allowlist",
        "request_size",
        "custom_cel",
    }
    for name, policy_type in POLICY_TYPES.items():
        assert policy_type.name == name
        yaml_fields = {f.name for f in dataclasses.fields(policy_type.params_type) if f.compare}
        assert yaml_fields == set(policy_type.fields), name
        assert not set(policy_type.fields) & set(COMMON_FIELDS)


def test_common_fields_enabled_and_on_error() -> None:
    config = load(
        "  p: {type: rate_limit, requests: 1, window: 1s, enabled: false, on_error: deny}\n"
    )
    policy = config.policies["p"]
    assert (policy.enabled, policy.on_error) == (False, "deny")

    issue = only_issue("  p: {type: rate_limit, requests: 1, window: 1s, on_error: reject}\n")
    assert issue.path == "policies.p.on_error"
    assert "allow, deny" in issue.message


# --- rate_limit / token_limit ---------------------------------------------------


def test_rate_limit_params() -> None:
    config = load(
        "  a: {type: rate_limit, requests: 60, window: 60s}\n"
        "  b: {type: rate_limit, requests: 5, window: 1h, scope: org}\n"
    )
    assert config.policies["a"].params == RateLimitParams(requests=60, window=60.0, scope="app")
    assert config.policies["b"].params == RateLimitParams(requests=5, window=3600.0, scope="org")


def test_rate_limit_rejects_bad_values() -> None:
    policies = "  a: {type: rate_limit, requests: 0, window: 0s, scope: apps, tokens: 5}\n"
    found = {issue.path: issue for issue in issues(policies)}
    assert set(found) == {
        "policies.a.requests",
        "policies.a.window",
        "policies.a.scope",
        "policies.a.tokens",
    }
    assert "at least 1" in found["policies.a.requests"].message
    assert "zero" in found["policies.a.window"].message
    assert "did you mean 'app'?" in found["policies.a.scope"].message
    assert "unknown field 'tokens'" in found["policies.a.tokens"].message


def test_rate_limit_requires_requests_and_window() -> None:
    found = issues("  a: {type: rate_limit}\n")
    assert sorted(issue.message for issue in found) == [
        "missing required field 'requests'",
        "missing required field 'window'",
    ]
    assert all(at(issue) == position("  a: {type: rate_limit}\n", "a:") for issue in found)


def test_token_limit_params() -> None:
    config = load(
        "  a: {type: token_limit, tokens: 100000, window: 1m}\n"
        "  b: {type: token_limit, tokens: 500, window: 1d, scope: key, default_max_tokens: 256}\n"
    )
    assert config.policies["a"].params == TokenLimitParams(100000, 60.0, "app", 4096)
    assert config.policies["b"].params == TokenLimitParams(500, 86400.0, "key", 256)

    issue = only_issue("  a: {type: token_limit, tokens: 1, window: 1s, default_max_tokens: 0}\n")
    assert issue.path == "policies.a.default_max_tokens"


# --- model_allowlist ----------------------------------------------------------------


def test_model_allowlist_takes_names_aliases_and_patterns() -> None:
    config = load("  a: {type: model_allowlist, models: [gpt-4o, mini, 'gpt-4o*', 'o?-mini']}\n")
    params = config.policies["a"].params
    assert isinstance(params, ModelAllowlistParams)
    assert params.models == ("gpt-4o", "mini", "gpt-4o*", "o?-mini")
    assert params.names == frozenset({"gpt-4o", "mini"})
    assert params.patterns == ("gpt-4o*", "o?-mini")


def test_model_allowlist_rejects_undeclared_names() -> None:
    policies = "  a: {type: model_allowlist, models: [gpt-4o, gpt-4o-mni]}\n"
    issue = only_issue(policies)
    assert issue.path == "policies.a.models[1]"
    assert at(issue) == position(policies, "gpt-4o-mni")
    assert "did you mean 'gpt-4o-mini'?" in issue.message


def test_model_allowlist_needs_at_least_one_entry() -> None:
    issue = only_issue("  a: {type: model_allowlist, models: []}\n")
    assert issue.path == "policies.a.models"
    assert "at least one" in issue.message
    issue = only_issue("  a: {type: model_allowlist, models: gpt-4o}\n")
    assert "expected a list of names, got a string" in issue.message


# --- request_size ---------------------------------------------------------------------


def test_request_size_params() -> None:
    config = load(
        "  both: {type: request_size, max_bytes: 262144, max_messages: 64}\n"
        "  bytes: {type: request_size, max_bytes: 1024}\n"
        "  messages: {type: request_size, max_messages: 8}\n"
    )
    assert config.policies["both"].params == RequestSizeParams(262144, 64)
    assert config.policies["bytes"].params == RequestSizeParams(max_bytes=1024)
    assert config.policies["messages"].params == RequestSizeParams(max_messages=8)


def test_request_size_needs_a_limit() -> None:
    issue = only_issue("  a: {type: request_size}\n")
    assert (issue.path, issue.message) == ("policies.a", "set max_bytes, max_messages or both")
    issue = only_issue("  a: {type: request_size, max_bytes: -1}\n")
    assert issue.path == "policies.a.max_bytes"


# --- custom_cel -------------------------------------------------------------------------


def cel_params(config: GatewayConfig, name: str = "c") -> CustomCelParams:
    params = config.policies[name].params
    assert isinstance(params, CustomCelParams)
    return params


def test_custom_cel_defaults_and_compiled_programs() -> None:
    config = load(
        "  c: {type: custom_cel, pre_check_expression: 'estimated_tokens < 4000 && !stream'}\n"
    )
    params = cel_params(config)
    assert params.message == "denied by policy c"
    assert (params.status, params.cooldown, params.post_check_expression) == (403, None, None)
    assert params.post_check_program is None
    assert params.pre_check_program is not None
    context = {name: kind() for name, kind in PRE_CHECK_VARIABLES.items()}
    assert params.pre_check_program.execute({**context, "estimated_tokens": 10}) is True
    assert params.pre_check_program.execute({**context, "estimated_tokens": 9000}) is False


def test_custom_cel_all_fields() -> None:
    config = load(
        "  c:\n    type: custom_cel\n"
        "    post_check_expression: total_tokens < 8000 && latency_ms < 3000.0\n"
        "    message: too big\n    status: 429\n    cooldown: 5m\n"
    )
    params = cel_params(config)
    assert (params.message, params.status, params.cooldown) == ("too big", 429, 300.0)
    assert params.post_check_program is not None
    assert params.pre_check_expression is None


def test_custom_cel_needs_an_expression_and_a_valid_status() -> None:
    issue = only_issue("  c: {type: custom_cel, message: hi}\n")
    assert issue.path == "policies.c"
    assert "pre_check_expression, post_check_expression or both" in issue.message

    issue = only_issue("  c: {type: custom_cel, pre_check_expression: 'true', status: 200}\n")
    assert issue.path == "policies.c.status"
    assert "between 400 and 599" in issue.message

    issue = only_issue("  c: {type: custom_cel, pre_check_expression: 'true', cooldown: 1m}\n")
    assert issue.path == "policies.c.cooldown"
    assert "post_check_expression" in issue.message


def test_cel_syntax_error_points_inside_a_quoted_expression() -> None:
    policies = '  c: {type: custom_cel, pre_check_expression: "estimated_tokens < "}\n'
    issue = only_issue(policies)
    assert issue.path == "policies.c.pre_check_expression"
    assert issue.message.startswith("CEL syntax error:")
    # CEL reports the end of the text (column 20 of the expression, after the space).
    line, column = position(policies, '"estimated_tokens')
    assert at(issue) == (line, column + 1 + 19)


def test_cel_syntax_error_points_inside_a_plain_expression() -> None:
    policies = "  c:\n    type: custom_cel\n    pre_check_expression: model == 'a' ^ 1\n"
    issue = only_issue(policies)
    assert at(issue) == position(policies, "^ 1")


def test_cel_syntax_error_on_a_later_line_of_a_literal_block() -> None:
    policies = (
        "  c:\n    type: custom_cel\n    pre_check_expression: |\n"
        "      estimated_tokens < 4000 &&\n"
        "        (stream || message_count > 2\n"
    )
    issue = only_issue(policies)
    # The missing ')' is noticed at the end of the text: just after the last line.
    assert at(issue) == (
        position(policies, "(stream")[0],
        len("        (stream || message_count > 2") + 1,
    )
    assert issue.message.startswith("CEL syntax error:")
    assert "of the text" not in issue.message


def test_cel_error_in_a_folded_block_gives_the_position_in_the_text() -> None:
    policies = (
        "  c:\n    type: custom_cel\n    pre_check_expression: >\n"
        "      estimated_tokens < 4000 &&\n      stream ^^\n"
    )
    issue = only_issue(policies)
    assert at(issue) == position(policies, ">\n")
    assert "of the text)" in issue.message


def test_cel_unknown_variable_is_named_and_located() -> None:
    policies = "  c: {type: custom_cel, pre_check_expression: 'estimated_tokens < limit'}\n"
    issue = only_issue(policies)
    assert issue.path == "policies.c.pre_check_expression"
    assert at(issue) == position(policies, "limit'")
    assert issue.message.startswith("unknown variable 'limit'")
    for name in PRE_CHECK_VARIABLES:
        assert name in issue.message


def test_cel_post_check_variables_are_rejected_in_a_pre_check() -> None:
    policies = "  c: {type: custom_cel, pre_check_expression: 'total_tokens < 10'}\n"
    issue = only_issue(policies)
    assert "'total_tokens'" in issue.message and "post_check_expression" in issue.message
    # ...and are fine in a post-check.
    load("  c: {type: custom_cel, post_check_expression: 'total_tokens < 10'}\n")


def test_cel_type_error() -> None:
    issue = only_issue("  c: {type: custom_cel, pre_check_expression: 'model + 1 > 0'}\n")
    assert issue.path == "policies.c.pre_check_expression"
    assert issue.message.startswith("CEL type error:")
    assert "string + int" in issue.message


def test_cel_type_error_behind_a_bool_is_still_found() -> None:
    # Sample values run with every bool both ways, so `stream && ...` is evaluated too.
    issue = only_issue(
        "  c: {type: custom_cel, post_check_expression: '!stream && latency_ms + 1 > 0'}\n"
    )
    assert issue.message.startswith("CEL type error:")


def test_cel_result_must_be_a_bool() -> None:
    issue = only_issue("  c: {type: custom_cel, post_check_expression: 'total_tokens * 2'}\n")
    assert issue.message == "must evaluate to a bool, but gives a int"


def test_cel_unknown_function() -> None:
    issue = only_issue("  c: {type: custom_cel, pre_check_expression: 'lower(model) == \"x\"'}\n")
    assert "unknown function 'lower'" in issue.message


def test_cel_comprehension_variables_are_not_unknown() -> None:
    config = load(
        "  c: {type: custom_cel, pre_check_expression: "
        '\'["gpt-4o", "gpt-4o-mini"].exists(m, m == model)\'}\n'
    )
    assert cel_params(config).pre_check_program is not None


def test_both_expressions_are_checked_independently() -> None:
    found = issues(
        "  c: {type: custom_cel, pre_check_expression: 'nope', post_check_expression: '1'}\n"
    )
    assert [issue.path for issue in found] == [
        "policies.c.pre_check_expression",
        "policies.c.post_check_expression",
    ]


def test_variable_specs_are_exported_for_the_runtime() -> None:
    assert PRE_CHECK_VARIABLES["estimated_tokens"] is int
    assert PRE_CHECK_VARIABLES["model"] is str
    assert PRE_CHECK_VARIABLES["stream"] is bool
    assert POST_CHECK_VARIABLES["latency_ms"] is float
    assert set(PRE_CHECK_VARIABLES) < set(POST_CHECK_VARIABLES)
    assert set(POST_CHECK_VARIABLES) - set(PRE_CHECK_VARIABLES) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "latency_ms",
        "response_size_bytes",
        "status",
    }
    with pytest.raises(TypeError):
        PRE_CHECK_VARIABLES["x"] = int  # type: ignore[index]
