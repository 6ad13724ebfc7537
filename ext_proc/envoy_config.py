"""Render an Envoy bootstrap from the gateway config.

One renderer for every Envoy this project runs: ``envoy/dev.yaml`` and
``envoy/production.yaml`` (checked in; tests keep them equal to what this renders),
``ext-proc dev``, the end-to-end tests, the benchmark and ``ext-proc envoy-config``.
Choices, with the reasons (ENVOY-NOTES.md has the measurements behind them):

- One ext_proc message per request: the request filter sends only the buffered body,
  with the headers the gateway reads attached as attributes. A headers round trip costs
  about as much Python as the rest of the request; refusing floods before their bodies
  are read is available with ``headers_phase`` at that price. Body-less requests (GET)
  get a headers message through a per-route override instead.
- The decision comes back as dynamic metadata, applied by a small Lua filter (a header
  mutation returned with the body is dropped when the headers phase is skipped).
- Plain answers never reach Python as messages: ``json_to_metadata`` reads their usage
  (any JSON content-type spelling, or none), and a file access log, the usage log, gives
  one JSON line per finished request to the ext_proc server, which tails it. A file,
  not the gRPC access log: lines written while the processor is down or restarting are
  read when it is back (the gRPC logger drops them). When Envoy cannot read the usage
  (no ``usage`` in the body, a compressed or non-JSON body) a small Lua filter keeps the
  body in metadata for the line, and the server counts what was delivered. Streams and
  translated answers go through a second, response-only ext_proc filter enabled by
  their route (it counts the delivered text exactly and rewrites translated bodies).
  Streams it does not rewrite (the usual OpenAI-to-OpenAI stream) go through the same
  processor in ``observability_mode`` instead: Envoy sends each chunk without waiting for
  an answer and the processor sends none (measured: about a third less ext_proc CPU per
  spaced chunk, and Envoy's too). The request processor picks the filter (metadata
  ``gw_route``, field ``ROUTE_RESPONSE``: none, the mutating one or the observer;
  chained fallback requests keep the mutating filter) and the request Lua filter copies
  its choice into the route header.
- Provider selection: one route pair and one cluster per provider, host rewritten to the
  provider's; OpenAI's rate-limit headers are added by the route from metadata.
- Fail closed with 503 when the processor is unreachable.
- Buffers: the listener limit bounds what Envoy holds for buffered bodies in either
  direction, so it is the larger of the request limit and ``max_response_bytes``; the
  request limit itself is enforced by the processor.
- Envoy's own error replies (upstream down, timeouts, oversized bodies) are rewritten to
  the OpenAI error shape; the processor's replies (details ``gw_*``) keep their body.
- TLS on the listener is optional (``tls_cert_file`` / ``tls_key_file``): the files are
  read when Envoy starts, or, with ``tls_sds_file``, through Envoy's file-based SDS, which
  re-reads them when a new version is renamed into their directory (no restart). A client CA
  (``tls_client_ca_file``) turns it into mutual TLS: a client without a certificate that
  CA signed is refused in the handshake, before any HTTP. The client certificate's
  details never reach a provider (``x-forwarded-client-cert`` is sanitised, Envoy's
  default).
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from ext_proc import envoy_contract as contract
from ext_proc import envoy_fallback, envoy_tracing
from ext_proc.config.model import GatewayConfig, Provider
from ext_proc.envoy_contract import DETAILS_PREFIX, GATEWAY_HEADER_PREFIX
from ext_proc.server.context import DEFAULT_MAX_REQUEST_BYTES
from ext_proc.server.envoy_log import BODY_CAPTURE_LIMIT, LOG_FIELDS
from ext_proc.server.facts import (
    ATTEMPTS_NAMESPACE,
    MODEL_NAMESPACE,
    NAMESPACE,
    RESPONSE_NAMESPACE,
    ROUTE_NAMESPACE,
    USAGE_NAMESPACE,
)
from ext_proc.server.processor import (
    PROVIDER_HEADER,
    RATELIMIT_METADATA_KEYS,
    REQUEST_ATTRIBUTES,
    RESPONSE_HEADER,
)
from ext_proc.server.response import RESPONSE_ATTRIBUTES
from ext_proc.settings import DEFAULT_USAGE_LOG
from ext_proc.tokens.parsers import FORMATS

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEV_USAGE_LOG = ".data/usage-log/envoy.jsonl"
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# Envoy's names for the oldest TLS version a listener accepts.
_TLS_VERSIONS = {"1.2": "TLSv1_2", "1.3": "TLSv1_3"}


# At ~0.7 ms of CPU per request, 256 streams waiting on one process is ~180 ms of queue:
# past that a spike is shed (503 + retry-after), not queued (README "Shedding spikes").
DEFAULT_EXT_PROC_STREAMS = 256
RESPONSE_CLUSTER = "ext_proc_response"


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    listener_host: str = "0.0.0.0"
    listener_port: int = 10000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    ext_proc_host: str = "127.0.0.1"
    ext_proc_port: int = 50051
    # Several ext_proc processes on one host: one endpoint each (HTTP/2 pins Envoy's
    # connection, so SO_REUSEPORT alone would send every stream to one process).
    ext_proc_ports: tuple[int, ...] = ()
    # Request-side ext_proc streams open at once, per ext_proc process: Envoy answers the
    # next request 503 + retry-after at once (recorded from the usage log) instead of
    # queueing it behind a saturated processor. Streams' response sides (long, mostly
    # idle) have their own cluster and no such bound.
    ext_proc_streams_per_process: int = DEFAULT_EXT_PROC_STREAMS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    message_timeout_ms: int = 2000
    ca_bundle: str = SYSTEM_CA_BUNDLE
    access_log_path: str | None = None  # None: no plain access log file
    # The usage log: one JSON line per finished request, which the ext_proc server tails
    # (ext_proc.server.envoy_log). A file, so that entries written while the processor is
    # down or restarting are read when it is back: none is lost.
    usage_log_path: str = str(DEFAULT_USAGE_LOG)
    # A second listener serving only GET /stats/prometheus and GET /ready from the admin
    # interface, for Prometheus and kubelet probes from outside the pod; the admin
    # interface itself stays on loopback (it can stop or reconfigure Envoy). None: none.
    stats_host: str = "0.0.0.0"
    stats_port: int | None = None
    # Send the request headers as their own message: refuse a flood (bad key, rate
    # limit) before its body is read, at the cost of one more message per request.
    headers_phase: bool = False
    # Benchmarks only: requests under this path prefix skip ext_proc and go straight to
    # this provider (the "Envoy alone" floor, measured on the same Envoy and upstream).
    direct_prefix: str | None = None
    direct_provider: str | None = None
    # Models with fallbacks: a target is ejected after this many consecutive 5xx answers
    # or failed connections, for this many seconds (its traffic goes to the next one).
    eject_after: int = 3
    eject_for: float = 30.0
    # TLS on the listener: PEM certificate chain and private key files (both or neither).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Mutual TLS: clients must present a certificate signed by a CA in this PEM file.
    tls_client_ca_file: str | None = None
    # The oldest TLS version the listener accepts: "1.2" or "1.3".
    tls_min_version: str = "1.2"
    # Reload the certificate without a restart: the listener takes it from Envoy's
    # file-based SDS at this path (``listener_tls_sds`` is its content, written there by
    # ``ext-proc envoy-config``), and Envoy re-reads the pair whenever a file is renamed
    # into the certificate's directory (cert-manager, a Kubernetes Secret, ``mv``).
    tls_sds_file: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("listener TLS needs both a certificate file and a key file")
        if self.tls_sds_file is not None and self.tls_cert_file is None:
            raise ValueError("reloading the listener certificate needs listener TLS")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "a client CA (mutual TLS) needs listener TLS: give a certificate and a key"
            )
        if self.tls_min_version not in _TLS_VERSIONS:
            raise ValueError(
                f"TLS minimum version {self.tls_min_version!r} is not one of "
                f"{', '.join(_TLS_VERSIONS)}"
            )

    # Traces: Envoy's spans exported over OTLP/HTTP to this endpoint (the
    # OTEL_EXPORTER_OTLP_ENDPOINT form, e.g. http://collector:4318); None: no tracing.
    otlp_endpoint: str | None = None
    trace_sampling: float = 100.0  # percent of the traces Envoy starts itself

    @classmethod
    def dev(cls) -> EnvoyOptions:
        """``envoy/dev.yaml``: everything on loopback, contract ports, the usage log under
        ``.data/`` (Envoy run from the repository, as ``make run`` does)."""
        return cls(listener_host="127.0.0.1", usage_log_path=DEV_USAGE_LOG)


def listener_tls(options: EnvoyOptions) -> dict[str, Any] | None:
    """The listener's ``transport_socket`` (None: plain HTTP)."""
    if options.tls_cert_file is None or options.tls_key_file is None:
        return None
    common: dict[str, Any] = {
        "tls_params": {"tls_minimum_protocol_version": _TLS_VERSIONS[options.tls_min_version]},
        # HTTP/2 for clients that offer it (the OpenAI SDKs speak HTTP/1.1); the
        # connection manager's AUTO codec follows what was negotiated.
        "alpn_protocols": ["h2", "http/1.1"],
    }
    if options.tls_sds_file is not None:
        common["tls_certificate_sds_secret_configs"] = [
            {
                "name": LISTENER_SECRET,
                "sds_config": {
                    "path_config_source": {"path": options.tls_sds_file},
                    "resource_api_version": "V3",
                },
            }
        ]
    else:  # read once, when Envoy starts
        common["tls_certificates"] = [_certificate_files(options)]
    context: dict[str, Any] = {"common_tls_context": common}
    if options.tls_client_ca_file is not None:
        common["validation_context"] = {"trusted_ca": {"filename": options.tls_client_ca_file}}
        context["require_client_certificate"] = True
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            **context,
        },
    }


