"""One HTTP request's life in the gateway: a method per ext_proc phase.

The servicer creates a ``RequestProcessor`` per gRPC stream and hands it each message;
the processor decides (continue, mutate, deny), keeps what the usage record needs and,
when the exchange ends — normally, by a denial, or by a cancel — emits exactly one
usage record. Nothing here waits on Postgres; token counting that the record needs
after the response runs once the response has been passed on.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.auth.authenticator import KEY_HEADERS, AuthError
from ext_proc.policies.base import Denial, Outcome, RequestFacts
from ext_proc.policies.engine import NO_POLICIES, BoundPolicies, LimitState, PolicyEngine
from ext_proc.routing.catalog import Route
from ext_proc.routing.endpoints import SUPPORTED_PATHS, Endpoint, Operation, classify
from ext_proc.routing.translate.base import ResponseTranslator, TranslationError
from ext_proc.server import responses as r
from ext_proc.server.context import Gateway, Runtime
from ext_proc.stores.cache import CacheUnavailable
from ext_proc.tokens import estimator
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.parsers.base import StreamParser
from ext_proc.tokens.types import ResponseSummary
from ext_proc.usage.record import UsageRecord

log = logging.getLogger(__name__)

# Headers that carry the app's gateway key: removed before anything goes upstream.
CLIENT_KEY_HEADERS = KEY_HEADERS
_AUTH_CODES = {
    "missing": "missing_api_key",
    "unknown": "invalid_api_key",
    "expired": "expired_api_key",
    "revoked": "revoked_api_key",
}
# The route header Envoy matches to pick the provider cluster (set only by us).
PROVIDER_HEADER = "x-gateway-provider"
# Status recorded when the app went away before any response reached it (nginx's code).
CLIENT_CLOSED_REQUEST = 499

_JSON_TYPES = ("application/json",)
# Dropped before anything goes upstream: the app's key, a route header it must not
# choose, and accept-encoding (the gateway reads response bodies for usage, so they
# must not come back compressed).
_REMOVED_REQUEST_HEADERS = (*KEY_HEADERS, PROVIDER_HEADER, "accept-encoding")
_EVENT_STREAM = "text/event-stream"


def decode_headers(header_map: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key
        if key in out:
            out[key] = f"{out[key]}, {value}"
        else:
            out[key] = value
    return out


class RequestError(Exception):
    """A request the gateway answers itself with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        error_type: str | None = None,
        decision: str = "error",
        policy: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type
        self.decision = decision
        self.policy = policy
        self.headers = headers


