"""Upstream fallback without Envoy: the request side's per-target metadata, the finishers'
choice of the serving target, the attempt trail, the Envoy clusters and routes, and the
ejection monitor's reading of Envoy's /clusters."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ext_proc.auth.authenticator import Authenticator
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec
from ext_proc.config.loader import parse_config
from ext_proc.envoy_config import EnvoyOptions, render
from ext_proc.envoy_contract import RESPONSE_NONE, RESPONSE_PROCESS
from ext_proc.envoy_fallback import upstream_lua
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.routing.catalog import Catalog
from ext_proc.routing.endpoints import Operation
from ext_proc.routing.fallback import chain_cluster, chain_key, chains_of, endpoint_hostname
from ext_proc.server.completion import attempts_of, observe_attempts
from ext_proc.server.context import Gateway, RequestLimits, Runtime
from ext_proc.server.envoy_log import UsageLog
from ext_proc.server.facts import Facts, TargetFacts
from ext_proc.server.processor import RequestProcessor
from ext_proc.server.response import ResponseProcessor, _target_index
from ext_proc.server.targets import TargetMonitor
from ext_proc.stores.cache import TieredCache
from ext_proc.stores.circuit import CircuitBreaker
from tests.unit.test_processor import (
    APP_KEY,
    KEYS,
    ListSink,
    headers,
    metadata,
    request,
    send,
    settle,
)

CONFIG = """
providers:
  east: {type: azure_openai, base_url: "https://east.openai.azure.com", api_version: "2024-10-21",
         api_key_env: EAST_KEY}
  openai: {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_KEY,
           headers: {openai-organization: org-1}}
  claude: {type: anthropic, base_url: "https://api.anthropic.com", api_key_env: ANTHROPIC_KEY}
  local: {type: openai, base_url: "http://10.0.0.7:8000"}
models:
  gpt-4o:
    provider: east
    deployment: gpt-4o-prod
    fallbacks:
      - {provider: openai, deployment: gpt-4o, price: {input: 2.5, output: 10}}
      - {provider: claude, deployment: claude-sonnet-4-5}
  spread:
    provider: openai
    deployment: gpt-4o-mini
    weight: 3
    attempt_timeout: 20s
    fallbacks:
      - {provider: local, deployment: mini, priority: 0, weight: 1}
      - {provider: east, deployment: mini-prod, priority: 4}
  plain: {provider: openai}
applications:
  app: {org: o}
  limited: {org: o}
