"""The response side of a stream or a translated answer, from a second ext_proc filter.

Envoy routes a response here only when the request side asked for it (``stream`` or a
translation); plain JSON answers are accounted from Envoy's usage log instead, without
a single message through Python. The request's facts arrive forwarded from the request
side's metadata (``gw``). This processor counts exactly what the app received: the
provider's usage when its stream reports it, otherwise the delivered text, including
when the app cancels or the provider cuts the stream. It then writes the record; its
first answer marks the request (``gw_response``) so the usage log reader does not write
it too. Any content-type spelling, none at all, and compressed answers are read.

Streams the gateway does not rewrite (no translation) come from an observe-only filter
(Envoy's ``observability_mode``): Envoy sends each chunk without waiting, ignores
answers (the servicer sends none), and the observed route itself tells the usage log
reader who owns the record. The body of an answer that is not rewritten is only kept
per chunk and read in one go at its end (or every ``_PENDING_BYTES``): per chunk, this
processor then costs a list append.
"""

from __future__ import annotations

import logging
import re
import time

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ext_proc import logs
from ext_proc.envoy_contract import TARGET_KEY, TARGET_NAMESPACE
from ext_proc.routing.providers import RESPONSE_TRANSLATORS
from ext_proc.routing.translate import ResponseTranslator
from ext_proc.server import responses as r
from ext_proc.server.completion import Ending, finish
from ext_proc.server.context import Gateway
from ext_proc.server.facts import (
    ATTEMPTS_NAMESPACE,
    NAMESPACE,
    RESPONSE_NAMESPACE,
    TRAIL_FIELD,
    Facts,
)
from ext_proc.tokens.bodies import Decoder, decoder_for, is_event_stream, looks_like_sse
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.parsers.base import StreamParser
from ext_proc.tokens.types import ResponseSummary

log = logging.getLogger(__name__)

# What the response filter attaches to its first message (see envoy_config.py).
RESPONSE_ATTRIBUTES = (
    "response.code_details",
    # Upstream tries (retries and fallbacks), and the answering endpoint's metadata: on
    # a model with fallbacks it names the target that served (empty elsewhere).
    "upstream.request_attempt_count",
    "xds.upstream_host_metadata",
)
_ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
# Envoy's own answers for a request that never reached the provider (nothing to bill).
_NEVER_SENT_DETAILS = ("connection_failure", "no_healthy_upstream", "overflow", "route_not_found")

_RECORDED = struct_pb2.Struct()
_RECORDED.update({RESPONSE_NAMESPACE: {"recorded": "1"}})
# Streamed bodies keep at most this much of their start, to read an answer that turned
# out not to be SSE (an error JSON without a content type, to a stream request).
_SNIFF_BYTES = 64 * 1024
# An answer the gateway does not rewrite is only kept per chunk and read (decoded,
# parsed) in one go at its end, or whenever this much is pending: per chunk, the
# processor then costs a list append, and memory stays bounded on a long answer.
_PENDING_BYTES = 256 * 1024