class RequestProcessor:
    __slots__ = (
        "_body",
        "_bound",
        "_endpoint",
        "_facts",
        "_finished",
        "_gw",
        "_json_body",
        "_limit_state",
        "_response_bytes",
        "_route",
        "_rt",
        "_stream_parser",
        "_t0",
        "_t_first_byte",
        "_t_response",
        "_translator",
        "record",
    )

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._rt: Runtime = gateway.runtime
        self._t0 = time.monotonic()
        self._t_response: float | None = None
        self._t_first_byte: float | None = None
        self._endpoint: Endpoint | None = None
        self._route: Route | None = None
        self._body: dict[str, Any] | None = None
        self._stream_parser: StreamParser | None = None
        self._json_body: bytearray | None = None
        self._finished = False
        self._facts: RequestFacts | None = None
        self._bound: BoundPolicies = NO_POLICIES
        self._limit_state = LimitState()
        self._response_bytes = 0
        self._translator: ResponseTranslator | None = None
        self.record = UsageRecord(request_id="")

    @property
    def finished(self) -> bool:
        return self._finished

    # ------------------------------------------------------------------ phases

    async def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = decode_headers(msg.headers)
        rec = self.record
        rec.request_id = headers.get("x-request-id") or f"gw-{time.time_ns():x}"
        path = headers.get(":path", "")
        method = headers.get(":method", "")
        endpoint = classify(path)
        if endpoint is None:
            rec.endpoint = path.partition("?")[0][:200]
            raise RequestError(
                404,
                f"Unknown request URL: {method} {rec.endpoint}. Supported: "
                + ", ".join(SUPPORTED_PATHS),
                code="unknown_url",
                error_type="invalid_request_error",
            )
        self._endpoint = endpoint
        rec.endpoint = endpoint.path
        await self._authorize(headers, endpoint)
        if endpoint.operation is Operation.LIST_MODELS:
            if method != "GET":
                raise RequestError(
                    405, f"{endpoint.path} only answers GET", code="method_not_allowed"
                )
            return self._list_models()
        if method != "POST":
            raise RequestError(405, f"{endpoint.path} only answers POST", code="method_not_allowed")
        content_type = headers.get("content-type", "")
        if content_type and content_type.split(";", 1)[0].strip().lower() not in _JSON_TYPES:
            raise RequestError(
                400,
                f"Content-Type must be application/json, got {content_type!r}",
                code="invalid_content_type",
                param="content-type",
            )
        length = headers.get("content-length")
        limit = self._rt.limits.max_request_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            rec.request_bytes = int(length)
            raise RequestError(
                413,
                f"Request body is {length} bytes; the limit is {limit} bytes.",
                code="request_too_large",
                decision="denied",
            )
        if msg.end_of_stream:
            raise RequestError(
                400, "The request has no body; send a JSON object.", code="invalid_json"
            )
        # The app's key is dropped here, before anything can go upstream; a provider
        # route header sent by the app is never trusted.
        return r.continue_request_headers(remove=_REMOVED_REQUEST_HEADERS)

    async def _authorize(self, headers: dict[str, str], endpoint: Endpoint) -> None:
        """Who is calling (401 otherwise), and the checks that need no body."""
        rec = self.record
        try:
            identity = await self._gw.auth.authenticate(headers)
        except AuthError as exc:
            if exc.record is not None:  # a real key, revoked or expired: say whose
                rec.key_id, rec.app_id = exc.record.key_id, exc.record.app
                rec.org_id, rec.environment = exc.record.org, exc.record.environment
            raise RequestError(
                401,
                exc.message,
                code=_AUTH_CODES[exc.reason],
                decision="denied",
                error_type="invalid_request_error",
            ) from None
        except CacheUnavailable:
            raise RequestError(
                503,
                "API keys cannot be checked right now (database unavailable); retry shortly.",
                code="auth_unavailable",
            ) from None
        rec.key_id = identity.key_id
        rec.app_id = identity.app
        rec.org_id = identity.org
        rec.environment = identity.environment
        facts = RequestFacts(
            request_id=rec.request_id,
            key_id=identity.key_id,
            app_id=identity.app,
            org_id=identity.org,
            environment=identity.environment,
            endpoint=endpoint.path,
            generates=endpoint.operation is not Operation.EMBEDDINGS,
        )
        self._facts = facts
        self._bound = bound = self._rt.engine.bound(identity.app, identity.environment)
        denial = await self._rt.engine.check_headers(bound, facts, self._limit_state)
        if denial is not None:
            raise self._denied(denial)

    def _denied(self, denial: Denial) -> RequestError:
        headers = PolicyEngine.response_headers(self._limit_state)
        if denial.retry_after is not None:
            headers.append(("retry-after", str(max(1, math.ceil(denial.retry_after)))))
        error_type = "rate_limit_error" if denial.status == 429 else None
        return RequestError(
            denial.status,
            denial.message,
            code=denial.code,
            decision="denied",
            policy=denial.policy,
            error_type=error_type,
            headers=tuple(headers),
        )

    async def on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        endpoint = self._endpoint
        if endpoint is None:  # body without headers: Envoy config skips the headers phase
            raise RequestError(
                500,
                "gateway misconfigured: request headers were not sent",
                code="gateway_misconfigured",
            )
        rec = self.record
        raw = msg.body
        rec.request_bytes = len(raw)
        limit = self._rt.limits.max_request_bytes
        if len(raw) > limit:  # a chunked body (no content-length) over the limit
            raise RequestError(
                413,
                f"Request body is {len(raw)} bytes; the limit is {limit} bytes.",
                code="request_too_large",
                decision="denied",
            )
        body = _parse_json_object(raw)
        self._body = body
        route = self._resolve(endpoint, body)
        self._route = route
        model = rec.model
        rec.provider = route.provider.name
        rec.deployment = route.deployment
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(
                400, "'stream' must be a boolean.", code="invalid_type", param="stream"
            )
        rec.stream = stream
        if endpoint.operation is Operation.CHAT:
            _require_list(body, "messages")
        elif endpoint.operation is Operation.MESSAGES:
            _require_list(body, "messages")
            if type(body.get("max_tokens")) is not int:
                raise RequestError(
                    400,
                    "Missing required parameter: 'max_tokens' (an integer).",
                    code="missing_required_parameter",
                    param="max_tokens",
                )
        elif endpoint.operation is Operation.TEXT_COMPLETION:
            _require(body, "prompt")
        elif endpoint.operation is Operation.EMBEDDINGS:
            _require(body, "input")
        adapter = route.adapter
        if not adapter.supports(endpoint.operation):
            raise RequestError(
                400,
                f"Model {model!r} (provider {route.provider.name}) does not serve {endpoint.path}.",
                code="unsupported_endpoint",
                param="model",
            )
        if not adapter.has_credential:
            raise RequestError(
                503,
                f"Provider {route.provider.name} has no credential configured.",
                code="provider_credential_missing",
            )
        await self._check_policies(endpoint, route, body, len(raw), stream)
        new_body: bytes | None
        if adapter.translates(endpoint.operation):
            try:
                translated = adapter.translate(endpoint, route.deployment, body)
            except TranslationError as exc:
                raise RequestError(
                    400,
                    exc.message,
                    code=exc.code,
                    param=exc.param,
                    error_type="invalid_request_error",
                ) from None
            self._translator = translated.response
            path, call_headers, new_body = translated.path, translated.headers, translated.body
        else:
            call = adapter.prepare(endpoint, route.deployment, body)
            path, call_headers, new_body = call.path, call.headers, call.body
        set_headers = [(":path", path), (PROVIDER_HEADER, route.provider.name), *call_headers]
        if new_body is not None:
            set_headers.append(("content-length", str(len(new_body))))
        return r.continue_request_body(set_headers, body=new_body, clear_route_cache=True)

    async def _check_policies(
        self, endpoint: Endpoint, route: Route, body: dict[str, Any], size: int, stream: bool
    ) -> None:
        facts = self._facts
        if facts is None or self._bound.empty:
            return
        facts.model = self.record.model or ""
        facts.catalog_model = route.model.name
        facts.stream = stream
        facts.request_size_bytes = size
        messages = body.get("messages")
        facts.message_count = len(messages) if isinstance(messages, list) else 0
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        facts.max_tokens = max_tokens if type(max_tokens) is int and max_tokens > 0 else 0

        async def estimate() -> int:
            tokens = await _estimate_prompt(endpoint, route, body)
            self.record.estimated_prompt_tokens = tokens
            return tokens

        denial = await self._rt.engine.check_body(self._bound, facts, self._limit_state, estimate)
        if denial is not None:
            raise self._denied(denial)

    async def on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        self._t_response = time.monotonic()
        headers = decode_headers(msg.headers)
        status = headers.get(":status", "0")
        self.record.status_code = int(status) if status.isdigit() else 0
        limit_headers = (
            PolicyEngine.response_headers(self._limit_state) if self._bound.limited else []
        )
        if msg.end_of_stream:
            self._complete()
            return r.continue_response_headers(limit_headers)
        content_type = headers.get("content-type", "")
        route = self._route
        streamed = content_type.startswith(_EVENT_STREAM) and route is not None
        if streamed and route is not None:
            self._stream_parser = new_stream_parser(route.adapter.response_format)
        if self._translator is not None:
            # The body will be rewritten into the app's API: its length changes, and a
            # buffered answer (JSON or an error page) always becomes JSON.
            if not streamed:
                limit_headers = [*limit_headers, ("content-type", "application/json")]
            return r.continue_response_headers(
                limit_headers, remove=("content-length",), stream_body=streamed
            )
        return r.continue_response_headers(limit_headers, stream_body=streamed)

    async def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        self._response_bytes += len(msg.body)
        if self._t_first_byte is None and msg.body:
            self._t_first_byte = time.monotonic()
        parser = self._stream_parser
        if parser is not None:
            parser.feed(msg.body)
        elif msg.body:
            if self._json_body is None:
                self._json_body = bytearray(msg.body)
            else:
                self._json_body += msg.body
        if msg.end_of_stream:
            self._complete()
        translator = self._translator
        if translator is None:
            return r.CONTINUE_RESPONSE_BODY
        # Accounting above read the provider's own bytes; the app gets its API's shape.
        if parser is not None:
            out = translator.feed(msg.body)
            if msg.end_of_stream:
                out += translator.finish()
            return r.replace_response_body(out)
        if not msg.end_of_stream:
            return r.replace_response_body(b"")  # buffered: answered whole at the end
        translated = translator.translate_json(
            bytes(self._json_body or b""), self.record.status_code or 0
        )
        return r.replace_response_body(translated, [("content-length", str(len(translated)))])

    # ------------------------------------------------------------ outcomes

    def deny(self, error: RequestError) -> pb.ProcessingResponse:
        """Answer the app now; the exchange is over and its record is final."""
        rec = self.record
        rec.status_code = error.status
        rec.decision = error.decision  # type: ignore[assignment]
        rec.policy = error.policy
        rec.error_code = error.code
        rec.error_message = error.message[:500]
        self._finish_now()
        headers = error.headers
        if self._bound.limited and not headers:
            headers = tuple(PolicyEngine.response_headers(self._limit_state))
        return r.immediate(
            error.status,
            error.message,
            code=error.code,
            param=error.param,
            error_type=error.error_type,
            headers=headers,
            anthropic=self._endpoint is not None and self._endpoint.style == "anthropic",
        )

    def internal_error(self, exc: BaseException) -> pb.ProcessingResponse:
        log.error("request %s failed in the gateway", self.record.request_id, exc_info=exc)
        self._gw.metrics.stream_errors.labels(kind="internal").inc()
        return self.deny(
            RequestError(
                500,
                "The gateway failed to process this request "
                f"(request id {self.record.request_id}).",
                code="gateway_internal_error",
            )
        )

    def close(self, *, cancelled: bool) -> None:
        """The gRPC stream ended. Emit the record if nothing else did (cancel, reset)."""
        if self._finished:
            return
        self._finished = True
        if cancelled or self.record.status_code is None:
            self.record.partial = True
            if self.record.status_code is None:
                self.record.status_code = CLIENT_CLOSED_REQUEST
        self._gw.spawn(self._account())

    # ------------------------------------------------------------ internals

    def _resolve(self, endpoint: Endpoint, body: dict[str, Any]) -> Route:
        rec = self.record
        catalog = self._rt.catalog
        if endpoint.deployment is not None:
            rec.model = endpoint.deployment
            route = catalog.resolve_deployment(endpoint.deployment)
            if route is None:
                raise RequestError(
                    404,
                    f"The deployment `{endpoint.deployment}` does not exist.",
                    code="DeploymentNotFound",
                    decision="denied",
                    error_type="invalid_request_error",
                )
            return route
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(
                400,
                "Missing required parameter: 'model'.",
                code="missing_required_parameter",
                param="model",
            )
        rec.model = model[:200]
        route = catalog.resolve(model)
        if route is None:
            raise RequestError(
                404,
                f"The model `{rec.model}` does not exist or you do not have access to it.",
                code="model_not_found",
                decision="denied",
                error_type="invalid_request_error",
            )
        return route

    def _list_models(self) -> pb.ProcessingResponse:
        catalog = self._rt.catalog
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": (route.provider.name if (route := catalog.resolve(name)) else ""),
            }
            for name in catalog.model_names
            if self._bound.allows_model(name)
        ]
        rec = self.record
        rec.status_code = 200
        self._finish_now()
        return r.immediate_raw(
            200,
            orjson.dumps({"object": "list", "data": data}),
            [("content-type", "application/json")],
            details="gw_list_models",
        )

    def _complete(self) -> None:
        if not self._finished:
            self._finished = True
            self._gw.spawn(self._account())

    def _finish_now(self) -> None:
        if not self._finished:
            self._finished = True
            self._gw.spawn(self._account())

    async def _account(self) -> None:
        """Build and submit the usage record; runs after the app has its response."""
        rec = self.record
        now = time.monotonic()
        rec.latency_ms = round((now - self._t0) * 1000.0, 3)
        first = self._t_first_byte if rec.stream else (self._t_response or self._t_first_byte)
        if first is not None:
            rec.ttft_ms = round((first - self._t0) * 1000.0, 3)
        summary: ResponseSummary | None = None
        route = self._route
        if self._stream_parser is not None:
            summary = self._stream_parser.finish()
        elif self._json_body is not None and route is not None:
            summary = parse_json(route.adapter.response_format, bytes(self._json_body))
        status = rec.status_code or 0
        if rec.decision == "allowed" and (status >= 400 or status == 0):
            rec.decision = "error"
            if rec.error_code is None:
                rec.error_code = (
                    "client_closed_request" if status == CLIENT_CLOSED_REQUEST else "upstream_error"
                )
        if summary is not None:
            rec.response_model = summary.response_model
            if rec.stream and not summary.complete:
                rec.partial = True
        if self._response_bytes:
            rec.response_bytes = self._response_bytes
        await self._fill_tokens(summary)
        if self._facts is not None and rec.decision != "denied" and not self._bound.empty:
            outcome = Outcome(
                status=rec.status_code or 0,
                prompt_tokens=rec.prompt_tokens or 0,
                completion_tokens=rec.completion_tokens or 0,
                total_tokens=rec.total_tokens or 0,
                latency_ms=rec.latency_ms or 0.0,
                response_size_bytes=self._response_bytes,
                failed=not rec.total_tokens,
            )
            violations = await self._rt.engine.settle(
                self._bound, self._facts, self._limit_state, outcome
            )
            rec.policy_violations = violations or None
        self._gw.usage.submit(rec)
        self._observe(rec)

    async def _fill_tokens(self, summary: ResponseSummary | None) -> None:
        rec = self.record
        usage = summary.usage if summary is not None else None
        if usage is not None and usage.prompt_tokens is not None:
            rec.prompt_tokens = usage.prompt_tokens
            rec.completion_tokens = usage.completion_tokens or 0
            rec.total_tokens = (
                usage.total_tokens
                if usage.total_tokens is not None
                else rec.prompt_tokens + rec.completion_tokens
            )
            rec.cached_tokens = usage.cached_tokens
            rec.cache_creation_tokens = usage.cache_creation_tokens
            rec.reasoning_tokens = usage.reasoning_tokens
            rec.tokens_estimated = False
            return
        body, route = self._body, self._route
        if body is None or route is None or rec.decision == "denied":
            rec.prompt_tokens = rec.completion_tokens = rec.total_tokens = 0
            return
        prompt = rec.estimated_prompt_tokens
        if prompt is None:
            prompt = await _estimate_prompt(self._endpoint, route, body)
            rec.estimated_prompt_tokens = prompt
        delivered = summary.delivered_text if summary is not None else []
        if rec.status_code is not None and 400 <= rec.status_code < 600 and not delivered:
            # The provider answered an error: nothing was generated or billed.
            rec.prompt_tokens = rec.completion_tokens = rec.total_tokens = 0
            return
        completion = (
            await estimator.count_texts_async(route.model.deployment, delivered) if delivered else 0
        )
        rec.prompt_tokens = prompt
        rec.completion_tokens = completion
        rec.total_tokens = prompt + completion
        rec.tokens_estimated = True

    def _observe(self, rec: UsageRecord) -> None:
        m = self._gw.metrics
        m.requests.labels(rec.decision, rec.policy or "", str(rec.status_code or 0)).inc()
        endpoint, route = self._endpoint, self._route
        if endpoint is None or route is None:
            return
        op = endpoint.operation.value
        provider = route.provider.name
        model = route.model.name
        if rec.latency_ms is not None:
            error_type = "" if rec.decision == "allowed" else (rec.error_code or rec.decision)
            m.request_duration.labels(op, provider, model, error_type).observe(
                rec.latency_ms / 1000.0
            )
        if rec.stream and rec.ttft_ms is not None and self._t_first_byte is not None:
            m.time_to_first_token.labels(op, provider, model).observe(rec.ttft_ms / 1000.0)
        response_model = rec.response_model or model
        if rec.prompt_tokens:
            m.token_usage.labels(op, provider, model, response_model, "input").observe(
                rec.prompt_tokens
            )
        if rec.completion_tokens:
            m.token_usage.labels(op, provider, model, response_model, "output").observe(
                rec.completion_tokens
            )