# The listener certificate's secret, in the SDS file (``tls_sds_file``).
LISTENER_SECRET = "listener_certificate"
# Envoy's node identity: file-based SDS needs one (nothing else here reads it).
NODE = {"id": "llm-gateway", "cluster": "llm-gateway"}


def _certificate_files(options: EnvoyOptions) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": options.tls_cert_file},
        "private_key": {"filename": options.tls_key_file},
    }


def listener_tls_sds(options: EnvoyOptions) -> str:
    """The SDS file ``tls_sds_file`` names: the listener's certificate and key files, and
    the directory Envoy watches for a new version of them (the certificate's: a rename
    into it, as ``mv``, cert-manager and Kubernetes' atomic Secret update all do, makes
    Envoy re-read both; a half-replaced pair is refused and the old one kept, logged as
    ``KEY_VALUES_MISMATCH``, until the other file arrives)."""
    if options.tls_cert_file is None or options.tls_sds_file is None:
        raise ValueError("no listener certificate to reload")
    secret = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": LISTENER_SECRET,
        "tls_certificate": {
            **_certificate_files(options),
            "watched_directory": {"path": str(PurePosixPath(options.tls_cert_file).parent)},
        },
    }
    header = (
        "# Rendered by `ext-proc envoy-config --tls-reload`: the listener certificate, for\n"
        "# Envoy's file-based SDS; do not edit by hand.\n"
    )
    return header + yaml.safe_dump({"resources": [secret]}, sort_keys=False, width=100)


