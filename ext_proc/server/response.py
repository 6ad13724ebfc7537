"""The response side of a stream or a translated answer, from a second ext_proc filter.

Envoy routes a response here only when the request side asked for it (``stream`` or a
translation); plain JSON answers are accounted from the access log instead, without a
single message through Python. The request's facts arrive forwarded from the request
side's metadata (``gw``). This processor counts exactly what the app received: the
provider's usage when its stream reports it, otherwise the delivered text, including
when the app cancels or the provider cuts the stream. It then writes the record; its
first answer marks the request (``gw_response``) so the access log does not write it too.
"""

from __future__ import annotations

import logging
import time

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ext_proc.routing.translate import RESPONSE_TRANSLATORS, ResponseTranslator
from ext_proc.server import responses as r
from ext_proc.server.completion import Ending, finish
from ext_proc.server.context import Gateway
from ext_proc.server.facts import NAMESPACE, RESPONSE_NAMESPACE, Facts
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.parsers.base import StreamParser

log = logging.getLogger(__name__)

_EVENT_STREAM = "text/event-stream"
_RECORDED = struct_pb2.Struct()
_RECORDED.update({RESPONSE_NAMESPACE: {"recorded": "1"}})


class ResponseProcessor:
    __slots__ = (
        "_bytes",
        "_ended",
        "_facts",
        "_finished",
        "_gw",
        "_json",
        "_parser",
        "_status",
        "_t_first",
        "_translator",
    )

    def __init__(self, gateway: Gateway, request: pb.ProcessingRequest) -> None:
        self._gw = gateway
        forwarded = request.metadata_context.filter_metadata.get(NAMESPACE)
        self._facts = Facts.from_struct(forwarded) if forwarded is not None else None
        if self._facts is None:
            # Misconfigured Envoy (metadata not forwarded): pass the answer through and
            # leave the record to the access log.
            log.error(
                "response processor got no request facts; check the Envoy config's "
                "metadata_options.forwarding_namespaces"
            )
        self._status = 0
        self._parser: StreamParser | None = None
        self._json: bytearray | None = None
        self._translator: ResponseTranslator | None = None
        self._t_first: float | None = None
        self._bytes = 0
        self._finished = self._facts is None
        self._ended = False

    @property
    def done(self) -> bool:
        """The response's last message was answered."""
        return self._ended

    async def on_response_headers(
        self, msg: pb.HttpHeaders, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        facts = self._facts
        status = content_type = ""
        for h in msg.headers.headers:
            if h.key == ":status":
                status = h.raw_value.decode() if h.raw_value else h.value
            elif h.key == "content-type":
                content_type = h.raw_value.decode() if h.raw_value else h.value
        self._status = int(status) if status.isdigit() else 0
        if facts is None:
            return r.CONTINUE_RESPONSE_HEADERS
        streamed = content_type.startswith(_EVENT_STREAM)
        if streamed:
            self._parser = new_stream_parser(facts.response_format)
        if facts.translation:
            factory = RESPONSE_TRANSLATORS.get(facts.translation)
            if factory is not None:
                self._translator = factory(facts.include_usage)
        if msg.end_of_stream:
            self._ended = True
            self._finish(cancelled=False)
        if self._translator is not None:
            # Rewritten into the app's API: its length changes, and a buffered answer (JSON
            # or an error page) always becomes JSON.
            set_headers = [] if streamed else [("content-type", "application/json")]
            return r.continue_response_headers(
                set_headers, remove=("content-length",), stream_body=streamed, metadata=_RECORDED
            )
        return r.continue_response_headers(stream_body=streamed, metadata=_RECORDED)

    async def on_response_body(
        self, msg: pb.HttpBody, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        chunk = msg.body
        self._bytes += len(chunk)
        if self._t_first is None and chunk:
            self._t_first = time.time()
        parser = self._parser
        if parser is not None:
            parser.feed(chunk)
        elif chunk:
            if self._json is None:
                self._json = bytearray(chunk)
            else:
                self._json += chunk
        if msg.end_of_stream:
            self._ended = True
            self._finish(cancelled=False)
        translator = self._translator
        if translator is None:
            return r.CONTINUE_RESPONSE_BODY
        # Accounting above read the provider's own bytes; the app gets its API's shape.
        if parser is not None:
            out = translator.feed(chunk)
            if msg.end_of_stream:
                out += translator.finish()
            return r.replace_response_body(out)
        if not msg.end_of_stream:
            return r.replace_response_body(b"")  # buffered: answered whole at the end
        translated = translator.translate_json(bytes(self._json or b""), self._status)
        return r.replace_response_body(translated, [("content-length", str(len(translated)))])

    def internal_error(self, exc: BaseException) -> pb.ProcessingResponse:
        """A bug while handling a response chunk: never break the app's answer for it."""
        request_id = self._facts.request_id if self._facts else "?"
        log.error("response of request %s: processing failed", request_id, exc_info=exc)
        self._gw.metrics.stream_errors.labels(kind="response").inc()
        return r.CONTINUE_RESPONSE_BODY

    def close(self, *, cancelled: bool) -> None:
        """The stream ended: normally, or cancelled (app gone, upstream reset)."""
        self._finish(cancelled=True)  # a no-op when end_of_stream already finished it

    def _finish(self, *, cancelled: bool) -> None:
        if self._finished:
            return
        self._finished = True
        facts = self._facts
        assert facts is not None
        now = time.time()
        summary = None
        if self._parser is not None:
            summary = self._parser.finish()
        elif self._json is not None:
            summary = parse_json(facts.response_format, bytes(self._json))
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
            partial=cancelled or (self._parser is not None and not complete),
            usage=summary.usage if summary is not None else None,
            response_model=summary.response_model if summary is not None else None,
            delivered_text=summary.delivered_text if summary is not None else [],
        )
        self._gw.spawn(finish(self._gw, facts, ending, "response"))