class ResponseProcessor:
    __slots__ = (
        "_attempts",
        "_billable",
        "_bytes",
        "_decoder",
        "_ended",
        "_facts",
        "_finished",
        "_gw",
        "_head",
        "_json",
        "_parser",
        "_pending",
        "_pending_bytes",
        "_status",
        "_t_first",
        "_trail",
        "_translator",
    )

    def __init__(self, gateway: Gateway, request: pb.ProcessingRequest) -> None:
        self._gw = gateway
        forwarded = request.metadata_context.filter_metadata.get(NAMESPACE)
        self._facts = Facts.from_struct(forwarded) if forwarded is not None else None
        self._trail: str | None = None
        if logs.ENABLED and self._facts is not None:
            logs.bind_request(self._facts.request_id, self._facts.app_id)
        if self._facts is not None and self._facts.targets:
            attempts = request.metadata_context.filter_metadata.get(ATTEMPTS_NAMESPACE)
            trail = attempts.fields.get(TRAIL_FIELD) if attempts is not None else None
            self._trail = trail.string_value if trail is not None else None
        if self._facts is None:
            # Misconfigured Envoy (metadata not forwarded): pass the answer through and
            # leave the record to the usage log.
            log.error(
                "response processor got no request facts; check the Envoy config's "
                "metadata_options.forwarding_namespaces"
            )
        self._status = 0
        self._parser: StreamParser | None = None
        self._json: bytearray | None = None
        self._head: bytearray | None = None  # a stream's first bytes (see _SNIFF_BYTES)
        self._decoder: Decoder | None = None  # a body the provider compressed
        self._translator: ResponseTranslator | None = None
        self._t_first: float | None = None
        self._bytes = 0
        self._pending: list[bytes] = []  # raw chunks not read yet (see _PENDING_BYTES)
        self._pending_bytes = 0
        self._finished = self._facts is None
        self._ended = False
        self._billable = False
        self._attempts: int | None = None

    @property
    def facts(self) -> Facts | None:
        return self._facts

    @property
    def done(self) -> bool:
        """The response's last message was answered."""
        return self._ended

    async def on_response_headers(
        self, msg: pb.HttpHeaders, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        facts = self._facts
        status = content_type = encoding = ""
        for h in msg.headers.headers:
            key = h.key
            if key == ":status":
                status = h.raw_value.decode() if h.raw_value else h.value
            elif key == "content-type":
                content_type = h.raw_value.decode("latin-1") if h.raw_value else h.value
            elif key == "content-encoding":
                encoding = h.raw_value.decode("latin-1") if h.raw_value else h.value
        self._status = int(status) if status.isdigit() else 0
        self._billable = _billable(self._status, request)
        if facts is None:
            return r.continue_response_headers()
        self._attempts = _served_by(facts, request)
        # SSE by its content type in any spelling; with none at all, by what the app
        # asked for (read as JSON at the end if it turns out not to be SSE).
        streamed = is_event_stream(content_type) or (not content_type and facts.stream)
        if streamed:
            self._parser = new_stream_parser(facts.response_format)
            self._head = bytearray()
        if encoding and encoding.strip().lower() not in ("identity", ""):
            self._decoder = decoder_for(encoding)
            if self._decoder is None:
                log.warning(
                    "request %s: the provider's answer has content-encoding %r; its usage "
                    "cannot be read",
                    facts.request_id,
                    encoding[:40],
                )
        if facts.translation:
            factory = RESPONSE_TRANSLATORS.get(facts.translation)
            if factory is not None:
                self._translator = factory(facts.include_usage)
        if msg.end_of_stream:
            self._ended = True
            self._finish(cancelled=False)
        if request.observability_mode:
            return r.CONTINUE_RESPONSE_HEADERS  # never sent (Envoy ignores answers)
        if self._translator is not None:
            # Rewritten into the app's API: its length changes, it is sent decoded, and a
            # buffered answer (JSON or an error page) always becomes JSON.
            set_headers = [] if streamed else [("content-type", "application/json")]
            remove = (
                ("content-length", "content-encoding") if self._decoder else ("content-length",)
            )
            return r.continue_response_headers(
                set_headers, remove=remove, stream_body=streamed, metadata=_RECORDED
            )
        return r.continue_response_headers(stream_body=streamed, metadata=_RECORDED)

    async def on_response_body(
        self, msg: pb.HttpBody, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        raw = msg.body
        if raw:
            self._bytes += len(raw)
            if self._t_first is None:
                self._t_first = time.time()
        translator = self._translator
        if translator is None:
            # Read later, in one go (_read_pending): the usual stream costs this only.
            if raw:
                self._pending.append(raw)
                self._pending_bytes += len(raw)
                if self._pending_bytes >= _PENDING_BYTES:
                    self._read_pending()
            if msg.end_of_stream:
                self._ended = True
                self._finish(cancelled=False)
            return r.CONTINUE_RESPONSE_BODY
        decoder = self._decoder
        chunk = raw if decoder is None else decoder.decode(raw)
        if msg.end_of_stream and decoder is not None:
            chunk += decoder.flush()
        self._account(chunk)
        if msg.end_of_stream:
            self._ended = True
            self._finish(cancelled=False)
        # Accounting above read the provider's own bytes; the app gets its API's shape.
        if self._parser is not None:
            out = translator.feed(chunk)
            if msg.end_of_stream:
                out += translator.finish()
            return r.replace_response_body(out)
        if not msg.end_of_stream:
            return r.replace_response_body(b"")  # buffered: answered whole at the end
        translated = translator.translate_json(bytes(self._json or b""), self._status)
        return r.replace_response_body(translated, [("content-length", str(len(translated)))])

    def _read_pending(self) -> None:
        """Decode and account the chunks kept so far (at the end: the decoder's rest too,
        when the body ended normally; a cut compressed body is read as far as it goes)."""
        pending = self._pending
        raw = pending[0] if len(pending) == 1 else b"".join(pending)  # b"" when none
        pending.clear()
        self._pending_bytes = 0
        decoder = self._decoder
        if decoder is None:
            self._account(raw)
            return
        chunk = decoder.decode(raw) if raw else b""
        if self._ended:
            chunk += decoder.flush()
        self._account(chunk)

    def _account(self, chunk: bytes) -> None:
        """The provider's (decoded) bytes into the stream parser or the JSON buffer."""
        parser = self._parser
        if parser is not None:
            parser.feed(chunk)
            head = self._head
            if head is not None:
                # Kept only until the body shows what it is: SSE (the usual case: dropped
                # at its first event) or something else (kept, to be read as JSON).
                head += chunk[: _SNIFF_BYTES - len(head)]
                start = head.lstrip()
                if len(start) >= 6 and looks_like_sse(bytes(start[:6])):
                    self._head = None
        elif chunk:
            if self._json is None:
                self._json = bytearray(chunk)
            else:
                self._json += chunk

    def internal_error(self, exc: BaseException) -> pb.ProcessingResponse:
        """A bug while handling a response chunk: never break the app's answer for it."""
        request_id = self._facts.request_id if self._facts else "?"
        log.error("response of request %s: processing failed", request_id, exc_info=exc)
        self._gw.metrics.stream_errors.labels(kind="response").inc()
        return r.CONTINUE_RESPONSE_BODY

    def close(self, *, cancelled: bool) -> None:
        """The stream ended: normally, or cancelled (app gone, upstream reset)."""
        self._finish(cancelled=True)  # a no-op when end_of_stream already finished it

    def _summary(self) -> tuple[ResponseSummary | None, bool]:
        """What the answer said, and whether it was read as a stream."""
        facts = self._facts
        assert facts is not None
        if self._translator is None and (self._pending or self._decoder is not None):
            self._read_pending()
        parser = self._parser
        if parser is not None:
            summary = parser.finish()
            head = self._head
            if summary.events == 0 and head and not looks_like_sse(bytes(head.lstrip()[:6])):
                # Not SSE after all (an error JSON without a content type, say).
                return parse_json(facts.response_format, bytes(head)), False
            return summary, True
        if self._json is not None:
            return parse_json(facts.response_format, bytes(self._json)), False
        return None, False

    def _finish(self, *, cancelled: bool) -> None:
        if self._finished:
            return
        self._finished = True
        facts = self._facts
        assert facts is not None
        now = time.time()
        summary, streamed = self._summary()
        complete = summary is not None and summary.complete
        ending = Ending(
            status=self._status,
            latency_ms=round((now - facts.started) * 1000.0, 3),
            ttft_ms=(
                round((self._t_first - facts.started) * 1000.0, 3)
                if self._t_first is not None
                else None
            ),
            response_bytes=self._bytes or None,
            # A stream without its terminal event is an incomplete answer whatever cut
            # it; any answer the app stopped reading before its end is partial, unless it
            # had already received all of it (the openai SDK closes right after [DONE]);
            # so is Envoy's error for a request it gave up on (a timeout, a reset).
            partial=(not complete if streamed else cancelled and not complete)
            or (self._billable and self._status >= 400),
            usage=summary.usage if summary is not None else None,
            response_model=summary.response_model if summary is not None else None,
            delivered_text=summary.delivered_text if summary is not None else [],
            billable=self._billable,
            attempts=self._attempts,
            trail=self._trail,
        )
        self._gw.spawn(finish(self._gw, facts, ending, "response"))


def _billable(status: int, request: pb.ProcessingRequest) -> bool:
    """Whether the provider may have worked on the request (``Ending.billable``): it
    answered 2xx, or Envoy answered for it after sending the request (a timeout, a reset);
    not the provider's own error answer, nor a connection that never opened."""
    if status < 400:
        return True
    struct = request.attributes.get(_ATTRIBUTES_KEY)
    value = struct.fields.get("response.code_details") if struct is not None else None
    details = value.string_value if value is not None else ""
    if not details or details == "via_upstream":
        return False
    return not any(marker in details for marker in _NEVER_SENT_DETAILS)


def _served_by(facts: Facts, request: pb.ProcessingRequest) -> int | None:
    """The number of attempts Envoy made; on a model with fallbacks, selects the target
    that answered (its endpoint's metadata)."""
    struct = request.attributes.get(_ATTRIBUTES_KEY)
    if struct is None:
        return None
    host = struct.fields.get("xds.upstream_host_metadata") if facts.targets else None
    if host is not None:
        index = _target_index(host)
        if index is None or not facts.select_target(index):
            log.error(
                "request %s: cannot tell which target answered (endpoint metadata %.200r)",
                facts.request_id,
                host.string_value or host,
            )
    attempts = struct.fields.get("upstream.request_attempt_count")
    if attempts is None:
        return None
    value = attempts.number_value or attempts.string_value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# Envoy sends the endpoint's metadata as the text form of its protobuf message.
_TARGET_IN_TEXT = re.compile(
    rf'key:\s*"{TARGET_NAMESPACE}"\s*value\s*{{\s*fields\s*{{\s*key:\s*"{TARGET_KEY}"'
    r'\s*value\s*{\s*string_value:\s*"(\d+)"'
)


def _target_index(value: struct_pb2.Value) -> str | None:
    """The target index in an ``xds.upstream_host_metadata`` attribute value."""
    if value.HasField("string_value"):
        found = _TARGET_IN_TEXT.search(value.string_value)
        return found.group(1) if found else None
    if value.HasField("struct_value"):  # should Envoy ever send it as a structure
        fields = value.struct_value.fields
        namespaces = fields.get("filter_metadata") or fields.get("filterMetadata")
        gw = namespaces.struct_value.fields.get(TARGET_NAMESPACE) if namespaces else None
        index = gw.struct_value.fields.get(TARGET_KEY) if gw is not None else None
        return index.string_value if index is not None else None
    return None