def add_listener_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """``ext-proc envoy-config``'s listener TLS flags (``listener_tls_overrides`` reads them)."""
    group = parser.add_argument_group("listener TLS (optional)")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve the listener over TLS with this PEM certificate chain (a path on the "
        "machine or in the container where Envoy runs; read when Envoy starts)",
    )
    group.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: require a client certificate signed by a CA in this PEM file",
    )
    group.add_argument(
        "--tls-reload",
        metavar="SDS_FILE",
        help="reload the certificate and key without a restart: write Envoy's SDS file for "
        "them here (a path where Envoy runs, beside the bootstrap) and Envoy re-reads them "
        "when a new version is renamed into the certificate's directory",
    )
    group.add_argument(
        "--tls-min-version",
        choices=sorted(_TLS_VERSIONS),
        default="1.2",
        help="the oldest TLS version accepted (default 1.2)",
    )


def listener_tls_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """``EnvoyOptions`` fields from the flags of ``add_listener_tls_arguments``; an
    incomplete combination exits with a message naming the missing flag."""
    cert, key, client_ca = ns.tls_cert, ns.tls_key, ns.tls_client_ca
    if (cert is None) != (key is None):
        missing = "--tls-key" if key is None else "--tls-cert"
        raise SystemExit(f"error: listener TLS needs both --tls-cert and --tls-key ({missing})")
    if client_ca is not None and cert is None:
        raise SystemExit("error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if ns.tls_reload is not None and cert is None:
        raise SystemExit("error: --tls-reload needs --tls-cert and --tls-key")
    return {
        "tls_cert_file": cert,
        "tls_key_file": key,
        "tls_sds_file": ns.tls_reload,
        "tls_client_ca_file": client_ca,
        "tls_min_version": ns.tls_min_version,
    }


def cluster_name(provider: Provider) -> str:
    return f"provider_{provider.name}"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _provider_cluster(provider: Provider, options: EnvoyOptions) -> dict[str, Any]:
    host, port = provider.host, provider.port
    cluster: dict[str, Any] = {
        "name": cluster_name(provider),
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(provider.connect_timeout),
        "per_connection_buffer_limit_bytes": options.max_response_bytes,
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 4096,
                    "max_pending_requests": 65536,
                    "max_requests": 65536,
                    "max_retries": 64,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": cluster_name(provider),
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
    }
    if not _is_ip(host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if provider.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": options.ca_bundle},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    },
                },
            },
        }
    return cluster


