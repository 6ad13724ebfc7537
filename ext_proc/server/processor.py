"""The request side of one HTTP request: authenticate, check, route — in one message.

Envoy buffers the request body and sends it in a single ext_proc message, with the
headers the gateway needs attached as attributes (``request.path``, the key headers,
...); a separate headers message arrives only where the Envoy config asks for one (the
body-less ``GET /v1/models``, or a deployment that prefers refusing floods before their
bodies are read). The answer is either a denial (an immediate response, and the usage
record written now) or the routing decision as dynamic metadata — the path, provider,
and credential headers for the Lua filter (``gw_route``), and the request's facts for
whoever finishes it (``gw``: the usage-log reader, or the response processor for
streams and translated answers). Nothing here waits on Postgres.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ext_proc import envoy_contract as contract
from ext_proc import logs, telemetry
from ext_proc.auth.authenticator import AuthError
from ext_proc.policies.base import Denial
from ext_proc.policies.engine import NO_POLICIES, BoundPolicies, LimitState, PolicyEngine
from ext_proc.routing.catalog import Route
from ext_proc.routing.endpoints import SUPPORTED_PATHS, Endpoint, Operation, classify
from ext_proc.routing.fallback import CLEAR_FIELD, TARGETS_FIELD, authority, chain_key
from ext_proc.routing.providers import UpstreamCall
from ext_proc.routing.translate.base import TranslationError
from ext_proc.server import responses as r
from ext_proc.server.completion import Ending, finish
from ext_proc.server.context import Gateway, Runtime
from ext_proc.server.facts import DENIAL_FIELD, NAMESPACE, ROUTE_NAMESPACE, Facts, TargetFacts
from ext_proc.server.request_json import BodyError, content_type_problem, parse_request_json
from ext_proc.server.wire import REPLACEMENT
from ext_proc.stores.cache import CacheUnavailable
from ext_proc.tokens import estimator
from ext_proc.usage.record import clean_text

log = logging.getLogger(__name__)

# The route header Envoy matches to pick the provider cluster (set only by the gateway).
PROVIDER_HEADER = contract.PROVIDER_HEADER
# "1" routes the response through the response processor (streams, translations).
RESPONSE_HEADER = contract.RESPONSE_HEADER
# Where the ext_proc filter puts the attributes it was asked for.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
# What the Envoy config asks the filter to attach (see envoy_config.py).
REQUEST_ATTRIBUTES = (
    "request.path",
    "request.method",
    "request.id",
    "request.headers['authorization']",
    "request.headers['api-key']",
    "request.headers['x-api-key']",
    "request.headers['content-type']",
)
_HEADER_ATTRIBUTE = "request.headers['"
# Attribute name -> header name, worked out once: the filter sends exactly the attributes
# above (envoy_config.py renders REQUEST_ATTRIBUTES), so this map covers all it can send.
_ATTRIBUTE_HEADERS = {
    name: name[len(_HEADER_ATTRIBUTE) : -2]
    for name in REQUEST_ATTRIBUTES
    if name.startswith(_HEADER_ATTRIBUTE)
}

# The headers an app may carry its gateway key in (the authenticator reads them).
_KEY_HEADERS = ("authorization", "api-key", "x-api-key")
_AUTH_CODES = {
    "missing": "missing_api_key",
    "unknown": "invalid_api_key",
    "expired": "expired_api_key",
    "revoked": "revoked_api_key",
}
RATELIMIT_METADATA_KEYS = {
    "x-ratelimit-limit-requests": "rl_lr",
    "x-ratelimit-remaining-requests": "rl_rr",
    "x-ratelimit-reset-requests": "rl_xr",
    "x-ratelimit-limit-tokens": "rl_lt",
    "x-ratelimit-remaining-tokens": "rl_rt",
    "x-ratelimit-reset-tokens": "rl_xt",
}


@dataclass(slots=True)
class Head:
    """The request line and the few headers the request side reads."""

    request_id: str
    method: str
    path: str
    headers: dict[str, str]  # lower-case names: authorization, api-key, x-api-key, content-type

    @classmethod
    def from_attributes(cls, request: pb.ProcessingRequest) -> Head:
        struct = request.attributes.get(ATTRIBUTES_KEY)
        values: dict[str, str] = {}
        headers: dict[str, str] = {}
        if struct is not None:
            for name, value in struct.fields.items():
                header = _ATTRIBUTE_HEADERS.get(name)
                if header is None:
                    values[name] = value.string_value
                else:
                    headers[header] = value.string_value
        return cls(
            values.get("request.id", ""),
            values.get("request.method", ""),
            values.get("request.path", ""),
            headers,
        )

    @classmethod
    def from_headers(cls, msg: pb.HttpHeaders) -> Head:
        headers: dict[str, str] = {}
        for h in msg.headers.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            headers[h.key] = f"{headers[h.key]}, {value}" if h.key in headers else value
        return cls(
            headers.get("x-request-id", ""),
            headers.get(":method", ""),
            headers.get(":path", ""),
            headers,
        )


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
        "_bound",
        "_done",
        "_endpoint",
        "_facts",
        "_gw",
        "_head",
        "_header_checks_done",
        "_limit_state",
        "_rt",
        "_t0",
    )

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._rt: Runtime = gateway.runtime
        self._t0 = time.time()
        self._head: Head | None = None
        self._endpoint: Endpoint | None = None
        self._facts = Facts(request_id="", started=self._t0, endpoint="", operation="")
        self._bound: BoundPolicies = NO_POLICIES
        self._limit_state = LimitState()
        self._header_checks_done = False
        self._done = False

    @property
    def facts(self) -> Facts:
        return self._facts

    @property
    def done(self) -> bool:
        """The request side has answered its last message (the body): nothing more comes
        on this stream (the request filter sends no response phases)."""
        return self._done

    # ------------------------------------------------------------------ phases

    async def on_request_headers(
        self, msg: pb.HttpHeaders, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        """Only where the Envoy config sends headers on their own (GET /v1/models, or a
        deployment that refuses floods before reading bodies)."""
        head = Head.from_headers(msg)
        endpoint = self._start(head)
        await self._authenticate(head)
        if endpoint.operation is Operation.LIST_MODELS:
            if head.method != "GET":
                raise RequestError(
                    405, f"{endpoint.path} only answers GET", code="method_not_allowed"
                )
            return self._list_models()
        self._check_method_and_type(head, endpoint)
        if msg.end_of_stream:
            raise RequestError(
                400, "The request has no body; send a JSON object.", code="invalid_json"
            )
        denial = await self._rt.engine.check_headers(
            self._bound, self._facts.policy_facts(), self._limit_state
        )
        self._header_checks_done = True
        if denial is not None:
            raise self._denied(denial)
        return r.CONTINUE_REQUEST_HEADERS

    async def on_request_body(
        self, msg: pb.HttpBody, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        if self._head is None:  # the usual case: no headers message came first
            head = Head.from_attributes(request)
            endpoint = self._start(head)
            await self._authenticate(head)
            if endpoint.operation is Operation.LIST_MODELS:
                raise RequestError(
                    405, f"{endpoint.path} only answers GET", code="method_not_allowed"
                )
            self._check_method_and_type(head, endpoint)
        current = self._endpoint
        assert current is not None
        endpoint = current
        facts = self._facts
        raw = msg.body
        facts.request_bytes = len(raw)
        limit = self._rt.limits.max_request_bytes
        if len(raw) > limit:
            raise RequestError(
                413,
                f"Request body is {len(raw)} bytes; the limit is {limit} bytes.",
                code="request_too_large",
                decision="denied",
            )
        body = _parse_json_object(raw)
        route = self._resolve(endpoint, body)
        chain: tuple[Route, ...] = ()
        if route.targets:  # a model with fallbacks: the targets for this operation
            route, chain = _chain(route, endpoint.operation)
        facts.provider = route.provider.name
        facts.deployment = route.deployment
        facts.price = route.price_code
        facts.catalog_model = route.model.name
        facts.response_format = route.adapter.response_format
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(
                400, "'stream' must be a boolean.", code="invalid_type", param="stream"
            )
        facts.stream = stream
        _validate(endpoint, body)
        adapter = route.adapter
        if not adapter.supports(endpoint.operation):
            raise RequestError(
                400,
                f"Model {facts.model!r} (provider {route.provider.name}) "
                f"does not serve {endpoint.path}.",
                code="unsupported_endpoint",
                param="model",
            )
        if not adapter.has_credential:
            raise RequestError(
                503,
                f"Provider {route.provider.name} has no credential configured.",
                code="provider_credential_missing",
            )
        facts.message_count = _message_count(endpoint, body)
        max_tokens = body.get(
            "max_output_tokens"
            if endpoint.operation is Operation.RESPONSES
            else "max_completion_tokens",
            body.get("max_tokens"),
        )
        facts.max_tokens = max_tokens if type(max_tokens) is int and max_tokens > 0 else 0
        # The estimate feeds token limits and CEL, and is the prompt count of a record whose
        # answer never says (a cancel, a cut stream): computed once, here, where the body is.
        facts.estimated_tokens = await _estimate_prompt(endpoint, route, body)
        await self._check_policies(route)
        if chain:
            response = self._forward_chain(endpoint, chain, body, raw)
        else:
            response = self._forward(endpoint, route, body)
        self._done = True
        return response

    # ------------------------------------------------------------ internals

    def _start(self, head: Head) -> Endpoint:
        self._head = head
        facts = self._facts
        facts.request_id = head.request_id or f"gw-{time.time_ns():x}"
        if logs.ENABLED:
            logs.bind_request(facts.request_id)
        endpoint = classify(head.path)
        if endpoint is None:
            path = head.path.partition("?")[0][:200]
            facts.endpoint = clean_text(path)
            raise RequestError(
                404,
                f"Unknown request URL: {head.method} {path}. "
                "Supported: " + ", ".join(SUPPORTED_PATHS),
                code="unknown_url",
                error_type="invalid_request_error",
            )
        self._endpoint = endpoint
        facts.endpoint = endpoint.path
        facts.operation = endpoint.operation.value
        return endpoint

    def _check_method_and_type(self, head: Head, endpoint: Endpoint) -> None:
        if head.method != "POST":
            raise RequestError(405, f"{endpoint.path} only answers POST", code="method_not_allowed")
        content_type = head.headers.get("content-type", "")
        problem = content_type_problem(content_type) if content_type else None
        if problem is not None:
            raise RequestError(400, problem, code="invalid_content_type", param="content-type")

    async def _authenticate(self, head: Head) -> None:
        facts = self._facts
        headers = head.headers
        for name in _KEY_HEADERS:
            value = headers.get(name)
            if value is not None and REPLACEMENT in value:  # see wire.decode_request
                raise RequestError(
                    401,
                    f"The {name} header is not valid UTF-8: send the API key as given.",
                    code="invalid_api_key",
                    decision="denied",
                    error_type="invalid_request_error",
                )
        try:
            identity = await self._gw.auth.authenticate(head.headers)
        except AuthError as exc:
            if exc.record is not None:  # a real key, revoked or expired: say whose
                facts.key_id, facts.app_id = exc.record.key_id, exc.record.app
                facts.org_id, facts.environment = exc.record.org, exc.record.environment
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
        facts.key_id = identity.key_id
        facts.app_id = identity.app
        facts.org_id = identity.org
        facts.environment = identity.environment
        if logs.ENABLED:
            logs.bind_request(facts.request_id, identity.app)
        self._bound = self._rt.engine.bound(identity.app, identity.environment)

    async def _check_policies(self, route: Route) -> None:
        bound = self._bound
        if bound.empty:
            return
        pf = self._facts.policy_facts()
        pf.served_names = route.names

        async def estimate() -> int:
            return self._facts.estimated_tokens or 0

        tracer = telemetry.TRACER
        if tracer is None:
            denial = await self._rt.engine.check_body(
                bound, pf, self._limit_state, estimate, header_checks_done=self._header_checks_done
            )
        else:
            with tracer.start_as_current_span("gateway.policy_check") as span:
                denial = await self._rt.engine.check_body(
                    bound,
                    pf,
                    self._limit_state,
                    estimate,
                    header_checks_done=self._header_checks_done,
                )
                span.set_attribute(
                    "gateway.policies", len(bound.body_checks) + len(bound.body_limits)
                )
                if denial is not None:
                    span.set_attribute("gateway.denied_by", denial.policy or "")
        if denial is not None:
            raise self._denied(denial)
        self._facts.reservations = self._limit_state.reservations

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

    def _resolve(self, endpoint: Endpoint, body: dict[str, Any]) -> Route:
        facts = self._facts
        catalog = self._rt.catalog
        if endpoint.deployment is not None:
            facts.model = clean_text(endpoint.deployment[:200])
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
            raise _missing("model")
        # The app's text, bound for the usage record (no NUL: Postgres text cannot hold it).
        facts.model = clean_text(model[:200])
        route = catalog.resolve(model)
        if route is None and endpoint.style == "azure":
            # Azure's Responses API names the deployment in the body.
            route = catalog.resolve_deployment(model)
        if route is None:
            raise RequestError(
                404,
                f"The model `{model[:200]}` does not exist or you do not have access to it.",
                code="model_not_found",
                decision="denied",
                error_type="invalid_request_error",
            )
        return route

    def _forward(
        self, endpoint: Endpoint, route: Route, body: dict[str, Any]
    ) -> pb.ProcessingResponse:
        """The routing decision for the Lua filter, and the facts for the finisher."""
        facts = self._facts
        call = _call(endpoint, route, body)
        path, call_headers, new_body = call.path, call.headers, call.body
        if call.response_format:
            facts.response_format = call.response_format
        if call.translation:
            # The answer comes back in another API's shape: the response processor turns
            # it into the app's (and counts it), streamed or not.
            facts.translation = call.translation
            facts.include_usage = call.include_usage
        mode = _response_mode(stream=facts.stream, translated=bool(call.translation), chained=False)
        facts.response_processor = mode != contract.RESPONSE_NONE
        metadata = struct_pb2.Struct()
        # Built field by field: Struct.update's generic conversion costs several times more.
        fields = metadata.fields[ROUTE_NAMESPACE].struct_value.fields
        fields[contract.ROUTE_PATH].string_value = path
        fields[contract.ROUTE_PROVIDER].string_value = route.provider.name
        fields[contract.ROUTE_RESPONSE].string_value = mode
        set_struct = fields[contract.ROUTE_SET].struct_value
        set_struct.SetInParent()  # an empty table for Lua when there is nothing to set
        set_headers = set_struct.fields
        for name, value in call_headers:
            set_headers[name].string_value = value
        if self._bound.limited:
            for name, value in PolicyEngine.response_headers(self._limit_state):
                fields[RATELIMIT_METADATA_KEYS[name]].string_value = value
        if telemetry.TRACER is not None:
            facts.trace_parent = telemetry.current_traceparent()
        facts.write_to(metadata.fields[NAMESPACE].struct_value)
        return r.continue_request_body_with_metadata(metadata, body=new_body)

    def _forward_chain(
        self, endpoint: Endpoint, chain: tuple[Route, ...], body: dict[str, Any], raw: bytes
    ) -> pb.ProcessingResponse:
        """A model with fallbacks: every target's path, headers and body, for Envoy to try
        them in order (its upstream Lua filter applies the one of each attempt, see
        ``ext_proc.envoy_fallback``). The app's body goes on untouched; a target whose
        call changes it gets its own."""
        facts = self._facts
        calls: list[UpstreamCall] = []
        last = len(chain) - 1
        for position, target in enumerate(chain):
            # A native call may change the body it is given: each target gets its own.
            own = body if position == last else parse_request_json(raw)
            try:
                calls.append(_call(endpoint, target, own))
            except RequestError:
                if position == 0:
                    raise
                # This request cannot be put to that target: the first serves it alone.
                return self._forward(endpoint, chain[0], parse_request_json(raw))
        facts.targets = [
            TargetFacts(
                str(target.index),
                target.provider.name,
                target.deployment,
                call.response_format or target.adapter.response_format,
                call.translation,
                call.include_usage,
                target.price_code,
            )
            for target, call in zip(chain, calls, strict=True)
        ]
        facts.select_target(str(chain[0].index))  # until the answer says which served
        mode = _response_mode(
            stream=facts.stream,
            translated=any(call.translation for call in calls),
            chained=True,
        )
        facts.response_processor = mode != contract.RESPONSE_NONE
        metadata = struct_pb2.Struct()
        fields = metadata.fields[ROUTE_NAMESPACE].struct_value.fields
        fields[contract.ROUTE_PATH].string_value = calls[0].path
        fields[contract.ROUTE_PROVIDER].string_value = chain_key(
            chain[0].model.name, tuple(target.index for target in chain)
        )
        fields[contract.ROUTE_RESPONSE].string_value = mode
        fields[contract.ROUTE_SET].struct_value.SetInParent()  # credentials go per target, below
        per_target = fields[TARGETS_FIELD].struct_value.fields
        cleared: set[str] = set()
        # An attempt's body changes stay for the next attempt (and its content-length
        # with them): where any target has a body of its own, every target gets one.
        own_bodies = any(call.body is not None for call in calls)
        for target, call in zip(chain, calls, strict=True):
            entry = per_target[str(target.index)].struct_value.fields
            entry[contract.ROUTE_PATH].string_value = call.path
            entry[contract.ROUTE_HOST].string_value = authority(target.provider)
            set_struct = entry[contract.ROUTE_SET].struct_value
            set_struct.SetInParent()
            for name, value in call.headers:
                set_struct.fields[name].string_value = value
                cleared.add(name)
            if own_bodies:
                entry[contract.ROUTE_BODY].string_value = (call.body or raw).decode()
        clear = fields[CLEAR_FIELD].list_value
        for name in sorted(cleared):
            clear.values.add().string_value = name
        if self._bound.limited:
            for name, value in PolicyEngine.response_headers(self._limit_state):
                fields[RATELIMIT_METADATA_KEYS[name]].string_value = value
        if telemetry.TRACER is not None:
            facts.trace_parent = telemetry.current_traceparent()
        facts.write_to(metadata.fields[NAMESPACE].struct_value)
        return r.continue_request_body_with_metadata(metadata, body=None)

    def _list_models(self) -> pb.ProcessingResponse:
        catalog = self._rt.catalog
        bound = self._bound
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": (route.provider.name if (route := catalog.resolve(name)) else ""),
            }
            for name in catalog.model_names
            if bound.allows_model(name)
        ]
        self._record_now(Ending(status=200, decision="allowed"))
        return r.immediate_raw(
            200,
            orjson.dumps({"object": "list", "data": data}),
            [("content-type", "application/json")],
            details=contract.details("list_models"),
        )

    # ------------------------------------------------------------ outcomes

    def deny(self, error: RequestError) -> pb.ProcessingResponse:
        """Answer the app now; the exchange is over and its record is written."""
        if telemetry.TRACER is not None:
            self._facts.trace_parent = telemetry.current_traceparent()
        # Messages and params may echo the app's input: its control characters (NUL
        # above all, which the usage record cannot hold) are shown escaped.
        message = _escaped(error.message)
        param = _escaped(error.param) if error.param is not None else None
        self._record_now(
            Ending(
                status=error.status,
                decision=error.decision,  # type: ignore[arg-type]
                policy=error.policy,
                error_code=error.code,
                error_message=message[:500],
                latency_ms=round((time.time() - self._t0) * 1000.0, 3),
            )
        )
        headers = error.headers
        if self._bound.limited and not headers:
            headers = tuple(PolicyEngine.response_headers(self._limit_state))
        response = r.immediate(
            error.status,
            message,
            code=error.code,
            param=param,
            error_type=error.error_type,
            headers=headers,
            anthropic=self._endpoint is not None and self._endpoint.style == "anthropic",
        )
        # The request's facts and the decision go with the answer into Envoy's usage log:
        # if this process dies before its record is written, the log has what it needs.
        gw = response.dynamic_metadata.fields[NAMESPACE].struct_value
        self._facts.write_to(gw)
        gw.fields[DENIAL_FIELD].string_value = orjson.dumps(
            [error.decision, error.policy, error.code]
        ).decode()
        return response

    def internal_error(self, exc: BaseException) -> pb.ProcessingResponse:
        log.error("request %s failed in the gateway", self._facts.request_id, exc_info=exc)
        self._gw.metrics.stream_errors.labels(kind="internal").inc()
        return self.deny(
            RequestError(
                500,
                "The gateway failed to process this request "
                f"(request id {self._facts.request_id}).",
                code="gateway_internal_error",
            )
        )

    def close(self, *, cancelled: bool) -> None:
        """The request side's stream ended. A request that was forwarded is finished by
        the usage log or the response processor; nothing to do here."""

    def _record_now(self, ending: Ending) -> None:
        if not self._facts.request_id:  # failed before the request was even read
            self._facts.request_id = f"gw-{time.time_ns():x}"
        self._gw.spawn(finish(self._gw, self._facts, ending, "request"))


def _call(endpoint: Endpoint, route: Route, body: dict[str, Any]) -> UpstreamCall:
    try:
        return route.adapter.call(endpoint, route.deployment, body)
    except TranslationError as exc:
        raise RequestError(
            400,
            exc.message,
            code=exc.code,
            param=exc.param,
            error_type="invalid_request_error",
        ) from None


def _response_mode(*, stream: bool, translated: bool, chained: bool) -> str:
    """Which response filter Envoy runs for the answer (``ROUTE_RESPONSE``; the request
    Lua filter only copies it into the route header). The mutating response processor
    for an answer the gateway rewrites (a translation) and for a fallback chain's stream
    (chains have no observed route); the observe-only filter for any other stream, which
    the gateway only counts; none for a plain answer (the usage log finishes it)."""
    if translated or (stream and chained):
        return contract.RESPONSE_PROCESS
    if stream:
        return contract.RESPONSE_OBSERVE
    return contract.RESPONSE_NONE


def _chain(route: Route, operation: Operation) -> tuple[Route, tuple[Route, ...]]:
    """A model with fallbacks: (the first target for this operation, every target of its
    chain). A single target, or a chain with a target lacking its credential, is served
    by the first target that can serve it alone (no chain): Envoy's chains are rendered
    for whole sets of targets."""
    targets = [route.targets[index] for index in route.chains.get(operation, ())]
    usable = [target for target in targets if target.adapter.has_credential]
    if len(targets) >= 2 and len(usable) == len(targets):
        return targets[0], tuple(targets)
    if len(usable) < len(targets):
        missing = sorted({t.provider.name for t in targets if not t.adapter.has_credential})
        log.warning(
            "model %s: no credential for %s; its requests go to one target, without fallback",
            route.model.name,
            ", ".join(missing),
        )
    if usable:
        return usable[0], ()
    return (targets[0] if targets else route), ()


async def _estimate_prompt(endpoint: Endpoint, route: Route, body: dict[str, Any]) -> int:
    model, encoding = route.deployment, route.encoding_name
    operation = endpoint.operation
    if operation is Operation.CHAT:
        return await estimator.estimate_chat_async(
            model, body.get("messages"), body.get("tools"), encoding=encoding
        )
    if operation is Operation.EMBEDDINGS:
        return await estimator.estimate_input_async(model, body.get("input"), encoding=encoding)
    if operation is Operation.TEXT_COMPLETION:
        return await estimator.estimate_input_async(model, body.get("prompt"), encoding=encoding)
    if operation is Operation.MESSAGES:
        return await estimator.estimate_anthropic_async(
            model, body.get("system"), body.get("messages"), body.get("tools")
        )
    if operation is Operation.RESPONSES:
        return await estimator.estimate_responses_async(
            model, body.get("input"), body.get("instructions"), body.get("tools"), encoding=encoding
        )
    return 0


def _message_count(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """The conversation's turns (the CEL ``message_count``)."""
    if endpoint.operation is Operation.RESPONSES:
        items = body.get("input")
        return len(items) if isinstance(items, list) else int(isinstance(items, str))
    messages = body.get("messages")
    return len(messages) if isinstance(messages, list) else 0


