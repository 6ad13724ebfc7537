"""Envoy's gRPC access log: where plain (non-streamed, untranslated) requests end.

Envoy sends one entry per finished request, in batches over a long-lived stream, so
finishing a request costs no ext_proc message. An entry carries what the request side
decided (``gw`` metadata), the provider's usage that Envoy's ``json_to_metadata``
filter read from the JSON answer (``gw_usage``), the status, timings, bytes and
response flags. Entries the gateway already recorded are skipped: its own immediate
answers (response code details ``gw_*``) and answers the response processor finished
(``gw_response``). Requests Envoy refused before the gateway saw them (an oversized
body, the processor unreachable) are recorded here too, from what Envoy knows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from ext_proc.server.completion import CLIENT_CLOSED_REQUEST, Ending, finish
from ext_proc.server.context import Gateway
from ext_proc.server.facts import NAMESPACE, RESPONSE_NAMESPACE, USAGE_NAMESPACE, Facts
from ext_proc.tokens.types import Usage

log = logging.getLogger(__name__)

# Routes whose traffic is not the gateway's (the benchmark's Envoy-alone floor).
UNACCOUNTED_ROUTES = frozenset({"direct_without_ext_proc"})


def _ms(duration: Any) -> float | None:
    if not duration.seconds and not duration.nanos:
        return None
    return round(duration.seconds * 1000.0 + duration.nanos / 1e6, 3)


def usage_from_metadata(struct: struct_pb2.Struct | None) -> tuple[Usage | None, str | None]:
    """The usage json_to_metadata extracted (OpenAI or Anthropic names), and the model."""
    if struct is None:
        return None, None
    fields = struct.fields

    def num(key: str) -> int | None:
        value = fields.get(key)
        return int(value.number_value) if value is not None else None

    model_value = fields.get("model")
    model = model_value.string_value if model_value is not None else None
    prompt = num("prompt_tokens")
    if prompt is not None:
        completion = num("completion_tokens") or 0
        total = num("total_tokens")
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total if total is not None else prompt + completion,
            cached_tokens=num("cached_tokens"),
            reasoning_tokens=num("reasoning_tokens"),
        ), model
    input_tokens = num("input_tokens")
    if input_tokens is not None:  # Anthropic: prompt = input + cache read + cache creation
        cache_read = num("cache_read_input_tokens")
        cache_creation = num("cache_creation_input_tokens")
        prompt = input_tokens + (cache_read or 0) + (cache_creation or 0)
        output = num("output_tokens") or 0
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=output,
            total_tokens=prompt + output,
            cached_tokens=cache_read,
            cache_creation_tokens=cache_creation,
        ), model
    return None, model


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._timer = gateway.metrics.phase_duration.labels("access_log")

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                started = time.perf_counter()
                try:
                    self.handle(entry)
                except Exception:  # one bad entry must not stop the others
                    log.exception("access log entry not accounted")
                    self._gw.metrics.stream_errors.labels(kind="access_log").inc()
                self._timer.observe(time.perf_counter() - started)
        return als_pb2.StreamAccessLogsResponse()

    def handle(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        response = entry.response
        details = response.response_code_details
        if details.startswith("gw_"):
            return  # the gateway's own answer: recorded when it was sent
        common = entry.common_properties
        if common.route_name in UNACCOUNTED_ROUTES:
            return
        metadata = common.metadata.filter_metadata
        if RESPONSE_NAMESPACE in metadata:
            return  # finished by the response processor
        flags = common.response_flags
        app_gone = flags.downstream_connection_termination or flags.downstream_remote_reset
        status = response.response_code.value or CLIENT_CLOSED_REQUEST
        facts_struct = metadata.get(NAMESPACE)
        facts = Facts.from_struct(facts_struct) if facts_struct is not None else None
        if facts is None:
            self._unprocessed(entry, status, details)
            return
        usage, response_model = usage_from_metadata(metadata.get(USAGE_NAMESPACE))
        cut = (
            flags.upstream_remote_reset
            or flags.upstream_connection_termination
            or flags.upstream_request_timeout
            or flags.upstream_protocol_error
        )
        ending = Ending(
            status=status,
            latency_ms=_ms(common.time_to_last_downstream_tx_byte) or _ms(common.duration),
            ttft_ms=_ms(common.time_to_first_upstream_rx_byte),
            response_bytes=response.response_body_bytes or None,
            partial=bool(app_gone or cut) and usage is None,
            usage=usage,
            response_model=response_model,
            error_code=details
            if status >= 400 and not details.startswith("via_upstream")
            else None,
        )
        self._gw.spawn(finish(self._gw, facts, ending, "access_log"))

    def _unprocessed(
        self, entry: accesslog_pb2.HTTPAccessLogEntry, status: int, details: str
    ) -> None:
        """A request Envoy answered before the gateway decided anything about it."""
        request = entry.request
        facts = Facts(
            request_id=request.request_id or f"envoy-{time.time_ns():x}",
            started=entry.common_properties.start_time.ToMicroseconds() / 1e6 or time.time(),
            endpoint=request.path.partition("?")[0][:200],
            operation="",
            request_bytes=request.request_body_bytes,
        )
        code = details or "envoy_local_reply"
        if details == "lua_response":
            code = "invalid_json" if status == 400 else "gateway_not_processed"
        ending = Ending(
            status=status,
            latency_ms=_ms(entry.common_properties.duration),
            decision="denied" if status in (413, 429) else "error",
            error_code=code[:64],
            response_bytes=entry.response.response_body_bytes or None,
        )
        self._gw.spawn(finish(self._gw, facts, ending, "access_log"))