def _provider_routes(provider: Provider) -> list[dict[str, Any]]:
    """Three routes per provider, by the request processor's choice of response filter
    (``RESPONSE_HEADER``): streams the gateway only counts (the observe-only filter),
    answers the response processor must see (translations), and plain ones (accounted
    from the access log, the response filters disabled)."""
    retries = provider.retries
    route: dict[str, Any] = {
        "cluster": cluster_name(provider),
        "timeout": _duration(provider.timeout),
        "host_rewrite_literal": provider.host
        if provider.port in (80, 443)
        else f"{provider.host}:{provider.port}",
    }
    if retries.attempts > 0:
        policy: dict[str, Any] = {
            "retry_on": ",".join(retries.on),
            "num_retries": retries.attempts,
            "retry_back_off": {"base_interval": "0.25s", "max_interval": "2s"},
        }
        if "retriable-status-codes" in retries.on:
            policy["retriable_status_codes"] = list(retries.retriable_status_codes)
        route["retry_policy"] = policy
    # Never to a provider: the gateway's route headers (used to pick this route), and the
    # account/feature scoping headers the operator did not let through (`pass_headers`).
    removed = [PROVIDER_HEADER, RESPONSE_HEADER, *provider.stripped_headers]
    provider_match = {"name": PROVIDER_HEADER, "string_match": {"exact": provider.name}}
    response_match = {
        "name": RESPONSE_HEADER,
        "string_match": {"exact": contract.RESPONSE_PROCESS},
    }
    observe_match = {
        "name": RESPONSE_HEADER,
        "string_match": {"exact": contract.RESPONSE_OBSERVE},
    }
    return [
        {
            # Streams the gateway does not rewrite: the observe-only filter counts them.
            "name": f"to_{provider.name}_observed",
            "match": {"prefix": "/", "headers": [provider_match, observe_match]},
            "route": route,
            "request_headers_to_remove": removed,
            "response_headers_to_add": _RATELIMIT_RESPONSE_HEADERS,
            "metadata": _OBSERVED_METADATA,
            "typed_per_filter_config": {
                **_disabled(RESPONSE_FILTER),
                **_lua_disabled(CAPTURE_FILTER),
                OBSERVE_FILTER: _ENABLED,
            },
        },
        {
            "name": f"to_{provider.name}_via_response_processor",
            "match": {"prefix": "/", "headers": [provider_match, response_match]},
            "route": route,
            "request_headers_to_remove": removed,
            "response_headers_to_add": _RATELIMIT_RESPONSE_HEADERS,
            "typed_per_filter_config": _lua_disabled(CAPTURE_FILTER),
        },
        {
            "name": f"to_{provider.name}",
            "match": {"prefix": "/", "headers": [provider_match]},
            "route": route,
            "request_headers_to_remove": removed,
            "response_headers_to_add": _RATELIMIT_RESPONSE_HEADERS,
            "typed_per_filter_config": _disabled(RESPONSE_FILTER),
        },
    ]


REQUEST_FILTER = "envoy.filters.http.ext_proc"
RESPONSE_FILTER = "gateway.response_processor"  # the second ext_proc filter
# The same processor in observability mode, for streams the gateway does not rewrite.
OBSERVE_FILTER = "gateway.stream_observer"
LUA_FILTER = "envoy.filters.http.lua"
# A second Lua filter, on plain answers only: keeps the body of an answer whose usage
# json_to_metadata could not read, for the ext_proc server to count (see _CAPTURE_LUA).
CAPTURE_FILTER = "gateway.usage_capture"
DIRECT_ROUTE = "direct_without_ext_proc"  # benchmarks only: the Envoy-alone floor
_EXT_PROC_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
)
_LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"

# OpenAI's rate-limit headers, from the values the request processor left in metadata
# (an empty value, for an app without limits, adds no header).
_RATELIMIT_RESPONSE_HEADERS = [
    {"header": {"key": name, "value": f"%DYNAMIC_METADATA({ROUTE_NAMESPACE}:{key})%"}}
    for name, key in RATELIMIT_METADATA_KEYS.items()
]

# Applies the request processor's decision (metadata ``gw_route``) to the request: the
# upstream path, the provider route header, the response-filter header (the processor
# chose the filter: this only copies it), the provider's credential and static headers.
# The app's key and a route choice of its own never pass. It waits for the whole body
# (the request processor has it first), fixes content-length, re-runs routing, and
# blanks the credential in the metadata so no access log can see it. Without a
# decision (the processor never saw the request: it had no body) it answers itself.
_LUA = r"""
function envoy_on_request(h)
  local body = h:body()
  local md = h:streamInfo():dynamicMetadata()
  local route = md:get("@ROUTE_NAMESPACE@")
  local hd = h:headers()
  if route == nil then
    if body == nil or body:length() == 0 then
      h:respond({[":status"] = "400", ["content-type"] = "application/json"},
        '{"error":{"message":"The request has no body; send a JSON object.",' ..
        '"type":"invalid_request_error","code":"invalid_json","param":null}}')
    else
      h:respond({[":status"] = "500", ["content-type"] = "application/json"},
        '{"error":{"message":"The gateway did not process this request.",' ..
        '"type":"server_error","code":"gateway_not_processed","param":null}}')
    end
    return
  end
  @REMOVE_KEY_HEADERS@
  hd:remove("accept-encoding")
  hd:replace(":path", route["@ROUTE_PATH@"])
  hd:replace("@PROVIDER_HEADER@", route["@ROUTE_PROVIDER@"])
  hd:replace("@RESPONSE_HEADER@", route["@ROUTE_RESPONSE@"])
  local set = route["@ROUTE_SET@"]
  if type(set) == "table" then
    for name, value in pairs(set) do hd:replace(name, value) end
  end
  if body ~= nil then hd:replace("content-length", tostring(body:length())) end
  h:clearRouteCache()
  md:set("@ROUTE_NAMESPACE@", "@ROUTE_SET@", "")
end
"""


_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
# Enables the response filters (disabled by default in the filter chain) for every
# request that has a route: all but Envoy's answers to requests it could not parse.
# Which filter is in a request's chain is decided by its first route, before the Lua
# filter re-routes it: the stream observer is in every routed request's chain, switched
# off (ExtProcPerRoute, read when the response arrives) but on its observed routes.
_ROUTED_ONLY = {
    RESPONSE_FILTER: {"@type": _FILTER_CONFIG, "config": {}},
    OBSERVE_FILTER: {
        "@type": _FILTER_CONFIG,
        "config": {"@type": _EXT_PROC_PER_ROUTE, "disabled": True},
    },
}
_ENABLED = {"@type": _EXT_PROC_PER_ROUTE, "overrides": {}}
# Route metadata of the observed routes, read into the usage log: the stream observer
# sends no answer, so it cannot mark the request as its own (``gw_response:recorded``).
_OBSERVED_METADATA = {"filter_metadata": {RESPONSE_NAMESPACE: {contract.OBSERVED_FIELD: "1"}}}


