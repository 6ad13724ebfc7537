"""The wire contract between the ext_proc server and the Envoy config it is rendered
with: every name both sides must spell the same way, in one place.

The request processor writes its decision and facts into Envoy's dynamic metadata; the
Lua filter, Envoy's access-log formats and ``json_to_metadata`` (rendered by
``ext_proc.envoy_config`` and ``ext_proc.envoy_fallback``) read and write the same
namespaces and fields; the usage-log reader and the response processor read them back.
A name changed here changes on every side at once; ``tests/unit/test_envoy_contract.py``
fails when a module spells one of them itself.

Nothing here imports the gateway's own modules: every side may import it.
"""

from __future__ import annotations

import re

# --- dynamic metadata namespaces ---
NAMESPACE = "gw"  # request facts: read by the usage log reader and the response processor
ROUTE_NAMESPACE = "gw_route"  # routing + credentials for the Lua filter (scrubbed after use)
RESPONSE_NAMESPACE = "gw_response"  # set by the response processor: "it wrote the record"
USAGE_NAMESPACE = "gw_usage"  # set by Envoy's json_to_metadata from a JSON response body
# The same: the model the answer names (its own namespace, so "gw_usage is set" means
# "Envoy read a usage count").
MODEL_NAMESPACE = "gw_model"
# A model with fallbacks: Envoy's upstream filter of each attempt appends to field
# ``trail`` "<target index>:" when it starts and "<status>," when its answer arrives.
ATTEMPTS_NAMESPACE = "gw_attempts"
BODY_NAMESPACE = "gw_body"  # set by the capture Lua filter: an answer Envoy could not read

# --- fields ---
BODY_BYTES_FIELD, BODY_LENGTH_FIELD = "b", "n"  # BODY_NAMESPACE: base64 body, or its length
FACTS_FIELD = "f"  # NAMESPACE: the request's facts (compact JSON)
DENIAL_FIELD = "d"  # NAMESPACE: [decision, policy, code] of an answer the gateway gave
TRAIL_FIELD = "trail"  # ATTEMPTS_NAMESPACE
RECORDED_FIELD = "recorded"  # RESPONSE_NAMESPACE: "1" once the response side recorded it
# Route metadata (namespace RESPONSE_NAMESPACE) of the stream observer's routes: "1" says
# the observer owns the record (it answers nothing, so it cannot mark the request itself).
OBSERVED_FIELD = "observed"
# How long Envoy keeps the observer's gRPC stream open after the HTTP stream ended (its
# ``deferred_close_timeout``), then closes it: chunks the processor has not read by then
# may be lost to the count (the app has them). As long as the request filter's message
# timeout: how far behind the processor may fall either way. A cancelled or cut stream
# reaches the processor only then (the usage log waits for its record that long).
OBSERVER_CLOSE_MS = 2000
# ROUTE_NAMESPACE, read by the Lua filter: upstream path, provider route header value,
# which response filter runs (a RESPONSE_* value below), the headers to set (credentials
# too).
ROUTE_PATH, ROUTE_PROVIDER, ROUTE_RESPONSE, ROUTE_SET = "path", "prov", "resp", "set"
ROUTE_TARGETS, ROUTE_CLEAR = "tg", "clr"  # chained (fallback) requests: per-target entries
ROUTE_HOST, ROUTE_BODY = "host", "body"  # a target's entry: its authority, its own body
# Endpoint metadata naming a fallback target in Envoy's chain cluster.
TARGET_NAMESPACE = NAMESPACE
TARGET_KEY = "t"

# --- response code details of the gateway's own answers (``gw_<code>``) ---
DETAILS_PREFIX = "gw_"


def details(code: str) -> str:
    """The response code details of an answer the gateway gave itself."""
    return DETAILS_PREFIX + code


# --- headers ---
GATEWAY_HEADER_PREFIX = "x-gateway-"  # the gateway's own headers (an app's are dropped)
PROVIDER_HEADER = GATEWAY_HEADER_PREFIX + "provider"  # routes to the provider's cluster
# Which response filter a request's route enables. The request processor decides
# (field ROUTE_RESPONSE) and the Lua filter copies its value into this header:
RESPONSE_HEADER = GATEWAY_HEADER_PREFIX + "response"
# none: a plain answer, finished from the usage log;
RESPONSE_NONE = "0"
# the response processor, answering each message: an answer the gateway rewrites (a
# translation) or a fallback chain's stream (chains have no observed route);
RESPONSE_PROCESS = "1"
# the observe-only filter: a stream the gateway does not rewrite (Envoy sends each chunk
# without waiting for an answer).
RESPONSE_OBSERVE = "2"
TARGET_HEADER = GATEWAY_HEADER_PREFIX + "target"  # a fallback attempt's target
# Where apps put their gateway key (OpenAI, Azure, Anthropic SDKs); removed before upstream.
KEY_HEADERS = ("authorization", "api-key", "x-api-key")


def lua(source: str, **extra: str) -> str:
    """``source`` with ``@NAME@`` placeholders replaced by this module's constants (a
    tuple becomes Lua list items: ``"a", "b"``) or ``extra``, so Lua code rendered into
    Envoy's config spells every name as the server does."""
    names: dict[str, str] = {}
    for key, value in globals().items():
        if not key.isupper():
            continue
        if isinstance(value, str):
            names[key] = value
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            names[key] = ", ".join(f'"{v}"' for v in value)
    names.update(extra)

    def constant(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            raise ValueError(f"unknown wire-contract placeholder in Lua: {match.group(0)}")
        return names[match.group(1)]

    return _PLACEHOLDER.sub(constant, source)


_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
