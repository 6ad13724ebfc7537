"""Envoy clusters and routes for models with fallbacks (``ext_proc.routing.fallback``).

How a chain works, and why so (measured on Envoy 1.40; README "Fallback"):

- One cluster per chain, its targets as endpoints: priority and weight as declared,
  each with endpoint metadata ``gw.t`` = the target's index in ``Model.targets`` and its
  own TLS settings (``transport_socket_matches``, SNI and SAN of its host).
- The route retries on 429, 5xx, reset, refused connection and the per-attempt timeout
  (``attempt_timeout``), once per target: ``previous_priorities`` sends each retry to
  the next priority, ``previous_hosts`` to a target of the same priority not tried yet.
  Envoy never retries once the answer's headers went to the app, so a stream never
  changes target after its first byte.
- Per attempt, upstream HTTP filters on the cluster make the request the target's: a
  header_mutation filter writes the selected endpoint's ``gw.t`` into a header (a
  Lua filter cannot see which host was selected), and a Lua filter replaces path, Host,
  credential and static headers, and the body when the target needs its own (another
  API's shape, another model name), from the request processor's metadata
  (``gw_route.tg``). Headers an earlier attempt set are still on the request, so each
  attempt first removes every header any target sets (``gw_route.clr``), and
  re-states ``content-length``.
- Outlier detection ejects a target after consecutive 5xx or connection failures for a
  cool-down; its traffic moves to the next priority meanwhile.
- Which target answered reaches the finisher as the endpoint's metadata: in the usage
  log (``%UPSTREAM_METADATA(gw:t)%``) and, for answers through the response processor,
  as a response attribute (``xds.upstream_host_metadata``), with the attempt count.
  The same Lua filter writes each attempt's target and status into metadata
  (``gw_attempts.trail``), from which the finisher counts attempts per target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ext_proc import envoy_contract as contract
from ext_proc.config.model import GatewayConfig, Model, Provider
from ext_proc.envoy_contract import TARGET_HEADER, TARGET_KEY, TARGET_NAMESPACE
from ext_proc.routing.fallback import (
    chain_cluster,
    chain_key,
    distinct_chains,
    endpoint_hostname,
)

# TARGET_HEADER carries the index from the header_mutation filter to the Lua filter (it
# never leaves Envoy: the Lua filter removes it).
# Retry pacing between attempts: the next target is another provider, so no waiting for
# the failed one's retry-after.
_BACK_OFF = {"base_interval": "0.005s", "max_interval": "0.05s"}

_UPSTREAM_LUA = r"""
function envoy_on_request(h)
  local hd = h:headers()
  local index = hd:get("@TARGET_HEADER@")
  hd:remove("@TARGET_HEADER@")
  local route = h:streamInfo():dynamicMetadata():get("@ROUTE_NAMESPACE@")
  local targets = route and route["@ROUTE_TARGETS@"]
  local target = targets and index and targets[index]
  if target == nil then
    h:respond({[":status"] = "500", ["content-type"] = "application/json"},
      '{"error":{"message":"The gateway has no route for this target.",' ..
      '"type":"server_error","code":"gateway_no_target","param":null}}')
    return
  end
  local md = h:streamInfo():dynamicMetadata()
  local attempts = md:get("@ATTEMPTS_NAMESPACE@")
  md:set("@ATTEMPTS_NAMESPACE@", "@TRAIL_FIELD@", (attempts and attempts["@TRAIL_FIELD@"] or "") .. index .. ":")
  local clear = route["@ROUTE_CLEAR@"]
  if type(clear) == "table" then
    for _, name in ipairs(clear) do hd:remove(name) end
  end
  hd:replace(":path", target["@ROUTE_PATH@"])
  hd:replace(":authority", target["@ROUTE_HOST@"])
  local set = target["@ROUTE_SET@"]
  if type(set) == "table" then
    for name, value in pairs(set) do hd:replace(name, value) end
  end
  local own = target["@ROUTE_BODY@"]
  local body = h:body()
  if own ~= nil then
    if body ~= nil then body:setBytes(own) end
    hd:replace("content-length", tostring(string.len(own)))
  elseif body ~= nil then
    hd:replace("content-length", tostring(body:length()))
  end
end

function envoy_on_response(h)
  local md = h:streamInfo():dynamicMetadata()
  local attempts = md:get("@ATTEMPTS_NAMESPACE@")
  local status = h:headers():get(":status") or "0"
  md:set("@ATTEMPTS_NAMESPACE@", "@TRAIL_FIELD@", (attempts and attempts["@TRAIL_FIELD@"] or "") .. status .. ",")
end
"""


def upstream_lua() -> str:
    return contract.lua(_UPSTREAM_LUA)


def _upstream_filters() -> list[dict[str, Any]]:
    return [
        {
            "name": "gateway.chain_target",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        {
                            "append": {
                                "header": {
                                    "key": TARGET_HEADER,
                                    "value": f"%UPSTREAM_METADATA({TARGET_NAMESPACE}:{TARGET_KEY})%",
                                },
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        }
                    ]
                },
            },
        },
        {
            "name": "gateway.chain_request",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": upstream_lua()},
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def _tls_socket(host: str, ca_bundle: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": ca_bundle},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": host}}
                    ],
                },
            },
        },
    }


def _dense(priorities: list[int]) -> dict[int, int]:
    """Declared priorities -> Envoy's (0, 1, 2, ... with no gaps)."""
    return {p: rank for rank, p in enumerate(sorted(set(priorities)))}


