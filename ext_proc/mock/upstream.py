"""The mock LLM upstream: OpenAI, Azure OpenAI and Anthropic shapes, honest ``usage``.

Tests treat it as ground truth and the benchmark uses it as the provider, so it answers
at once unless a knob says otherwise, and counts tokens with tiktoken by the rules in
``counting``. Knobs come from ``MockOptions`` (process defaults) and, per request, from
``x-mock-*`` headers (see ``knobs``).

Routes:
    GET    /healthz                                   readiness
    POST   /v1/chat/completions, /v1/completions, /v1/embeddings
    GET    /v1/models, /v1/models/{id}
    POST   /openai/deployments/{deployment}/{chat/completions|completions|embeddings}
           (Azure; ``api-version`` query parameter required)
    POST   /v1/messages                               (Anthropic)
    POST   /v1beta/models/{model}:{generateContent|streamGenerateContent|embedContent|
           batchEmbedContents}                        (Google Gemini; see gemini_api)
    POST   /v2/chat, /v2/embed                        (Cohere; its own error shape)
    POST   /v1/responses, /openai/responses           (OpenAI Responses API; Azure's)
    GET    /_mock/requests[?header=NAME:VALUE&path=P&limit=N]   what was received
    DELETE /_mock/requests                            forget it

Every request except ``/healthz`` and ``/_mock/*`` is recorded (bounded by
``MockOptions.history``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from ext_proc.http import HttpServer, Request, Response
from ext_proc.mock.anthropic_api import AnthropicApi
from ext_proc.mock.cohere_api import COHERE_ENCODING, CohereApi
from ext_proc.mock.counting import ANTHROPIC_ENCODING, TokenCounter
from ext_proc.mock.errors import (
    BadRequest,
    anthropic_error,
    azure_error,
    forced_error,
    openai_error,
)
from ext_proc.mock.gemini_api import GEMINI_ENCODING, GEMINI_PREFIX, GeminiApi
from ext_proc.mock.knobs import KnobError, Knobs, MockOptions, read_knobs
from ext_proc.mock.openai_api import OpenAIApi
from ext_proc.mock.responses_api import ResponsesApi
from ext_proc.mock.sse import sleep_ms
from ext_proc.mock.text import CompletionWriter
from ext_proc.tokens.encodings import ENCODING_FILES, encoding_name_for_model, get_encoding

__all__ = [
    "MockOptions",
    "MockUpstream",
    "ReceivedRequest",
    "add_arguments",
    "options_from_args",
    "run",
]

_AZURE_PREFIX = "/openai/deployments/"
_JSON_HEADER = ("content-type", "application/json")
# Model names seen in requests -> their writer; bounded because names come from clients.
_MAX_MODELS = 1024


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the mock received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str  # decoded as UTF-8 (invalid bytes replaced)
    received_at: float  # Unix time

    def json(self) -> Any:
        return orjson.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
            "received_at": self.received_at,
        }


_Route = Callable[[Request, Knobs], Awaitable[Response]]


class MockUpstream:
    """The mock as an ``HttpServer`` handler; ``start``/``close`` run it on a port."""

    def __init__(self, options: MockOptions | None = None) -> None:
        self.options = options if options is not None else MockOptions()
        self.received: deque[ReceivedRequest] = deque(maxlen=self.options.history)
        self._default_knobs = Knobs.defaults(self.options)
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(5).hex()
        self._writers_by_encoding: dict[str, CompletionWriter] = {}
        self._writers_by_model: dict[str, CompletionWriter] = {}
        self._openai = OpenAIApi(self._writer_for_model, self._new_id)
        self._responses_api = ResponsesApi(self._writer_for_model, self._new_id)
        self._anthropic = AnthropicApi(
            lambda: self._writer_for_encoding(ANTHROPIC_ENCODING), self._new_id
        )
        self._cohere = CohereApi(lambda: self._writer_for_encoding(COHERE_ENCODING), self._new_id)
        self._gemini = GeminiApi(lambda: self._writer_for_encoding(GEMINI_ENCODING), self._new_id)
        self._server: HttpServer | None = None
        self.port: int | None = None  # the bound port, once started
        self._routes: dict[tuple[str, str], _Route] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/openai/responses"): self._responses,  # Azure (deployment in the body)
        }
        # Azure: /openai/deployments/{deployment}/{operation}
        self._azure_operations: dict[str, Callable[..., Awaitable[Response]]] = {
            "chat/completions": self._chat,
            "completions": self._completions,
            "embeddings": self._embeddings,
        }

    # --- lifecycle ---

    async def start(self, host: str, port: int) -> int:
        """Load the encodings (off the loop), then listen; returns the bound port."""
        await asyncio.to_thread(self.warm_up)
        self._server = HttpServer(self.handle)
        self.port = await self._server.start(host, port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None
            self.port = None

    def warm_up(self) -> None:
        """Load every encoding now so that no request pays for it."""
        for name in ENCODING_FILES:
            self._writer_for_encoding(name)

    # --- the handler ---

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_mock/"):
            return self._introspect(request)
        if path == "/healthz":
            return Response(200, [_JSON_HEADER], b'{"status":"ok"}')
        self.received.append(
            ReceivedRequest(
                request.method,
                path,
                request.query,
                request.headers,
                request.body.decode("utf-8", errors="replace"),
                time.time(),
            )
        )
        if path in CohereApi.paths:  # Cohere answers knobs and bad bodies in its own shape
            return await self._cohere.handle(request, self._default_knobs)
        if path.startswith(GEMINI_PREFIX):
            return await self._gemini.handle(request, self._default_knobs)
        route = self._routes.get((request.method, path))
        if route is None:
            found = self._path_route(request)
            if isinstance(found, Response):
                return found
            route = found
        anthropic = path == "/v1/messages"
        try:
            knobs = read_knobs(request.headers, self._default_knobs)
        except KnobError as exc:
            return _bad_request(str(exc), anthropic=anthropic)
        await sleep_ms(knobs.latency_ms)
        if knobs.status is not None:
            return forced_error(knobs.status, anthropic=anthropic)
        try:
            return await route(request, knobs)
        except BadRequest as exc:
            return _bad_request(exc.message, exc.param, anthropic=anthropic)

    # --- OpenAI ---

    async def _chat(
        self, request: Request, knobs: Knobs, deployment: str | None = None
    ) -> Response:
        body = _json_body(request)
        return await self._openai.chat(body, knobs, _model(body, deployment), len(request.body))

    async def _completions(
        self, request: Request, knobs: Knobs, deployment: str | None = None
    ) -> Response:
        body = _json_body(request)
        return await self._openai.completions(
            body, knobs, _model(body, deployment), len(request.body)
        )

    async def _embeddings(
        self, request: Request, knobs: Knobs, deployment: str | None = None
    ) -> Response:
        body = _json_body(request)
        return await self._openai.embeddings(
            body, knobs, _model(body, deployment), len(request.body)
        )

    async def _models(self, request: Request, knobs: Knobs) -> Response:
        return self._openai.models()

    async def _model(self, request: Request, knobs: Knobs) -> Response:
        return self._openai.model(request.path[len("/v1/models/") :])

    # --- Azure OpenAI ---

    def _path_route(self, request: Request) -> _Route | Response:
        """Routes with a parameter in the path, or the error answering the request."""
        path, method = request.path, request.method
        if method == "POST" and path.startswith(_AZURE_PREFIX):
            deployment, _, operation = path[len(_AZURE_PREFIX) :].partition("/")
            handler = self._azure_operations.get(operation)
            if not deployment or handler is None:
                return azure_error(404, "404", "Resource not found")
            if not parse_qs(request.query).get("api-version"):
                return azure_error(
                    400,
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                )
            return functools.partial(handler, deployment=deployment)
        if method == "GET" and path.startswith("/v1/models/"):
            return self._model
        return openai_error(404, f"Invalid URL ({method} {path})")

    async def _responses(self, request: Request, knobs: Knobs) -> Response:
        body = _json_body(request)
        return await self._responses_api.create(body, knobs, _model(body, None), len(request.body))

    # --- Anthropic ---

    async def _messages(self, request: Request, knobs: Knobs) -> Response:
        return await self._anthropic.messages(_json_body(request), knobs, len(request.body))

    # --- introspection ---

    def _introspect(self, request: Request) -> Response:
        if request.path != "/_mock/requests":
            return openai_error(404, f"Invalid URL ({request.method} {request.path})")
        if request.method == "DELETE":
            cleared = len(self.received)
            self.received.clear()
            return Response(200, [_JSON_HEADER], orjson.dumps({"cleared": cleared}))
        if request.method != "GET":
            return openai_error(405, f"{request.method} not allowed on /_mock/requests")
        params = parse_qs(request.query)
        selected = list(self.received)
        for wanted in params.get("header", []):
            name, sep, value = wanted.partition(":")
            if not sep:
                return openai_error(400, "header filter must be NAME:VALUE", param="header")
            name = name.strip().lower()
            value = value.strip()
            selected = [r for r in selected if r.headers.get(name) == value]
        for wanted in params.get("path", []):
            selected = [r for r in selected if r.path == wanted]
        limit = params.get("limit")
        if limit:
            try:
                count = int(limit[-1])
            except ValueError:
                return openai_error(400, "limit must be an integer", param="limit")
            if count < 0:
                return openai_error(400, "limit must not be negative", param="limit")
            selected = selected[len(selected) - count :] if count else []
        return Response(200, [_JSON_HEADER], orjson.dumps([r.to_dict() for r in selected]))

    # --- helpers ---

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):010x}"

    def _writer_for_encoding(self, name: str) -> CompletionWriter:
        writer = self._writers_by_encoding.get(name)
        if writer is None:
            writer = CompletionWriter(TokenCounter(get_encoding(name)))
            self._writers_by_encoding[name] = writer
        return writer

    def _writer_for_model(self, model: str) -> CompletionWriter:
        writer = self._writers_by_model.get(model)
        if writer is None:
            if len(self._writers_by_model) >= _MAX_MODELS:
                self._writers_by_model.clear()
            writer = self._writer_for_encoding(encoding_name_for_model(model))
            self._writers_by_model[model] = writer
        return writer


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any], deployment: str | None) -> str:
    model = body.get("model")
    if isinstance(model, str) and model:
        return model
    if deployment is not None:
        return deployment
    raise BadRequest("you must provide a model parameter", "model")


def _bad_request(message: str, param: str | None = None, *, anthropic: bool = False) -> Response:
    if anthropic:
        return anthropic_error(400, message)
    return openai_error(400, message, param=param)


# --- command line ---


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MockOptions()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8001, help="port to listen on, 0 for any (default: 8001)")
    add(
        "--latency-ms",
        type=_non_negative,
        default=defaults.latency_ms,
        help="delay before the response headers",
    )
    add(
        "--ttft-ms",
        type=_non_negative,
        default=defaults.ttft_ms,
        help="delay before the first stream event",
    )
    add(
        "--chunk-delay-ms",
        type=_non_negative,
        default=defaults.chunk_delay_ms,
        help="delay between streamed content chunks",
    )
    add(
        "--chunks",
        type=_positive,
        default=defaults.chunks,
        help="content chunks per stream (default: one per token)",
    )
    add(
        "--completion-tokens",
        type=_non_negative,
        default=defaults.completion_tokens,
        help="completion length in tokens (default: a short sentence naming the model)",
    )
    add(
        "--history",
        type=_positive,
        default=defaults.history,
        help="requests kept for GET /_mock/requests (default: %(default)s)",
    )


def options_from_args(ns: argparse.Namespace) -> MockOptions:
    defaults = MockOptions()
    return MockOptions(
        latency_ms=ns.latency_ms,
        ttft_ms=ns.ttft_ms,
        chunk_delay_ms=ns.chunk_delay_ms,
        chunks=ns.chunks,
        completion_tokens=ns.completion_tokens,
        history=getattr(ns, "history", defaults.history),
    )


def run(host: str, port: int, options: MockOptions) -> None:
    """Serve until SIGINT/SIGTERM (blocking, on uvloop)."""
    import uvloop

    uvloop.run(_serve(host, port, options))


async def _serve(host: str, port: int, options: MockOptions) -> None:
    mock = MockUpstream(options)
    bound = await mock.start(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"mock upstream listening on http://{shown}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await mock.close()