def _disabled(filter_name: str) -> dict[str, Any]:
    return {filter_name: {"@type": _EXT_PROC_PER_ROUTE, "disabled": True}}


def _lua_disabled(*filter_names: str) -> dict[str, Any]:
    return {name: {"@type": _LUA_PER_ROUTE, "disabled": True} for name in filter_names}


# The rare path of plain answers. Envoy's json_to_metadata reads `usage` from a JSON
# answer; when it could not (no usage in the body, a content type or encoding it does not
# parse: gzip, deflate, br, text/plain, an SSE body to a non-stream request), this keeps
# the body, base64, in metadata `gw_body` for the usage log, and the ext_proc server
# counts what was delivered. A 2xx answer with usage costs one body callback and one
# metadata read here, nothing more; error answers are not kept (nothing was generated).
# Bodies over the limit keep only their length (the server estimates from it).
def _request_lua() -> str:
    # One hd:remove per key header, as written by hand (no table built per request).
    removes = "\n  ".join(f'hd:remove("{name}")' for name in contract.KEY_HEADERS)
    return contract.lua(_LUA, REMOVE_KEY_HEADERS=removes)


_CAPTURE_LUA = r"""
function envoy_on_response(h)
  local status = h:headers():get(":status")
  if status == nil or string.byte(status, 1) ~= 50 then return end
  local body = h:body()
  if body == nil then return end
  local n = body:length()
  if n == 0 then return end
  local md = h:streamInfo():dynamicMetadata()
  if md:get("@USAGE_NAMESPACE@") ~= nil then return end
  if n > @LIMIT@ then
    md:set("@BODY_NAMESPACE@", "@BODY_LENGTH_FIELD@", tostring(n))
    return
  end
  md:set("@BODY_NAMESPACE@", "@BODY_BYTES_FIELD@", h:base64Escape(body:getBytes(0, n)))
end
"""


def _http_filters(options: EnvoyOptions) -> list[dict[str, Any]]:
    timeout = f"{options.message_timeout_ms / 1000:g}s"
    usage_rules = _usage_rules()
    return [
        {
            # x-gateway-* names the gateway's own headers: an app's are dropped on
            # arrival, so none can steer routing or reach a provider.
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        {"remove_on_match": {"key_matcher": {"prefix": GATEWAY_HEADER_PREFIX}}}
                    ]
                },
            },
        },
        {
            # One message per request: the buffered body, with the headers the gateway
            # reads attached as attributes (no headers round trip).
            "name": REQUEST_FILTER,
            "typed_config": {
                "@type": _EXT_PROC,
                "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
                "failure_mode_allow": False,
                "status_on_error": {"code": "ServiceUnavailable"},
                "message_timeout": timeout,
                "processing_mode": {
                    "request_header_mode": "SEND" if options.headers_phase else "SKIP",
                    "request_body_mode": "BUFFERED",
                    "response_header_mode": "SKIP",
                    "response_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "request_attributes": list(REQUEST_ATTRIBUTES),
                "metadata_options": {
                    "receiving_namespaces": {"untyped": [NAMESPACE, ROUTE_NAMESPACE]}
                },
            },
        },
        {
            "name": LUA_FILTER,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": _request_lua()},
            },
        },
        {
            # Streams and translated answers only (enabled by their route): counts what
            # the app receives, chunk by chunk, and rewrites translated bodies.
            "name": RESPONSE_FILTER,
            # Only requests that have a route (the virtual host enables it: _ROUTED_ONLY).
            # Envoy's answer to a request it could not parse (a codec error) has none,
            # and passes the encoder filters while the connection is being closed: this
            # filter would hold that answer for a gRPC round trip, and it was lost.
            "disabled": True,
            "typed_config": {
                "@type": _EXT_PROC,
                "grpc_service": {"envoy_grpc": {"cluster_name": RESPONSE_CLUSTER}},
                "failure_mode_allow": False,
                "status_on_error": {"code": "ServiceUnavailable"},
                "message_timeout": timeout,
                "allow_mode_override": True,
                # Whether the answer is the provider's or Envoy's own (a timeout, a reset):
                # the prompt of a request Envoy gave up on still counts.
                "response_attributes": list(RESPONSE_ATTRIBUTES),
                "processing_mode": {
                    "request_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "response_header_mode": "SEND",
                    "response_body_mode": "BUFFERED",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [NAMESPACE, ATTEMPTS_NAMESPACE]},
                    "receiving_namespaces": {"untyped": [RESPONSE_NAMESPACE]},
                },
            },
        },
        {
            # Streams the gateway does not rewrite (the usual OpenAI-to-OpenAI stream),
            # enabled by their route only: the same counting as the response processor,
            # but Envoy sends each chunk and goes on without waiting for an answer, and the
            # processor sends none. Half the gRPC work per chunk, and no added latency.
            # Its failure never touches the app's stream (failure_mode_allow); the usage
            # log then records the request (see envoy_log: ``ob``).
            "name": OBSERVE_FILTER,
            "disabled": True,
            "typed_config": {
                "@type": _EXT_PROC,
                "grpc_service": {"envoy_grpc": {"cluster_name": RESPONSE_CLUSTER}},
                "observability_mode": True,
                "failure_mode_allow": True,
                # How long Envoy keeps the gRPC stream open after the HTTP stream ended
                # (a cancelled or cut stream), for the last chunks to reach the processor.
                "deferred_close_timeout": f"{contract.OBSERVER_CLOSE_MS / 1000:g}s",
                "response_attributes": list(RESPONSE_ATTRIBUTES),
                "processing_mode": {
                    "request_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "response_header_mode": "SEND",
                    "response_body_mode": "STREAMED",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [NAMESPACE, ATTEMPTS_NAMESPACE]},
                },
            },
        },
        {
            # Plain answers whose usage Envoy could not read keep their body for the usage
            # log (responses pass the filters in reverse order: this runs after
            # json_to_metadata). Disabled on every route but the plain provider routes.
            "name": CAPTURE_FILTER,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {
                    "inline_string": contract.lua(_CAPTURE_LUA, LIMIT=str(BODY_CAPTURE_LIMIT))
                },
            },
        },
        {
            # A plain JSON answer's usage, read by Envoy for the usage log: such answers
            # never go through Python. Every JSON content-type spelling (any case,
            # parameters such as `; charset=utf-8`, `+json` types) and none at all.
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "response_rules": {
                    "rules": usage_rules,
                    "allow_content_types_regex": {"regex": _JSON_CONTENT_TYPES},
                    "allow_empty_content_type": True,
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        },
    ]