def chain_cluster_config(
    model: Model,
    indices: tuple[int, ...],
    config: GatewayConfig,
    *,
    ca_bundle: str,
    buffer_limit: int,
    eject_after: int,
    eject_for: float,
    is_ip: Callable[[str], bool],
) -> dict[str, Any]:
    targets = [(index, model.targets[index]) for index in indices]
    providers = [config.providers[target.provider] for _, target in targets]
    priority = _dense([target.priority for _, target in targets])
    name = chain_cluster(model.name, indices)
    by_priority: dict[int, list[dict[str, Any]]] = {}
    matches: list[dict[str, Any]] = []
    for (index, target), provider in zip(targets, providers, strict=True):
        metadata: dict[str, Any] = {TARGET_NAMESPACE: {TARGET_KEY: str(index)}}
        if provider.tls:
            metadata["envoy.transport_socket_match"] = {"target": str(index)}
            matches.append(
                {
                    "name": f"target_{index}",
                    "match": {"target": str(index)},
                    "transport_socket": _tls_socket(provider.host, ca_bundle),
                }
            )
        by_priority.setdefault(priority[target.priority], []).append(
            {
                "endpoint": {
                    "address": {
                        "socket_address": {"address": provider.host, "port_value": provider.port}
                    },
                    # Not the Host header (the Lua filter sets that): what Envoy's admin
                    # /clusters names the host by, so the gateway can tell which is out.
                    "hostname": endpoint_hostname(provider.name, index),
                },
                "load_balancing_weight": target.weight,
                "metadata": {"filter_metadata": metadata},
            }
        )
    all_ip = all(is_ip(provider.host) for provider in providers)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all_ip else "STRICT_DNS",
        "connect_timeout": f"{min(p.connect_timeout for p in providers):g}s",
        "per_connection_buffer_limit_bytes": buffer_limit,
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 4096,
                    "max_pending_requests": 65536,
                    "max_requests": 65536,
                    "max_retries": 4096,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"priority": rank, "lb_endpoints": endpoints}
                for rank, endpoints in sorted(by_priority.items())
            ],
        },
        "outlier_detection": {
            # 5xx answers and connections that fail, counted apart (split) so that a
            # refused connection ejects as surely as a 503 does.
            "consecutive_5xx": eject_after,
            "consecutive_gateway_failure": eject_after,
            "consecutive_local_origin_failure": eject_after,
            "split_external_local_origin_errors": True,
            "interval": "1s",
            "base_ejection_time": f"{eject_for:g}s",
            "max_ejection_time": f"{eject_for:g}s",
            "max_ejection_percent": 100,
            "enforcing_consecutive_5xx": 100,
            "enforcing_consecutive_gateway_failure": 100,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_success_rate": 0,
            "enforcing_failure_percentage": 0,
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": _upstream_filters(),
            }
        },
    }
    if not all_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if matches:
        cluster["transport_socket_matches"] = matches
    return cluster


def chain_routes(
    model: Model,
    indices: tuple[int, ...],
    config: GatewayConfig,
    *,
    provider_header: str,
    response_header: str,
    response_filter: str,
    capture_filter: str,
    ratelimit_headers: list[dict[str, Any]],
    disabled: Callable[[str], dict[str, Any]],
    lua_disabled: Callable[..., dict[str, Any]],
    stripped: Callable[[Provider], tuple[str, ...]],
) -> list[dict[str, Any]]:
    """The route pair of a chain (through the response processor, and plain), like a
    provider's; retries as the module docstring says."""
    targets = [model.targets[index] for index in indices]
    providers = [config.providers[target.provider] for target in targets]
    policy: dict[str, Any] = {
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": len(indices) - 1,
        "retry_back_off": dict(_BACK_OFF),
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        },
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 2 * len(indices),
    }
    if model.attempt_timeout is not None:
        policy["per_try_timeout"] = f"{model.attempt_timeout:g}s"
    route: dict[str, Any] = {
        "cluster": chain_cluster(model.name, indices),
        # The whole exchange, every attempt included: the slowest target's timeout.
        "timeout": f"{max(p.timeout for p in providers):g}s",
        "retry_policy": policy,
    }
    # Scoping headers reach the chain only where every target lets them through.
    removed = [provider_header, response_header]
    for provider in providers:
        removed += [h for h in stripped(provider) if h not in removed]
    match = {"name": provider_header, "string_match": {"exact": chain_key(model.name, indices)}}
    response_match = {
        "name": response_header,
        "string_match": {"exact": contract.RESPONSE_PROCESS},
    }
    key = chain_key(model.name, indices)
    return [
        {
            "name": f"to_{key}_via_response_processor",
            "match": {"prefix": "/", "headers": [match, response_match]},
            "route": route,
            "request_headers_to_remove": removed,
            "response_headers_to_add": ratelimit_headers,
            "typed_per_filter_config": lua_disabled(capture_filter),
        },
        {
            "name": f"to_{key}",
            "match": {"prefix": "/", "headers": [match]},
            "route": route,
            "request_headers_to_remove": removed,
            "response_headers_to_add": ratelimit_headers,
            "typed_per_filter_config": disabled(response_filter),
        },
    ]


def chains(config: GatewayConfig) -> list[tuple[Model, tuple[int, ...]]]:
    """Every (model, chain) Envoy needs a cluster and routes for."""
    return [
        (model, indices)
        for model in config.models.values()
        if model.fallbacks
        for indices in distinct_chains(model, config)
    ]
