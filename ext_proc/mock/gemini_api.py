"""Google Gemini API (v1beta) endpoints of the mock, under ``/v1beta/``.

    POST /v1beta/models/{model}:generateContent
    POST /v1beta/models/{model}:streamGenerateContent[?alt=sse]
    POST /v1beta/models/{model}:embedContent
    POST /v1beta/models/{model}:batchEmbedContents

Bodies follow the Gemini API reference field for field (proto3 JSON: zero counts and a
candidate ``index`` of 0 are left out; streams are ``data: {...}`` events ending in
CRLF, without ``[DONE]``; the last carries ``finishReason`` and the final usage, the
others a running ``usageMetadata`` with the prompt count only), so the google-genai SDK
parses them and the gateway's parser meets what production sends. Every request needs
a key (``x-goog-api-key`` or ``?key=``), as Gemini's does; errors, and the answer to
``x-mock-status``, are Gemini's ``{"error": {"code", "message", "status"}}``. An unknown
field in the request is refused as Gemini refuses it ("Invalid JSON payload received.
Unknown name ..."), so a translation that writes a wrong name fails here too.

Token counts are approximate: Gemini's tokenizer is not tiktoken, so text is counted with
o200k_base (``GEMINI_ENCODING``) by these rules, with the mock's ``TokenCounter``:
prompt = tokens of every text part (system instruction and contents) + for a functionCall
tokens(name) + tokens(compact JSON of args), for a functionResponse tokens(name) +
tokens(compact JSON of response) + 258 per inline or file part (Gemini's documented cost
of a small image) + tokens(compact JSON of ``tools``); no per-turn overhead. Candidates =
the completion's tokens for each candidate (summed over ``candidateCount``); a function
call costs tokens(name) + tokens(compact JSON of args). ``x-mock-cached-tokens`` becomes
``cachedContentTokenCount`` (inside ``promptTokenCount``), ``x-mock-reasoning-tokens``
``thoughtsTokenCount`` (beside the candidates, in ``totalTokenCount``). Embeddings report
no usage, as Gemini's do.

Function calling: when ``tools`` declare functions and the mode is not NONE, the model
calls the first allowed function (arguments made from its schema's properties) unless
the last turn answered a call (mode ANY calls anyway). Like Gemini 3, every function
call part carries a ``thoughtSignature``, and a request whose current turn (after the
last user text) replays a function call turn without one is refused; the number of
function responses must match the calls they answer.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from ext_proc.http import Request, Response
from ext_proc.mock.counting import TokenCounter, count_for_body
from ext_proc.mock.knobs import KnobError, Knobs, read_knobs
from ext_proc.mock.sse import SSE_HEADERS, json_response, sleep_ms, stream_events
from ext_proc.mock.text import Completion, CompletionWriter, split_chunks

GEMINI_PREFIX = "/v1beta/"
# Gemini's tokenizer is not published as tiktoken: o200k_base stands in for it.
GEMINI_ENCODING = "o200k_base"
MEDIA_PART_TOKENS = 258
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 3072
MAX_CANDIDATES = 8

_JSON_HEADER = ("content-type", "application/json; charset=UTF-8")
# HTTP status -> google.rpc status name, as Gemini answers them.
_STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_REQUEST_FIELDS = frozenset(
    {
        "contents",
        "systemInstruction",
        "generationConfig",
        "tools",
        "toolConfig",
        "safetySettings",
        "cachedContent",
    }
)
_GENERATION_FIELDS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "mediaResolution",
    }
)
_PART_FIELDS = frozenset(
    {
        "text",
        "inlineData",
        "fileData",
        "functionCall",
        "functionResponse",
        "executableCode",
        "codeExecutionResult",
        "thought",
        "thoughtSignature",
        "videoMetadata",
    }
)
_EMBED_FIELDS = frozenset({"model", "content", "taskType", "title", "outputDimensionality"})
_CONTENT_FIELDS = frozenset({"role", "parts"})
_CALL_FIELDS = frozenset({"id", "name", "args"})
_RESPONSE_FIELDS = frozenset({"id", "name", "response", "willContinue", "scheduling", "parts"})
_TOOL_FIELDS = frozenset(
    {
        "functionDeclarations",
        "googleSearch",
        "googleSearchRetrieval",
        "codeExecution",
        "urlContext",
        "fileSearch",
        "googleMaps",
        "computerUse",
    }
)
_DECLARATION_FIELDS = frozenset(
    {
        "name",
        "description",
        "parameters",
        "parametersJsonSchema",
        "response",
        "responseJsonSchema",
        "behavior",
    }
)
_TOOL_CONFIG_FIELDS = frozenset({"functionCallingConfig", "retrievalConfig"})
_CALLING_FIELDS = frozenset({"mode", "allowedFunctionNames"})


class GeminiError(Exception):
    """A request Gemini would refuse: answered in its error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def gemini_error(status: int, message: str) -> Response:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"),
    }
    if status == 429:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
        ]
    return Response(status, [_JSON_HEADER], orjson.dumps({"error": error}))


