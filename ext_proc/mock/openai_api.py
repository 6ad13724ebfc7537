"""OpenAI-compatible endpoints of the mock (also served on Azure's deployment paths).

Bodies follow OpenAI's published shapes field for field, so SDKs parse them and the
gateway's parsers meet what production sends.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from ext_proc.http import Response
from ext_proc.mock.counting import count_for_body
from ext_proc.mock.errors import BadRequest
from ext_proc.mock.knobs import Knobs
from ext_proc.mock.sse import SSE_HEADERS, data_event, json_response, sleep_ms, stream_events
from ext_proc.mock.text import Completion, CompletionWriter, split_chunks

_JSON_HEADER = ("content-type", "application/json")
SYSTEM_FINGERPRINT = "fp_mock"
DONE = b"data: [DONE]\n\n"

DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096

MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
_MODELS_CREATED = 1_700_000_000

WritersFor = Callable[[str], CompletionWriter]
NewId = Callable[[], str]


class OpenAIApi:
    """Answers chat completions, legacy completions, embeddings and the model list."""

    def __init__(self, writers: WritersFor, new_id: NewId) -> None:
        self._writers = writers
        self._new_id = new_id
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [_model_object(name) for name in MODELS],
            }
        )

    # --- chat completions ---

    async def chat(
        self, body: dict[str, Any], knobs: Knobs, model: str, body_bytes: int = 0
    ) -> Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        stream, include_usage = _stream_flags(body)
        cap = _max_tokens(body, "max_completion_tokens", "max_tokens")
        writer = self._writers(model)
        counter = writer.counter
        prompt = await count_for_body(
            lambda: counter.chat_prompt(messages, body.get("tools")), body_bytes
        )
        completion = writer.for_request(model, knobs, cap)
        finish = "length" if completion.truncated else "stop"
        usage = _usage(prompt, completion, knobs)
        ident = "chatcmpl-" + self._new_id()
        created = int(time.time())
        headers = [_JSON_HEADER, ("x-request-id", "req_" + ident[9:])]
        if not stream:
            await sleep_ms(completion.generation_ms(knobs))
            payload = orjson.dumps(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": completion.text,
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            )
            return json_response(headers, payload, knobs)

        base: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            event = dict(base)
            event["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
            if include_usage:
                event["usage"] = None
            return data_event(event)

        head = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        tail = [chunk({}, finish)]
        if include_usage:
            tail.append(data_event({**base, "choices": [], "usage": usage}))
        tail.append(DONE)
        events = stream_events(
            knobs,
            head,
            split_chunks(completion.pieces, knobs.chunks),
            lambda text: chunk({"content": text}, None),
            tail,
        )
        return Response(200, [*SSE_HEADERS, headers[1]], events)

    # --- legacy completions ---

    async def completions(
        self, body: dict[str, Any], knobs: Knobs, model: str, body_bytes: int = 0
    ) -> Response:
        prompt = body.get("prompt")
        if not _is_prompt(prompt):
            raise BadRequest(
                "'prompt' must be a string, an array of strings or of token arrays", "prompt"
            )
        stream, include_usage = _stream_flags(body)
        cap = _max_tokens(body, "max_tokens")
        writer = self._writers(model)
        completion = writer.for_request(model, knobs, cap)
        finish = "length" if completion.truncated else "stop"
        counter = writer.counter
        prompt_tokens = await count_for_body(lambda: counter.prompt(prompt), body_bytes)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion.tokens,
            "total_tokens": prompt_tokens + completion.tokens,
        }
        ident = "cmpl-" + self._new_id()
        created = int(time.time())
        headers = [_JSON_HEADER, ("x-request-id", "req_" + ident[5:])]
        base: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await sleep_ms(completion.generation_ms(knobs))
            payload = orjson.dumps(
                {
                    **base,
                    "choices": [
                        {
                            "text": completion.text,
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )
            return json_response(headers, payload, knobs)

        def chunk(text: str, finish_reason: str | None) -> bytes:
            event = dict(base)
            event["choices"] = [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ]
            if include_usage:
                event["usage"] = None
            return data_event(event)

        tail = [chunk("", finish)]
        if include_usage:
            tail.append(data_event({**base, "choices": [], "usage": usage}))
        tail.append(DONE)
        events = stream_events(
            knobs,
            (),
            split_chunks(completion.pieces, knobs.chunks),
            lambda text: chunk(text, None),
            tail,
        )
        return Response(200, [*SSE_HEADERS, headers[1]], events)

    # --- embeddings ---

    async def embeddings(
        self, body: dict[str, Any], knobs: Knobs, model: str, body_bytes: int = 0
    ) -> Response:
        items = _embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
        if (
            not isinstance(dimensions, int)
            or isinstance(dimensions, bool)
            or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS
        ):
            raise BadRequest(
                f"'dimensions' must be an integer in 1..{MAX_EMBEDDING_DIMENSIONS}", "dimensions"
            )
        encoding_format = body.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        counter = self._writers(model).counter
        tokens = await count_for_body(lambda: counter.prompt(items), body_bytes)
        data = []
        for index, item in enumerate(items):
            packed = _vector(item, dimensions)
            embedding: str | list[float] = (
                base64.b64encode(packed).decode("ascii")
                if encoding_format == "base64"
                else list(struct.unpack(f"<{dimensions}f", packed))
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        payload = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        headers = [_JSON_HEADER, ("x-request-id", "req_" + self._new_id())]
        return json_response(headers, payload, knobs)

    # --- models ---

    def models(self) -> Response:
        return Response(200, [_JSON_HEADER], self._models_body)

    def model(self, name: str) -> Response:
        return Response(200, [_JSON_HEADER], orjson.dumps(_model_object(name)))


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


def _max_tokens(body: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` present in the body (a positive integer), else None."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def _usage(prompt: int, completion: Completion, knobs: Knobs) -> dict[str, Any]:
    # Reasoning tokens are part of completion_tokens, as OpenAI reports them.
    completion_tokens = completion.tokens + knobs.reasoning_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": knobs.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": knobs.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _is_token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str) or _is_token_array(prompt):
        return True
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and (all(isinstance(p, str) for p in prompt) or all(_is_token_array(p) for p in prompt))
    )


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """The input items: strings or token arrays (one request holds one kind)."""
    if isinstance(value, str):
        if not value:
            raise BadRequest("'input' must not be empty", "input")
        return [value]
    if _is_token_array(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) and v for v in value):
            return list(value)
        if all(_is_token_array(v) for v in value):
            return list(value)
    raise BadRequest(
        "'input' must be a non-empty string, array of strings, token array or array of "
        "token arrays",
        "input",
    )


def _vector(item: str | list[int], dimensions: int) -> bytes:
    """A unit vector derived from the input alone, as little-endian float32."""
    seed = b"s" + item.encode("utf-8") if isinstance(item, str) else b"t" + orjson.dumps(item)
    raw = hashlib.shake_256(seed).digest(4 * dimensions)
    values = [(v / 2147483647.5) - 1.0 for v in struct.unpack(f"<{dimensions}I", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return struct.pack(f"<{dimensions}f", *(v / norm for v in values))