# Content types json_to_metadata parses (RE2, matched against the whole header value).
_JSON_CONTENT_TYPES = r"(?i)\s*(application|text)/([a-z0-9.+-]+\+)?json\s*(;.*)?"


def _usage_rules() -> list[dict[str, Any]]:
    """json_to_metadata rules for every usage field and model field any response format
    reads (ext_proc.tokens.parsers: each format names its own fields); the metadata key
    is the field's dotted path, so the usage-log reader hands them back to the format."""
    numbers = dict.fromkeys(f for fmt in FORMATS.values() for f in fmt.usage_fields)
    models = dict.fromkeys(fmt.model_field for fmt in FORMATS.values() if fmt.model_field)
    return [
        {
            "selectors": [{"key": key} for key in path.split(".")],
            "on_present": {"metadata_namespace": namespace, "key": path, "type": kind},
        }
        for paths, namespace, kind in (
            (numbers, USAGE_NAMESPACE, "NUMBER"),
            (models, MODEL_NAMESPACE, "STRING"),
        )
        for path in paths
    ]


_REQ_WITHOUT_QUERY = {
    "name": "envoy.formatter.req_without_query",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
    },
}
_PLAIN_LOG_LINE = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)% '
    '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%UPSTREAM_HOST%"\n'
)


def _usage_log(options: EnvoyOptions) -> dict[str, Any]:
    """One JSON line per finished request, for the ext_proc server to tail."""
    log: dict[str, Any] = {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": options.usage_log_path,
            "log_format": {
                "json_format": dict(LOG_FIELDS),
                "omit_empty_values": True,
                "formatters": [_REQ_WITHOUT_QUERY],
            },
        },
    }
    if options.direct_prefix:
        # The benchmark's Envoy-alone floor is not the gateway's traffic: not logged.
        log["filter"] = {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": f"xds.route_name != '{DIRECT_ROUTE}'",
                },
            }
        }
    return log


def _error_json(error_type: str, message: str = "%LOCAL_REPLY_BODY%") -> dict[str, Any]:
    return {
        "json_format": {
            "error": {
                "message": message,
                "type": error_type,
                "code": "%RESPONSE_CODE_DETAILS%",
                "param": None,
            }
        },
        "content_type": "application/json",
    }


# Messages of Envoy's own 400s (format strings: no percent sign but in a command).
_PATH_NOT_NORMALIZED = (
    "The request path cannot be routed: it has a #fragment (a client never sends one) "
    "or a part Envoy cannot normalize. Send the plain path, e.g. /v1/chat/completions."
)
_NOT_HTTP = (
    "The request is not valid HTTP/1.1: its request line (method, target) or a header "
    "could not be parsed, e.g. a target that is not an ASCII path. Send a request such "
    "as POST /v1/chat/completions."
)