def _invalid(message: str) -> GeminiError:
    return GeminiError(400, message)


def _unknown_field(name: str, where: str) -> GeminiError:
    return _invalid(
        f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field."
    )


class GeminiApi:
    """Answers the Gemini routes; ``handle`` owns everything under ``GEMINI_PREFIX``."""

    def __init__(self, writer: Callable[[], CompletionWriter], new_id: Callable[[], str]) -> None:
        self._writer = writer
        self._new_id = new_id

    async def handle(self, request: Request, defaults: Knobs) -> Response:
        resource, _, method = unquote(request.path[len(GEMINI_PREFIX) :]).rpartition(":")
        query = parse_qs(request.query)
        if request.method != "POST" or not resource.startswith(("models/", "tunedModels/")):
            return gemini_error(404, f"The requested URL {request.path} was not found.")
        model = resource.partition("/")[2]
        if not model:
            return gemini_error(404, f"The requested URL {request.path} was not found.")
        if not request.headers.get("x-goog-api-key") and not query.get("key"):
            return gemini_error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to "
                "call this API.",
            )
        try:
            knobs = read_knobs(request.headers, defaults)
        except KnobError as exc:
            return gemini_error(400, str(exc))
        await sleep_ms(knobs.latency_ms)
        if knobs.status is not None:
            return gemini_error(
                knobs.status, f"mock upstream error (x-mock-status: {knobs.status})"
            )
        try:
            body = _json_body(request.body)
            if method == "generateContent":
                return await self._generate(resource, model, body, knobs, None, len(request.body))
            if method == "streamGenerateContent":
                sse = query.get("alt", [""])[-1] == "sse"
                return await self._generate(resource, model, body, knobs, sse, len(request.body))
            if method == "embedContent":
                return self._embed(resource, [body], knobs, single=True)
            if method == "batchEmbedContents":
                requests = _fields(body, frozenset({"requests"}), "").get("requests")
                if not isinstance(requests, list) or not requests:
                    raise _invalid("* BatchEmbedContentsRequest.requests: must not be empty")
                return self._embed(resource, requests, knobs, single=False)
        except GeminiError as exc:
            return gemini_error(exc.status, exc.message)
        return gemini_error(404, f"The requested URL {request.path} was not found.")

    # ------------------------------------------------------------ generateContent

    async def _generate(
        self,
        resource: str,
        model: str,
        body: dict[str, Any],
        knobs: Knobs,
        sse: bool | None,  # None: not a stream
        body_bytes: int,
    ) -> Response:
        body = _request(body)
        config = body.get("generationConfig", {})
        cap = _positive(config.get("maxOutputTokens"), "max_output_tokens")
        count = _positive(config.get("candidateCount"), "candidate_count") or 1
        if count > MAX_CANDIDATES:
            raise _invalid(f"candidate_count must be between 1 and {MAX_CANDIDATES}")
        writer = self._writer()
        counter = writer.counter
        prompt = await count_for_body(lambda: _prompt_tokens(counter, body), body_bytes)
        call = _function_to_call(body)
        if call is not None:
            answer = _Answer.of_call(counter, call, self._new_id())
        else:
            answer = _Answer.of_text(writer.for_request(model, knobs, cap))
        cached = min(knobs.cached_tokens, prompt)
        usage = _usage(prompt, answer.tokens * count, knobs.reasoning_tokens, cached)
        running = _running_usage(prompt, knobs.reasoning_tokens, cached)
        base = {"modelVersion": model, "responseId": self._new_id()}
        headers = [_JSON_HEADER]
        if sse is None:
            await sleep_ms(answer.completion.generation_ms(knobs) if answer.completion else 0)
            payload = {
                "candidates": [
                    _candidate(i, answer.final_parts(), answer.finish) for i in range(count)
                ],
                "usageMetadata": usage,
                **base,
            }
            return json_response(headers, orjson.dumps(payload), knobs)

        pieces = answer.pieces(knobs)
        last = len(pieces) - 1
        write = _sse_frame if sse else _array_frame()

        def frame(position: str) -> bytes:
            # stream_events frames text; here each "text" is the event's position.
            n = int(position)
            final = n == last
            return write(
                {
                    "candidates": [
                        _candidate(i, pieces[n], answer.finish if final else None)
                        for i in range(count)
                    ],
                    "usageMetadata": usage if final else running,
                    **base,
                }
            )

        events = stream_events(knobs, (), [str(n) for n in range(len(pieces))], frame, ())
        if sse:
            return Response(200, [*SSE_HEADERS], events)
        return Response(200, [_JSON_HEADER], _close_array(events))

    # ------------------------------------------------------------- embeddings

    def _embed(self, resource: str, requests: list[Any], knobs: Knobs, *, single: bool) -> Response:
        vectors = []
        for i, raw in enumerate(requests):
            where = "" if single else f"requests[{i}]"
            item = _fields(raw, _EMBED_FIELDS, where)
            if not single and item.get("model") != resource:
                raise _invalid(
                    f"* BatchEmbedContentsRequest.{where}.model: the model of every request "
                    f"must be the model in the URL ({resource})"
                )
            content = _content(item.get("content"), f"{where}.content" if where else "content")
            text = "".join(
                p.get("text", "") for p in content["parts"] if isinstance(p.get("text"), str)
            )
            if not text:
                raise _invalid("* EmbedContentRequest.content: contains an empty Part.")
            dimensions = item.get("outputDimensionality", DEFAULT_EMBEDDING_DIMENSIONS)
            if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
                raise _invalid(
                    f"output_dimensionality must be between 1 and {MAX_EMBEDDING_DIMENSIONS}"
                )
            vectors.append({"values": _vector(text, dimensions)})
        payload = {"embedding": vectors[0]} if single else {"embeddings": vectors}
        return json_response([_JSON_HEADER], orjson.dumps(payload), knobs)


