"""Every Envoy config we ship or render passes ``envoy --mode validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_proc.config.loader import load_config, parse_config
from ext_proc.envoy_config import (
    CAPTURE_FILTER,
    DEFAULT_EXT_PROC_STREAMS,
    LUA_FILTER,
    OBSERVE_FILTER,
    REQUEST_FILTER,
    RESPONSE_FILTER,
    EnvoyOptions,
    render,
    render_yaml,
)
from ext_proc.settings import DEFAULT_USAGE_LOG
from tests.integration.conftest import envoy_validate

PRODUCTION_LIKE = """
providers:
  openai:       {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
  azure-eastus: {type: azure_openai, base_url: "https://contoso.openai.azure.com",
                 api_version: "2024-10-21", api_key_env: AZURE_OPENAI_API_KEY,
                 timeout: 120s, retries: {attempts: 2, on: [connect-failure, reset]}}
  local-vllm:   {type: openai, base_url: "http://10.0.0.7:8000/v1"}
models:
  gpt-4o-mini: {provider: azure-eastus, deployment: gpt-4o-mini-prod}
  gpt-4.1:     {provider: openai}
  llama:       {provider: local-vllm, deployment: meta/llama-3.1-8b}
applications:
  support-bot: {org: acme}
"""


def test_checked_in_dev_config_is_current(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_root)
    config = load_config(Path("examples/gateway.yaml"))
    expected = render_yaml(config, EnvoyOptions.dev())
    assert (repo_root / "envoy/dev.yaml").read_text() == expected, (
        "envoy/dev.yaml is stale: run `ext-proc envoy-config --dev -c examples/gateway.yaml "
        "-o envoy/dev.yaml`"
    )


def test_checked_in_production_config_is_current(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo_root)
    config = load_config(Path("examples/production.yaml"))
    expected = render_yaml(config, EnvoyOptions(stats_port=9902))
    assert (repo_root / "envoy/production.yaml").read_text() == expected, (
        "envoy/production.yaml is stale: run `ext-proc envoy-config -c examples/production.yaml "
        "--stats-port 9902 -o envoy/production.yaml`"
    )


@pytest.mark.parametrize("name", ["dev.yaml", "production.yaml"])
def test_shipped_envoy_configs_validate(repo_root: Path, name: str) -> None:
    result = envoy_validate(repo_root / "envoy" / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_rendered_production_like_config_validates(tmp_path: Path) -> None:
    config = parse_config(PRODUCTION_LIKE)
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(config, EnvoyOptions()))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_shape() -> None:
    config = parse_config(PRODUCTION_LIKE)
    bootstrap = render(config, EnvoyOptions(max_request_bytes=2048, max_response_bytes=1024))
    listener = bootstrap["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 2048
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert set(clusters) == {
        "ext_proc",
        "ext_proc_response",  # streams' response sides: the same processes, no shedding bound
        "provider_openai",
        "provider_azure-eastus",
        "provider_local-vllm",
    }
    # Request sides are bounded per process (shed past it); response sides are not.
    request_side = clusters["ext_proc"]["circuit_breakers"]["thresholds"][0]
    assert request_side["max_requests"] == DEFAULT_EXT_PROC_STREAMS
    assert clusters["ext_proc_response"]["circuit_breakers"]["thresholds"][0]["max_requests"] > (
        100 * DEFAULT_EXT_PROC_STREAMS
    )
    tls = clusters["provider_openai"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    assert "transport_socket" not in clusters["provider_local-vllm"]
    assert clusters["provider_local-vllm"]["type"] == "STATIC"
    assert clusters["provider_openai"]["type"] == "STRICT_DNS"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    azure = routes["to_azure-eastus"]["route"]
    assert azure["timeout"] == "120s"
    assert azure["host_rewrite_literal"] == "contoso.openai.azure.com"
    assert azure["retry_policy"]["num_retries"] == 2
    assert routes["to_local-vllm"]["route"]["host_rewrite_literal"] == "10.0.0.7:8000"
    assert set(routes) >= {
        "without_body",
        "to_azure-eastus_via_response_processor",
        "no_provider_selected",
    }
    # Plain answers skip the response processor; streams and translations get it.
    assert routes["to_openai"]["typed_per_filter_config"][RESPONSE_FILTER]["disabled"] is True
    assert RESPONSE_FILTER not in routes["to_openai_via_response_processor"].get(
        "typed_per_filter_config", {}
    )
    assert {h["header"]["key"] for h in routes["to_openai"]["response_headers_to_add"]} >= {
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    }
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == [
        "envoy.filters.http.header_mutation",  # an app's x-gateway-* headers dropped
        REQUEST_FILTER,
        LUA_FILTER,
        RESPONSE_FILTER,
        OBSERVE_FILTER,
        CAPTURE_FILTER,
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.router",
    ]
    # The body of a plain answer whose usage Envoy cannot read is kept, on plain routes only.
    assert CAPTURE_FILTER not in routes["to_openai"].get("typed_per_filter_config", {})
    assert routes["to_openai_via_response_processor"]["typed_per_filter_config"][CAPTURE_FILTER][
        "disabled"
    ]
    by_name = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    json_rules = by_name["envoy.filters.http.json_to_metadata"]["response_rules"]
    assert json_rules["allow_empty_content_type"] is True
    request = by_name[REQUEST_FILTER]
    assert request["processing_mode"]["request_header_mode"] == "SKIP"  # one message
    assert request["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert request["processing_mode"]["response_body_mode"] == "NONE"
    assert "request.headers['authorization']" in request["request_attributes"]
    assert request["failure_mode_allow"] is False
    assert request["status_on_error"] == {"code": "ServiceUnavailable"}
    response = by_name[RESPONSE_FILTER]
    assert response["allow_mode_override"] is True
    # The request's facts; and each attempt's target and status (models with fallbacks).
    assert response["metadata_options"]["forwarding_namespaces"] == {
        "untyped": ["gw", "gw_attempts"]
    }
    # The provider routes keep the gateway's route headers and the scoping ones back.
    assert routes["to_openai"]["request_headers_to_remove"] == [
        "x-gateway-provider",
        "x-gateway-response",
        "openai-organization",
        "openai-project",
        "anthropic-beta",
    ]
    # Streams the gateway does not rewrite: the observe-only filter, on their own route,
    # which says so in the usage log (the filter answers nothing, so it cannot mark it).
    observed = routes["to_openai_observed"]
    assert observed["match"]["headers"][1] == {
        "name": "x-gateway-response",
        "string_match": {"exact": "2"},
    }
    per_filter = observed["typed_per_filter_config"]
    assert per_filter[RESPONSE_FILTER]["disabled"] is True
    assert per_filter[CAPTURE_FILTER]["disabled"] is True
    assert "disabled" not in per_filter[OBSERVE_FILTER]
    assert observed["metadata"]["filter_metadata"]["gw_response"] == {"observed": "1"}
    # Every other route: the observer is in the chain but switched off (virtual host).
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert vhost["typed_per_filter_config"][OBSERVE_FILTER]["config"]["disabled"] is True
    for name, route in routes.items():
        if not name.endswith("_observed"):
            assert OBSERVE_FILTER not in route.get("typed_per_filter_config", {}), name
    observer = by_name[OBSERVE_FILTER]
    assert observer["observability_mode"] is True
    assert observer["failure_mode_allow"] is True  # never breaks the app's stream
    assert observer["processing_mode"]["response_body_mode"] == "STREAMED"
    assert observer["processing_mode"]["response_header_mode"] == "SEND"
    assert observer["grpc_service"] == response["grpc_service"]
    assert observer["metadata_options"]["forwarding_namespaces"] == {
        "untyped": ["gw", "gw_attempts"]
    }
    assert usage_log_format(hcm)["ob"] == "%METADATA(ROUTE:gw_response:observed)%"
    # Finished requests reach the ext_proc server through a file it tails: durable.
    usage_log = hcm["access_log"][0]["typed_config"]
    assert hcm["access_log"][0]["name"] == "envoy.access_loggers.file"
    assert usage_log["path"] == str(DEFAULT_USAGE_LOG)
    assert usage_log["log_format"]["json_format"]["path"] == "%REQ_WITHOUT_QUERY(:PATH)%"
    with_headers = render(config, EnvoyOptions(headers_phase=True))
    hcm2 = with_headers["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    [request2] = [f for f in hcm2["typed_config"]["http_filters"] if f["name"] == REQUEST_FILTER]
    mode = request2["typed_config"]["processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    # round-trips as YAML
    assert yaml.safe_load(render_yaml(config)) == render(config)


def usage_log_format(hcm: dict[str, Any]) -> dict[str, Any]:
    return hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