def _local_reply_config() -> dict[str, Any]:
    def mapper(
        status: int | None, body_format: dict[str, Any], cel: str | None = None
    ) -> dict[str, Any]:
        filters: list[dict[str, Any]] = []
        if status is not None:
            filters.append(
                {
                    "status_code_filter": {
                        "comparison": {
                            "op": "EQ",
                            "value": {
                                "default_value": status,
                                "runtime_key": f"gw.local_reply.{status}",
                            },
                        }
                    }
                }
            )
        if cel is not None:
            filters.append(
                {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                            "expression": cel,
                        },
                    }
                }
            )
        flt = filters[0] if len(filters) == 1 else {"and_filter": {"filters": filters}}
        out: dict[str, Any] = {"filter": flt, "body_format_override": body_format}
        if status == 503:
            # Envoy's own 503s (a saturated ext_proc shed, no healthy upstream): come back
            # in a second. A provider's 503 is not a local reply and keeps its headers.
            out["headers_to_add"] = [
                {
                    "header": {"key": "retry-after", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        return out

    ours = (
        f"response.code_details.startsWith('{DETAILS_PREFIX}') "
        "|| response.code_details == 'lua_response'"
    )
    return {
        "mappers": [
            # The processor's own answers are already OpenAI-shaped: keep them.
            mapper(
                None,
                {"text_format": "%LOCAL_REPLY_BODY%", "content_type": "application/json"},
                ours,
            ),
            # Envoy's refusals of requests it cannot read come with an empty body, or
            # "Bad Request": the message says what is wrong, the code is Envoy's reason.
            mapper(
                400,
                _error_json("invalid_request_error", _PATH_NOT_NORMALIZED),
                "response.code_details == 'path_normalization_failed'",
            ),
            mapper(400, _error_json("invalid_request_error", _NOT_HTTP)),
            mapper(413, _error_json("invalid_request_error")),
            mapper(429, _error_json("rate_limit_error")),
            mapper(502, _error_json("upstream_error")),
            mapper(503, _error_json("service_unavailable")),
            mapper(504, _error_json("timeout_error")),
        ],
        "body_format": _error_json("gateway_error"),
    }


def _stats_listener(options: EnvoyOptions) -> dict[str, Any]:
    assert options.stats_port is not None
    get_only = [{"name": ":method", "string_match": {"exact": "GET"}}]
    post_only = [{"name": ":method", "string_match": {"exact": "POST"}}]
    return {
        "name": "envoy_stats",
        "address": _socket_address(options.stats_host, options.stats_port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "envoy_stats",
                            "codec_type": "AUTO",
                            "route_config": {
                                "name": "envoy_stats",
                                "virtual_hosts": [
                                    {
                                        "name": "envoy_stats",
                                        "domains": ["*"],
                                        "routes": [
                                            *(
                                                # /clusters (read-only): which fallback
                                                # targets are ejected, for the gateway.
                                                {
                                                    "match": {"path": path, "headers": get_only},
                                                    "route": {"cluster": "envoy_admin"},
                                                }
                                                for path in (
                                                    "/stats/prometheus",
                                                    "/ready",
                                                    "/clusters",
                                                )
                                            ),
                                            {
                                                # The ext_proc server rotates the usage
                                                # log, then asks Envoy to reopen it.
                                                "match": {
                                                    "path": "/reopen_logs",
                                                    "headers": post_only,
                                                },
                                                "route": {"cluster": "envoy_admin"},
                                            },
                                        ],
                                    }
                                ],
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _admin_cluster(options: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": "envoy_admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "envoy_admin",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": _socket_address(options.admin_host, options.admin_port)
                            }
                        }
                    ]
                }
            ],
        },
    }