class _Answer:
    """What the mock model says: text (token pieces) or one function call."""

    def __init__(
        self,
        completion: Completion | None,
        call_part: dict[str, Any] | None,
        tokens: int,
        finish: str,
    ) -> None:
        self.completion = completion
        self.call_part = call_part
        self.tokens = tokens
        self.finish = finish

    @classmethod
    def of_text(cls, completion: Completion) -> _Answer:
        finish = "MAX_TOKENS" if completion.truncated else "STOP"
        return cls(completion, None, completion.tokens, finish)

    @classmethod
    def of_call(cls, counter: TokenCounter, call: dict[str, Any], ident: str) -> _Answer:
        tokens = counter.text(call["name"]) + counter.text(_compact(call["args"]))
        # Gemini 2.5+ sign their function calls: an opaque base64 token to send back.
        signature = hashlib.sha256(ident.encode()).digest()
        part = {"functionCall": call, "thoughtSignature": base64.b64encode(signature).decode()}
        return cls(None, part, tokens, "STOP")

    def final_parts(self) -> list[dict[str, Any]]:
        if self.call_part is not None:
            return [self.call_part]
        assert self.completion is not None
        return [{"text": self.completion.text}]

    def pieces(self, knobs: Knobs) -> list[list[dict[str, Any]]]:
        """The parts of each stream event: text chunks, or the call whole (as Gemini)."""
        if self.call_part is not None:
            return [[self.call_part]]
        assert self.completion is not None
        texts = split_chunks(self.completion.pieces, knobs.chunks)
        return [[{"text": text}] for text in texts] or [[{"text": ""}]]


