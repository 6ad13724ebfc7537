"""Envoy's own spans, exported over OTLP/HTTP when an endpoint is configured.

Envoy starts (or continues, from the app's W3C ``traceparent``) the request's trace,
records a span for the request and one per ext_proc stream, and sends ``traceparent``
on to the provider and, as gRPC metadata, to the ext_proc server, whose spans then join
the same trace (``ext_proc.telemetry``). Nothing here is rendered without an endpoint:
no tracer, no cluster, no cost.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

OTLP_CLUSTER = "otel_collector"
ENVOY_SERVICE_NAME = "llm-gateway-envoy"


def otlp_parts(endpoint: str) -> tuple[str, str, int, bool, str]:
    """(scheme, host, port, tls, path prefix) of an OTLP/HTTP endpoint URL, as the
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` convention gives it (the traces path is appended)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OTLP endpoint {endpoint!r}: expected http(s)://host[:port][/path]")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 4318)
    return parts.scheme, parts.hostname, port, tls, parts.path.rstrip("/")


def hcm_tracing(endpoint: str, sampling_percent: float) -> dict[str, Any]:
    """The HTTP connection manager's ``tracing`` block."""
    scheme, host, port, _, prefix = otlp_parts(endpoint)
    return {
        # Traces the app started are continued whatever this says (their sampling
        # decision rides in traceparent); this is the share Envoy starts itself.
        "random_sampling": {"value": sampling_percent},
        "spawn_upstream_span": True,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "service_name": ENVOY_SERVICE_NAME,
                "http_service": {
                    "http_uri": {
                        "uri": f"{scheme}://{host}:{port}{prefix}/v1/traces",
                        "cluster": OTLP_CLUSTER,
                        "timeout": "2s",
                    }
                },
            },
        },
    }


def otlp_cluster(endpoint: str, ca_bundle: str, is_ip: bool) -> dict[str, Any]:
    _, host, port, tls, _ = otlp_parts(endpoint)
    cluster: dict[str, Any] = {
        "name": OTLP_CLUSTER,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"filename": ca_bundle}}
                },
            },
        }
    return cluster