def render(config: GatewayConfig, options: EnvoyOptions = EnvoyOptions()) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (``render_yaml`` for text)."""
    providers = list(config.providers.values())
    routes: list[dict[str, Any]] = [
        {
            # Body-less requests (GET /v1/models, or a wrong method) reach the request
            # processor as headers: a body-only filter would never see them.
            "name": "without_body",
            "match": {
                "prefix": "/",
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "direct_response": {"status": 404, "body": {"inline_string": "not found"}},
            "typed_per_filter_config": {
                REQUEST_FILTER: {
                    "@type": _EXT_PROC_PER_ROUTE,
                    "overrides": {
                        "processing_mode": {
                            "request_header_mode": "SEND",
                            "request_body_mode": "NONE",
                            "response_header_mode": "SKIP",
                            "response_body_mode": "NONE",
                        }
                    },
                },
                **_lua_disabled(LUA_FILTER, CAPTURE_FILTER),
                **_disabled(RESPONSE_FILTER),
            },
        },
    ]
    for provider in providers:
        routes += _provider_routes(provider)
    chains = envoy_fallback.chains(config)
    for model, indices in chains:
        routes += envoy_fallback.chain_routes(
            model,
            indices,
            config,
            provider_header=PROVIDER_HEADER,
            response_header=RESPONSE_HEADER,
            response_filter=RESPONSE_FILTER,
            capture_filter=CAPTURE_FILTER,
            ratelimit_headers=_RATELIMIT_RESPONSE_HEADERS,
            disabled=_disabled,
            lua_disabled=_lua_disabled,
            stripped=lambda provider: provider.stripped_headers,
        )
    if options.direct_prefix and options.direct_provider:
        direct = config.providers[options.direct_provider]
        routes.insert(
            0,
            {
                "name": DIRECT_ROUTE,
                "match": {"prefix": options.direct_prefix},
                "route": {
                    "cluster": cluster_name(direct),
                    "prefix_rewrite": "/",
                    "timeout": _duration(direct.timeout),
                },
                "typed_per_filter_config": {
                    **_disabled(REQUEST_FILTER),
                    **_lua_disabled(LUA_FILTER, CAPTURE_FILTER),
                    **_disabled(RESPONSE_FILTER),
                },
            },
        )
    routes.append(
        {
            "name": "no_provider_selected",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 503,
                "body": {"inline_string": "the gateway did not select a provider for this request"},
            },
            "typed_per_filter_config": {
                **_disabled(RESPONSE_FILTER),
                **_lua_disabled(CAPTURE_FILTER),
            },
        }
    )
    buffer_limit = max(options.max_request_bytes, options.max_response_bytes)
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm_gateway",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "generate_request_id": True,
        "preserve_external_request_id": False,
        "always_set_request_id_in_response": True,
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        # Methods are any token (RFC 9110): one Envoy's parser does not know (`post`,
        # `FOO`) reaches the gateway, which answers 405 with a request id and a usage
        # row, instead of a codec error Envoy answers before the request has either.
        "http_protocol_options": {"allow_custom_methods": True},
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "llm_routes",
            "virtual_hosts": [
                {
                    "name": "gateway",
                    "domains": ["*"],
                    "routes": routes,
                    "typed_per_filter_config": _ROUTED_ONLY,
                }
            ],
        },
        "http_filters": _http_filters(options),
        "access_log": [_usage_log(options)],
    }
    if options.otlp_endpoint:
        hcm["tracing"] = envoy_tracing.hcm_tracing(options.otlp_endpoint, options.trace_sampling)
    if options.access_log_path:
        hcm["access_log"].append(
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": options.access_log_path,
                    # Envoy's default line, with the path's query string left out: an app
                    # may put its key there by mistake, and it must never land in a file.
                    "log_format": {
                        "text_format_source": {"inline_string": _PLAIN_LOG_LINE},
                        "formatters": [_REQ_WITHOUT_QUERY],
                    },
                },
            }
        )
    endpoints = options.ext_proc_ports or (options.ext_proc_port,)
    request_streams = options.ext_proc_streams_per_process * len(endpoints)
    clusters = [
        _ext_proc_cluster("ext_proc", options, request_streams),
        _ext_proc_cluster(RESPONSE_CLUSTER, options, 65536),
        *(_provider_cluster(p, options) for p in providers),
        *(
            envoy_fallback.chain_cluster_config(
                model,
                indices,
                config,
                ca_bundle=options.ca_bundle,
                buffer_limit=options.max_response_bytes,
                eject_after=options.eject_after,
                eject_for=options.eject_for,
                is_ip=_is_ip,
            )
            for model, indices in chains
        ),
    ]
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    tls = listener_tls(options)
    if tls is not None:
        chain["transport_socket"] = tls
    if options.otlp_endpoint:
        host = envoy_tracing.otlp_parts(options.otlp_endpoint)[1]
        clusters.append(
            envoy_tracing.otlp_cluster(options.otlp_endpoint, options.ca_bundle, _is_ip(host))
        )
    listeners: list[dict[str, Any]] = [
        {
            "name": "llm_listener",
            "address": _socket_address(options.listener_host, options.listener_port),
            "per_connection_buffer_limit_bytes": buffer_limit,
            "filter_chains": [chain],
        }
    ]
    if options.stats_port is not None:
        listeners.append(_stats_listener(options))
        clusters.append(_admin_cluster(options))
    bootstrap: dict[str, Any] = {
        "admin": {"address": _socket_address(options.admin_host, options.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if options.tls_sds_file is not None:
        bootstrap = {"node": dict(NODE), **bootstrap}
    return bootstrap


def render_yaml(config: GatewayConfig, options: EnvoyOptions = EnvoyOptions()) -> str:
    header = (
        "# Rendered by `ext-proc envoy-config` from the gateway config; do not edit by hand.\n"
        f"# Source: {config.source or '<string>'}\n"
    )
    return header + yaml.safe_dump(render(config, options), sort_keys=False, width=100)


def _ext_proc_cluster(name: str, options: EnvoyOptions, max_requests: int) -> dict[str, Any]:
    """The ext_proc processes as a cluster; ``max_requests`` bounds its open streams."""
    ext_proc_is_ip = _is_ip(options.ext_proc_host)
    return {
        "name": name,
        # A name (docker compose's `ext-proc`) needs DNS; STRICT_DNS makes every address
        # it resolves to an endpoint, so `--scale ext-proc=N` spreads the streams.
        "type": "STATIC" if ext_proc_is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 1024,
                    "max_pending_requests": max_requests,
                    "max_requests": max_requests,
                }
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address(options.ext_proc_host, port)}}
                        for port in (options.ext_proc_ports or (options.ext_proc_port,))
                    ]
                }
            ],
        },
        **({} if ext_proc_is_ip else {"dns_lookup_family": "V4_PREFERRED"}),
    }