def _validate(endpoint: Endpoint, body: dict[str, Any]) -> None:
    operation = endpoint.operation
    if operation is Operation.CHAT:
        _require_list(body, "messages")
    elif operation is Operation.MESSAGES:
        _require_list(body, "messages")
        if type(body.get("max_tokens")) is not int:
            raise RequestError(
                400,
                "Missing required parameter: 'max_tokens' (an integer).",
                code="missing_required_parameter",
                param="max_tokens",
            )
    elif operation is Operation.TEXT_COMPLETION:
        _require(body, "prompt")
    elif operation is Operation.EMBEDDINGS:
        _require(body, "input")
    elif operation is Operation.RESPONSES:
        value = body.get("input")
        if value is not None and not isinstance(value, str | list):
            raise RequestError(
                400,
                "'input' must be a string or an array of input items.",
                code="invalid_type",
                param="input",
            )
        for name in ("instructions", "previous_response_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise RequestError(
                    400, f"'{name}' must be a string.", code="invalid_type", param=name
                )


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        return parse_request_json(raw)
    except BodyError as exc:
        raise RequestError(400, exc.message, code=exc.code, param=exc.param) from None


def _escaped(text: str) -> str:
    """``text`` with each character that is not printable (C0 and C1 controls, NUL,
    line and paragraph separators, format characters, lone surrogates) written as its
    escape, ``\\u0000`` as repr and JSON write it. Printable text (nearly every
    message) is returned as is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _missing(name: str) -> RequestError:
    return RequestError(
        400,
        f"Missing required parameter: '{name}'.",
        code="missing_required_parameter",
        param=name,
    )


def _require(body: dict[str, Any], name: str) -> None:
    if body.get(name) is None:
        raise _missing(name)


def _require_list(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        raise _missing(name)
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
