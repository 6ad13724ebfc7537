"""Prometheus metrics: every series the service exports, defined in one place.

Names follow Prometheus conventions and, where they exist, the OpenTelemetry GenAI
semantic conventions (``gen_ai_*``). A ``Metrics`` object owns its own registry (no
module-level state) and is built once per process and passed to whoever records.
Labels stay bounded: model, provider, operation, decision, policy, phase, tier,
dependency names come from configuration or from fixed sets, never from requests'
free text, ids or keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_FAST_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)

CIRCUIT_CLOSED = 0
CIRCUIT_HALF_OPEN = 1
CIRCUIT_OPEN = 2


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # --- OpenTelemetry GenAI semantic conventions ---
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per request, by token type (input = prompt, output = completion).",
            [
                "gen_ai_operation_name",
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_response_model",
                "gen_ai_token_type",
            ],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the request reaching the gateway to the last response byte.",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request reaching the gateway to the first response body chunk.",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

        # --- the service's own ---
        self.cost = Counter(
            "ext_proc_cost_usd",
            "Cost of the requests recorded, USD (the usage rows' cost_usd; requests of a model "
            "without a price add nothing), by organization, application, provider and model.",
            ["org", "app", "gen_ai_provider_name", "gen_ai_request_model"],
            registry=r,
        )
        self.requests = Counter(
            "ext_proc_requests_total",
            "Requests seen by the gateway, by decision (allowed|denied|error) and deciding "
            "policy ('' when none decided).",
            ["decision", "policy", "status_code"],
            registry=r,
        )
        self.policy_check_duration = Histogram(
            "ext_proc_policy_check_duration_seconds",
            "Time spent in one policy check.",
            ["policy_type", "phase"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.policy_violations = Counter(
            "ext_proc_policy_violations_total",
            "Post-check violations (the response was already sent; the record is marked).",
            ["policy"],
            registry=r,
        )
        self.policy_fallbacks = Counter(
            "ext_proc_policy_fallback_total",
            "Checks decided without their dependency (on_error: allow used the in-process "
            "limiter; on_error: deny answered 503).",
            ["policy", "action"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "ext_proc_cache_lookups_total",
            "Lookups in the memory -> Redis -> Postgres cache, by the tier that answered "
            "(memory|redis|postgres|miss).",
            ["cache", "tier"],
            registry=r,
        )
        self.phase_duration = Histogram(
            "ext_proc_phase_duration_seconds",
            "Python time spent handling one ext_proc message, by phase.",
            ["phase"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.streams_active = Gauge(
            "ext_proc_streams_active",
            "ext_proc gRPC streams open now.",
            registry=r,
        )
        self.stream_errors = Counter(
            "ext_proc_stream_errors_total",
            "Requests answered with a gateway error, by kind (internal, bad_request, ...).",
            ["kind"],
            registry=r,
        )
        self.usage_queue_depth = Gauge(
            "ext_proc_usage_queue_depth",
            "Usage records waiting to be written.",
            registry=r,
        )
        self.usage_written = Counter(
            "ext_proc_usage_records_written_total",
            "Usage records written to Postgres.",
            registry=r,
        )
        self.usage_spooled = Counter(
            "ext_proc_usage_records_spooled_total",
            "Usage records kept on local disk because Postgres was unavailable or the queue "
            "was full (written later, not lost).",
            registry=r,
        )
        self.usage_spool_bytes = Gauge(
            "ext_proc_usage_spool_bytes",
            "Bytes of usage records waiting in the disk spool folder (written to Postgres "
            "when it answers again; 0 normally).",
            registry=r,
        )
        self.usage_dropped = Counter(
            "ext_proc_usage_records_dropped_total",
            "Usage records lost (neither Postgres nor the disk spool took them).",
            registry=r,
        )
        # --- upstream fallback (models with fallbacks; ext_proc.server.completion) ---
        self.upstream_attempts = Counter(
            "ext_proc_upstream_attempts_total",
            "Upstream attempts of requests to models with fallbacks, by model, target "
            "(provider, deployment) and outcome: ok (2xx), 429, 4xx, 5xx, or no_response "
            "(timed out, reset, or the connection failed).",
            ["model", "provider", "deployment", "outcome"],
            registry=r,
        )
        self.upstream_target_ejected = Gauge(
            "ext_proc_upstream_target_ejected",
            "1 while Envoy's outlier detection keeps a target of a model with fallbacks out "
            "(its traffic goes to the next target); read from Envoy's admin /clusters.",
            ["model", "provider", "deployment"],
            registry=r,
        )
        self.usage_fallbacks = Counter(
            "ext_proc_usage_fallback_records_total",
            "Usage records rebuilt from Envoy's usage log for requests another replica owned, "
            "or this process lost (a crash); the owner's record replaces them when it lands.",
            registry=r,
        )
        self.usage_log_lines = Counter(
            "ext_proc_usage_log_lines_total",
            "Lines read from Envoy's usage log (one per finished request).",
            registry=r,
        )
        self.usage_log_skipped_bytes = Counter(
            "ext_proc_usage_log_skipped_bytes_total",
            "Bytes of Envoy's usage log that were not a complete line (a torn write).",
            registry=r,
        )
        self.usage_rejected = Counter(
            "ext_proc_usage_records_rejected_total",
            "Usage records Postgres refused for their content (kept in the spool's rejected "
            "file with the error, for an operator to inspect).",
            registry=r,
        )
        self.usage_write_errors = Counter(
            "ext_proc_usage_write_errors_total",
            "Failed batch writes to Postgres (retried).",
            registry=r,
        )
        self.usage_batch_duration = Histogram(
            "ext_proc_usage_batch_write_duration_seconds",
            "Time to write one usage batch.",
            buckets=(*_FAST_BUCKETS, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.dependency_up = Gauge(
            "ext_proc_dependency_up",
            "1 when the dependency (redis, postgres) answered its last call, else 0.",
            ["dependency"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "ext_proc_circuit_state",
            "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open.",
            ["dependency"],
            registry=r,
        )

        # --- keys through dependency outages (ext_proc.stores.cache, ext_proc.auth) ---
        self.cache_stale_served = Counter(
            "ext_proc_cache_stale_served_total",
            "Lookups answered with an entry past its freshness TTL because the loader "
            "(Postgres) could not answer: reason 'unavailable' (it failed, or its circuit "
            "is open) or 'timeout' (no answer within the lookup deadline).",
            ["cache", "reason"],
            registry=r,
        )
        self.cache_load_failures = Counter(
            "ext_proc_cache_load_failures_total",
            "Loader (Postgres) calls of a cache that failed: reason 'error', 'timeout' "
            "(past the lookup deadline) or 'circuit_open' (not attempted).",
            ["cache", "reason"],
            registry=r,
        )
        self.invalidations_received = Counter(
            "ext_proc_invalidations_received_total",
            "Cache invalidation messages received, by channel (redis pub/sub, postgres "
            "LISTEN/NOTIFY) and kind (key, config, other).",
            ["channel", "kind"],
            registry=r,
        )
        self.invalidation_listener_up = Gauge(
            "ext_proc_invalidation_listener_up",
            "1 while the invalidation listener of a channel (redis, postgres) is connected.",
            ["channel"],
            registry=r,
        )