async def _estimate_prompt(endpoint: Endpoint | None, route: Route, body: dict[str, Any]) -> int:
    model = route.model.deployment
    if endpoint is not None and endpoint.operation is Operation.CHAT:
        return await estimator.estimate_chat_async(model, body.get("messages"), body.get("tools"))
    if endpoint is not None and endpoint.operation is Operation.EMBEDDINGS:
        return await estimator.estimate_input_async(model, body.get("input"))
    if endpoint is not None and endpoint.operation is Operation.TEXT_COMPLETION:
        return await estimator.estimate_input_async(model, body.get("prompt"))
    if endpoint is not None and endpoint.operation is Operation.MESSAGES:
        return await estimator.estimate_anthropic_async(
            model, body.get("system"), body.get("messages"), body.get("tools")
        )
    return 0


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RequestError(
            400, "The request body is empty; send a JSON object.", code="invalid_json"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        if "utf-8" in message.lower() or "surrogate" in message.lower():
            raise RequestError(
                400, "The request body is not valid UTF-8.", code="invalid_encoding"
            ) from None
        raise RequestError(
            400, f"The request body is not valid JSON: {message}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _require(body: dict[str, Any], name: str) -> None:
    if body.get(name) is None:
        raise RequestError(
            400,
            f"Missing required parameter: '{name}'.",
            code="missing_required_parameter",
            param=name,
        )


def _require_list(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        raise RequestError(
            400,
            f"Missing required parameter: '{name}'.",
            code="missing_required_parameter",
            param=name,
        )
    if not isinstance(value, list) or not value:
        raise RequestError(
            400, f"'{name}' must be a non-empty array.", code="invalid_type", param=name
        )
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise RequestError(
                400,
                f"'{name}[{i}]' must be an object with a string 'role'.",
                code="invalid_type",
                param=f"{name}[{i}]",
            )