def _candidate(index: int, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    if index:
        candidate["index"] = index  # proto3 JSON leaves out a 0
    return candidate


def _usage(prompt: int, candidates: int, thoughts: int, cached: int) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates + thoughts
    if cached:
        usage["cachedContentTokenCount"] = cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if cached:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    if candidates:
        usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": candidates}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _running_usage(prompt: int, thoughts: int, cached: int) -> dict[str, Any]:
    """A stream chunk's usage before the end: the prompt (and thinking, done first)."""
    usage: dict[str, Any] = {"promptTokenCount": prompt, "totalTokenCount": prompt + thoughts}
    if cached:
        usage["cachedContentTokenCount"] = cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _sse_frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


def _array_frame() -> Callable[[dict[str, Any]], bytes]:
    """Without ``alt=sse`` the stream is one JSON array, written element by element."""
    first = True

    def frame(payload: dict[str, Any]) -> bytes:
        nonlocal first
        head = b"[" if first else b",\r\n"
        first = False
        return head + orjson.dumps(payload)

    return frame


async def _close_array(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for event in events:
        yield event
    yield b"]"


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(body, dict):
        raise _invalid("Invalid JSON payload received. Expected an object.")
    return body


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _invalid(f"{name} must be a positive integer")
    return value


def _compact(value: Any) -> str:
    return orjson.dumps(value).decode()


# ----------------------------------------------------------------- validation


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _fields(obj: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    """``obj``'s fields under their lowerCamelCase names, as proto3 JSON parsers read
    both spellings (the google-genai SDK sends some in snake_case); an unknown one is
    refused, as Gemini refuses it."""
    if not isinstance(obj, dict):
        raise _invalid(f"Invalid JSON payload received. '{where or 'request'}' must be an object.")
    out: dict[str, Any] = {}
    for name, value in obj.items():
        key = _camel(name)
        if key not in allowed:
            raise _unknown_field(name, where)
        out[key] = value
    return out


def _request(body: dict[str, Any]) -> dict[str, Any]:
    """A generateContent body checked and normalised (see ``_fields``)."""
    body = _fields(body, _REQUEST_FIELDS, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified")
    body["contents"] = [
        _content(content, f"contents[{i}]", needs_role=True) for i, content in enumerate(contents)
    ]
    _check_turns(body["contents"])
    if body.get("systemInstruction") is not None:
        body["systemInstruction"] = _content(body["systemInstruction"], "system_instruction")
    body["generationConfig"] = _fields(
        body.get("generationConfig") or {}, _GENERATION_FIELDS, "generation_config"
    )
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("Invalid JSON payload received. 'tools' must be a list.")
        body["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    if body.get("toolConfig") is not None:
        config = _fields(body["toolConfig"], _TOOL_CONFIG_FIELDS, "tool_config")
        if config.get("functionCallingConfig") is not None:
            config["functionCallingConfig"] = _fields(
                config["functionCallingConfig"],
                _CALLING_FIELDS,
                "tool_config.function_calling_config",
            )
        body["toolConfig"] = config
    return body


def _tool(tool: Any, where: str) -> dict[str, Any]:
    tool = _fields(tool, _TOOL_FIELDS, where)
    declarations = tool.get("functionDeclarations")
    if declarations is not None:
        if not isinstance(declarations, list):
            raise _invalid(f"Invalid JSON payload received. '{where}' must hold a list.")
        tool["functionDeclarations"] = [
            _fields(d, _DECLARATION_FIELDS, f"{where}.function_declarations[{j}]")
            for j, d in enumerate(declarations)
        ]
    return tool


def _content(content: Any, where: str, *, needs_role: bool = False) -> dict[str, Any]:
    content = _fields(content, _CONTENT_FIELDS, where)
    role = content.get("role")
    if needs_role and role not in ("user", "model"):
        raise _invalid(
            f"* GenerateContentRequest.{where}.role: Please use a valid role: user, model."
        )
    parts = content.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _invalid(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.")
    content["parts"] = [_part(part, f"{where}.parts[{j}]") for j, part in enumerate(parts)]
    return content


def _part(part: Any, where: str) -> dict[str, Any]:
    part = _fields(part, _PART_FIELDS, where)
    if part.get("functionCall") is not None:
        call = _fields(part["functionCall"], _CALL_FIELDS, f"{where}.function_call")
        if not call.get("name"):
            raise _invalid(f"* GenerateContentRequest.{where}.function_call.name: required")
        part["functionCall"] = call
    if part.get("functionResponse") is not None:
        response = _fields(part["functionResponse"], _RESPONSE_FIELDS, f"{where}.function_response")
        if not response.get("name") or not isinstance(response.get("response"), dict):
            raise _invalid(
                f"* GenerateContentRequest.{where}.function_response: name and response "
                "(an object) are required"
            )
        part["functionResponse"] = response
    return part


def _calls(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in content["parts"] if "functionCall" in p]


def _responses(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in content["parts"] if "functionResponse" in p]


def _check_turns(contents: list[dict[str, Any]]) -> None:
    # The current turn: everything after the last user text (Gemini 3's definition).
    current = 0
    for i, content in enumerate(contents):
        if content["role"] == "user" and any(
            isinstance(p.get("text"), str) for p in content["parts"]
        ):
            current = i
    for i, content in enumerate(contents):
        calls = _calls(content) if content["role"] == "model" else []
        if not calls:
            continue
        if i > current and "thoughtSignature" not in calls[0]:
            raise _invalid(
                f"Function call is missing a thought_signature in functionCall parts. This "
                f"is required for tools to work correctly, and missing thought_signature may "
                f"lead to degraded model performance. Additional data, function call "
                f"`default_api:{calls[0]['functionCall']['name']}` , position {i + 1}."
            )
        following = contents[i + 1] if i + 1 < len(contents) else None
        if following is not None and len(_responses(following)) != len(calls):
            raise _invalid(
                "Please ensure that the number of function response parts is equal to the "
                "number of function call parts of the function call turn."
            )


def _declarations(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    found: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else ():
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        if isinstance(declarations, list):
            found.extend(d for d in declarations if isinstance(d, dict) and d.get("name"))
    return found


def _function_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The call the mock model makes, if any (see the module docstring)."""
    declarations = _declarations(body)
    if not declarations:
        return None
    tool_config = body.get("toolConfig")
    calling = tool_config.get("functionCallingConfig") if isinstance(tool_config, dict) else None
    calling = calling if isinstance(calling, dict) else {}
    mode = calling.get("mode", "AUTO")
    if mode == "NONE":
        return None
    last = body["contents"][-1]
    if mode != "ANY" and _responses(last):
        return None  # the call was answered: now the model speaks
    allowed = calling.get("allowedFunctionNames")
    chosen = declarations[0]
    if isinstance(allowed, list) and allowed:
        chosen = next((d for d in declarations if d["name"] in allowed), chosen)
    schema = chosen.get("parametersJsonSchema") or chosen.get("parameters") or {}
    return {"name": chosen["name"], "args": _sample_args(schema)}


def _sample_args(schema: Any) -> dict[str, Any]:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    args: dict[str, Any] = {}
    for name, spec in (properties or {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        kind = str(kind).lower() if kind else "string"
        enum = spec.get("enum") if isinstance(spec, dict) else None
        if isinstance(enum, list) and enum:
            args[name] = enum[0]
        elif kind in ("integer", "number"):
            args[name] = 1
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = "mock"
    return args


def _prompt_tokens(counter: TokenCounter, body: dict[str, Any]) -> int:
    total = 0
    system = body.get("systemInstruction")
    if isinstance(system, dict):
        total += _parts_tokens(counter, system.get("parts"))
    for content in body["contents"]:
        total += _parts_tokens(counter, content.get("parts"))
    tools = body.get("tools")
    if tools is not None:
        total += counter.tools(tools)
    return total


def _parts_tokens(counter: TokenCounter, parts: Iterable[Any] | None) -> int:
    total = 0
    for part in parts or ():
        if not isinstance(part, dict):
            continue
        text = part.get("text")
        if isinstance(text, str):
            total += counter.text(text)
        call = part.get("functionCall")
        if isinstance(call, dict):
            total += counter.text(str(call.get("name", "")))
            total += counter.text(_compact(call.get("args", {})))
        response = part.get("functionResponse")
        if isinstance(response, dict):
            total += counter.text(str(response.get("name", "")))
            total += counter.text(_compact(response.get("response", {})))
        if "inlineData" in part or "fileData" in part:
            total += MEDIA_PART_TOKENS
    return total


def _vector(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from the text alone (float32 values, as Gemini's)."""
    raw = hashlib.shake_256(b"gemini:" + text.encode("utf-8")).digest(4 * dimensions)
    values = [(v / 2147483647.5) - 1.0 for v in struct.unpack(f"<{dimensions}I", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))