"""
CREDENTIALS = {"east": "east-secret", "openai": "sk-openai", "claude": "sk-ant", "local": None}
HELLO = [{"role": "user", "content": "hi"}]


def gateway(credentials: dict[str, str | None] = CREDENTIALS) -> tuple[Gateway, ListSink]:
    config = parse_config(CONFIG)
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "t:")

    async def lookup(key_hash: str) -> KeyRecord | None:
        return KEYS.get(key_hash)

    cache: TieredCache[KeyRecord] = TieredCache("keys", lookup, codec=KeyRecordCodec(), kind="key")
    runtime = Runtime(
        config,
        Catalog.build(config, credentials),
        PolicyEngine(config, limits, metrics),
        RequestLimits(1 << 20),
    )
    sink = ListSink()
    return Gateway(runtime, sink, metrics, Authenticator(cache)), sink


def facts_of(response: pb.ProcessingResponse) -> Facts:
    facts = Facts.from_struct(response.dynamic_metadata.fields["gw"].struct_value)
    assert facts is not None
    return facts


# ------------------------------------------------------------------- request side


async def test_a_chained_request_carries_every_targets_call() -> None:
    gw, sink = gateway()
    response = await send(RequestProcessor(gw), request({"model": "gpt-4o", "messages": HELLO}))
    route = metadata(response, "gw_route")
    assert route["prov"] == chain_key("gpt-4o", (0, 1, 2))
    assert route["set"] == {}  # no credential outside the per-target entries
    # One target answers in Anthropic's shape: translated, by the mutating filter.
    assert route["resp"] == RESPONSE_PROCESS
    targets = route["tg"]
    assert set(targets) == {"0", "1", "2"}
    east, openai, claude = targets["0"], targets["1"], targets["2"]
    assert east["path"].startswith("/openai/deployments/gpt-4o-prod/chat/completions?")
    assert east["host"] == "east.openai.azure.com"
    assert east["set"]["api-key"] == "east-secret"
    assert openai["path"] == "/v1/chat/completions"
    assert openai["set"]["authorization"] == "Bearer sk-openai"
    assert openai["set"]["openai-organization"] == "org-1"
    assert claude["path"] == "/v1/messages" and claude["set"]["x-api-key"] == "sk-ant"
    # Bodies: OpenAI's names its deployment, Anthropic's is translated, and so every
    # target carries one (an earlier attempt's body change would otherwise stay).
    assert orjson.loads(openai["body"])["model"] == "gpt-4o"
    assert orjson.loads(claude["body"])["max_tokens"] > 0
    assert orjson.loads(east["body"]) == {"model": "gpt-4o", "messages": HELLO}
    # Every header some target sets is cleared on each attempt before its own are set.
    clear = response.dynamic_metadata.fields["gw_route"].struct_value.fields["clr"]
    names = [value.string_value for value in clear.list_value.values]
    assert {"api-key", "authorization", "x-api-key", "openai-organization"} <= set(names)
    assert APP_KEY not in response.SerializeToString().decode("latin-1")
    facts = facts_of(response)
    assert [t.provider for t in facts.targets] == ["east", "openai", "claude"]
    assert facts.targets[2].translation and facts.response_processor
    # Until the answer says otherwise, the facts are the first target's.
    assert (facts.provider, facts.deployment) == ("east", "gpt-4o-prod")
    assert not response.request_body.response.HasField("body_mutation")
    assert sink.records == []


@pytest.mark.parametrize(("stream", "mode"), [(True, RESPONSE_PROCESS), (False, RESPONSE_NONE)])
async def test_a_chain_without_translation_keeps_the_mutating_filter_for_streams(
    stream: bool, mode: str
) -> None:
    """A chain has no observed route: its streams go through the response processor
    even when no target translates; its plain answers through none."""
    gw, _ = gateway()
    body: dict[str, Any] = {"model": "spread", "messages": HELLO, "stream": stream}
    response = await send(RequestProcessor(gw), request(body))
    route = metadata(response, "gw_route")
    assert route["prov"] == chain_key("spread", (0, 1, 2))
    assert route["resp"] == mode
    facts = facts_of(response)
    assert not any(t.translation for t in facts.targets)
    assert facts.response_processor is stream


async def test_a_target_without_credential_means_one_target_without_fallback() -> None:
    gw, _ = gateway({**CREDENTIALS, "claude": None})
    response = await send(RequestProcessor(gw), request({"model": "gpt-4o", "messages": HELLO}))
    route = metadata(response, "gw_route")
    assert route["prov"] == "east"  # the provider's own route, no chain
    assert "tg" not in route
    assert facts_of(response).targets == []


async def test_embeddings_use_the_targets_that_serve_them() -> None:
    # Anthropic serves no embeddings: the chain of this operation leaves it out.
    gw, _ = gateway()
    chains = chains_of(gw.runtime.config.models["gpt-4o"], gw.runtime.config)
    assert chains[Operation.CHAT] == (0, 1, 2)
    assert chains[Operation.EMBEDDINGS] == (0, 1)
    response = await send(
        RequestProcessor(gw),
        request({"model": "gpt-4o", "input": "hi"}, path="/v1/embeddings"),
    )
    route = metadata(response, "gw_route")
    assert route["prov"] == chain_key("gpt-4o", (0, 1))
    assert set(route["tg"]) == {"0", "1"}


async def test_a_model_without_fallbacks_is_routed_as_before() -> None:
    gw, _ = gateway()
    response = await send(RequestProcessor(gw), request({"model": "plain", "messages": HELLO}))
    route = metadata(response, "gw_route")
    assert route["prov"] == "openai" and "tg" not in route and "clr" not in route
    assert "tg" not in orjson.loads(facts_of(response).to_json())


# ----------------------------------------------------------------- finishing side


def chained_facts() -> Facts:
    return Facts(
        request_id="rid-c",
        started=1.0,
        endpoint="/v1/chat/completions",
        operation="chat",
        app_id="app",
        org_id="o",
        key_id="key_app",
        environment="default",
        model="gpt-4o",
        catalog_model="gpt-4o",
        provider="east",
        deployment="gpt-4o-prod",
        estimated_tokens=5,
        price="",
        targets=[
            TargetFacts("0", "east", "gpt-4o-prod", "openai"),
            TargetFacts("1", "openai", "gpt-4o", "openai", price="2.5,10"),
            TargetFacts("2", "claude", "claude-sonnet-4-5", "anthropic", "openai_anthropic"),
        ],
    )


def test_facts_round_trip_and_select_the_serving_target() -> None:
    facts = chained_facts()
    back = Facts.from_json(facts.to_json())
    assert back is not None and back.targets == facts.targets
    assert back.select_target("2")
    assert (back.provider, back.deployment, back.response_format, back.translation) == (
        "claude",
        "claude-sonnet-4-5",
        "anthropic",
        "openai_anthropic",
    )
    assert not back.select_target("7") and back.provider == "claude"
    assert not back.select_target(None)


@pytest.mark.parametrize(
    ("trail", "attempts"),
    [
        ("0:503,1:200,", [("0", "503"), ("1", "200")]),
        ("0:1:2:200,", [("0", None), ("1", None), ("2", "200")]),  # no answer from 0 and 1
        ("1:429,0:", [("1", "429"), ("0", None)]),  # the last attempt timed out
        ("", []),
    ],
)
def test_the_attempt_trail(trail: str, attempts: list[tuple[str, str | None]]) -> None:
    assert attempts_of(trail) == attempts


def test_attempts_are_counted_per_target_and_outcome() -> None:
    gw, _ = gateway()
    observe_attempts(gw, chained_facts(), "0:503,1:1:429,2:200,")
    counter = gw.metrics.upstream_attempts

    def count(provider: str, outcome: str) -> float:
        deployment = {"east": "gpt-4o-prod", "openai": "gpt-4o", "claude": "claude-sonnet-4-5"}
        return counter.labels("gpt-4o", provider, deployment[provider], outcome)._value.get()

    assert count("east", "5xx") == 1
    assert count("openai", "no_response") == 1 and count("openai", "429") == 1
    assert count("claude", "ok") == 1


def test_the_target_index_in_envoys_text_form_of_the_endpoint_metadata() -> None:
    text = (
        'filter_metadata { key: "gw" value { fields { key: "t" value { string_value: "2" } } } } '
    )
    assert _target_index(struct_pb2.Value(string_value=text)) == "2"
    assert _target_index(struct_pb2.Value(string_value="")) is None
    other = (
        'filter_metadata { key: "other" value { fields { key: "t" value { string_value: "1" } } } }'
    )
    assert _target_index(struct_pb2.Value(string_value=other)) is None


async def test_the_response_processor_translates_and_bills_the_serving_target() -> None:
    gw, sink = gateway()
    facts = chained_facts()
    facts.stream = False
    msg = pb.ProcessingRequest(
        response_headers=headers(**{":status": "200", "content-type": "application/json"})
    )
    facts.write_to(msg.metadata_context.filter_metadata["gw"])
    msg.metadata_context.filter_metadata["gw_attempts"].update({"trail": "0:503,2:200,"})
    host = 'filter_metadata { key: "gw" value { fields { key: "t" value { string_value: "2" } } } }'
    msg.attributes["envoy.filters.http.ext_proc"].update(
        {
            "response.code_details": "via_upstream",
            "xds.upstream_host_metadata": host,
            "upstream.request_attempt_count": 2,
        }
    )
    proc = ResponseProcessor(gw, msg)
    await proc.on_response_headers(msg.response_headers, msg)
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }
    body = pb.ProcessingRequest(
        response_body=pb.HttpBody(body=orjson.dumps(answer), end_of_stream=True)
    )
    out = await proc.on_response_body(body.response_body, body)
    translated = orjson.loads(out.response_body.response.body_mutation.body)
    assert translated["object"] == "chat.completion"  # the app's API, not Anthropic's
    await settle()
    [record] = sink.records
    assert (record.provider, record.deployment, record.attempts) == (
        "claude",
        "claude-sonnet-4-5",
        2,
    )
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)
    outcomes = gw.metrics.upstream_attempts
    assert outcomes.labels("gpt-4o", "east", "gpt-4o-prod", "5xx")._value.get() == 1


async def test_the_usage_log_bills_the_target_envoy_names() -> None:
    gw, sink = gateway()
    facts = chained_facts()
    entry = {
        "id": "rid-c",
        "st": 200,
        "det": "via_upstream",
        "att": 2,
        "uh": "1.2.3.4:443",
        "tgt": "1",
        "trl": "0:503,1:200,",
        "gw": facts.to_json(),
        "u": {"usage.prompt_tokens": 1_000_000, "usage.completion_tokens": 1_000_000},
    }
    job = UsageLog(gw).handle(entry)
    assert job is not None
    await job
    [record] = sink.records
    assert (record.provider, record.deployment, record.attempts) == ("openai", "gpt-4o", 2)
    assert record.cost_usd == Decimal("12.5")  # the serving target's price: 2.5 + 10


# ----------------------------------------------------------------------- Envoy


def rendered() -> dict[str, Any]:
    return render(parse_config(CONFIG), EnvoyOptions(eject_after=4, eject_for=12.0))


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


def test_a_chain_cluster_has_the_targets_by_priority_and_weight() -> None:
    config = rendered()
    spread = cluster(config, chain_cluster("spread", (0, 1, 2)))
    groups = spread["load_assignment"]["endpoints"]
    assert [g["priority"] for g in groups] == [0, 1]  # declared 0, 0, 4 -> dense 0, 0, 1
    first = groups[0]["lb_endpoints"]
    assert [e["load_balancing_weight"] for e in first] == [3, 1]
    assert [e["endpoint"]["hostname"] for e in first] == [
        endpoint_hostname("openai", 0),
        endpoint_hostname("local", 1),
    ]
    assert [e["metadata"]["filter_metadata"]["gw"]["t"] for e in first] == ["0", "1"]
    # TLS per target (SNI and SAN of its own host); the plain-http one has none.
    matches = {m["name"]: m for m in spread["transport_socket_matches"]}
    assert set(matches) == {"target_0", "target_2"}
    tls = matches["target_2"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "east.openai.azure.com"
    assert spread["type"] == "STRICT_DNS"
    detection = spread["outlier_detection"]
    assert detection["consecutive_5xx"] == 4 and detection["base_ejection_time"] == "12s"
    assert detection["max_ejection_percent"] == 100
    filters = spread["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]["http_filters"]
    assert [f["name"] for f in filters] == [
        "gateway.chain_target",
        "gateway.chain_request",
        "envoy.filters.http.upstream_codec",
    ]


def test_chain_routes_retry_once_per_target_and_never_pass_scoping_headers() -> None:
    config = rendered()
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    key = chain_key("spread", (0, 1, 2))
    mine = [r for r in routes if r["name"] in (f"to_{key}", f"to_{key}_via_response_processor")]
    assert len(mine) == 2
    policy = mine[0]["route"]["retry_policy"]
    assert policy["num_retries"] == 2 and policy["per_try_timeout"] == "20s"
    assert policy["retriable_status_codes"] == [429]
    assert {"5xx", "reset", "connect-failure"} <= set(policy["retry_on"].split(","))
    assert "openai-organization" in mine[0]["request_headers_to_remove"]
    # Two chains for gpt-4o (chat with Anthropic, embeddings without) and one for spread.
    names = {c["name"] for c in config["static_resources"]["clusters"]}
    assert chain_cluster("gpt-4o", (0, 1, 2)) in names
    assert chain_cluster("gpt-4o", (0, 1)) in names
    assert not any(n.startswith("chain_plain") for n in names)


def test_the_upstream_lua_names_its_metadata() -> None:
    lua = upstream_lua()
    assert "@" not in lua.replace("%", "")
    for needle in ('get("x-gateway-target")', '"gw_route"', '["tg"]', '["clr"]', '"gw_attempts"'):
        assert needle in lua


# -------------------------------------------------------------------- ejection


def test_the_monitor_reads_ejected_targets_from_envoys_clusters() -> None:
    metrics = Metrics()
    monitor = TargetMonitor("http://127.0.0.1:1", metrics)
    config = parse_config(CONFIG)
    monitor._config = config
    monitor._clusters = {chain_cluster("gpt-4o", (0, 1, 2)): "gpt-4o"}

    def host(index: int, provider: str, ejected: bool) -> dict[str, Any]:
        health: dict[str, Any] = {"eds_health_status": "HEALTHY"}
        if ejected:
            health["failed_outlier_check"] = True
        return {"hostname": endpoint_hostname(provider, index), "health_status": health}

    status = {
        "cluster_statuses": [
            {
                "name": chain_cluster("gpt-4o", (0, 1, 2)),
                "host_statuses": [
                    host(0, "east", True),
                    host(0, "east", False),  # DNS gave two addresses: one out is enough
                    host(1, "openai", False),
                    host(2, "claude", False),
                ],
            },
            {"name": "provider_openai", "host_statuses": [{"hostname": "x#0"}]},
        ]
    }
    monitor._update(status)
    assert [str(e) for e in monitor.ejected] == ["gpt-4o: east/gpt-4o-prod"]
    gauge = metrics.upstream_target_ejected
    assert gauge.labels("gpt-4o", "east", "gpt-4o-prod")._value.get() == 1
    assert gauge.labels("gpt-4o", "openai", "gpt-4o")._value.get() == 0
    check = monitor.check()
    assert check["ok"] is False and check["ejected"] == ["gpt-4o: east/gpt-4o-prod"]
    status["cluster_statuses"][0]["host_statuses"][0]["health_status"] = {}
    monitor._update(status)
    assert monitor.ejected == [] and monitor.check()["ok"] is True
    assert gauge.labels("gpt-4o", "east", "gpt-4o-prod")._value.get() == 0
