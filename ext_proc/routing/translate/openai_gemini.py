"""OpenAI Chat Completions and Embeddings -> Google Gemini API (v1beta), and the answers back.

An app using the stock OpenAI SDK may name a model that Gemini serves.
``to_gemini_request`` turns its ``/v1/chat/completions`` body into a
``models/{deployment}:generateContent`` (or ``:streamGenerateContent?alt=sse``) body, and
``GenerateContentToChatCompletion`` turns Gemini's answer (a JSON
``GenerateContentResponse``, an SSE stream of them, or an error) into what the OpenAI SDK
expects. ``to_gemini_embeddings_request`` and ``EmbeddingsToOpenAI`` do the same for
``/v1/embeddings`` -> ``:batchEmbedContents``. The gateway's own accounting does not
read the translation: it parses Gemini's usage from the provider's bytes
(``ext_proc.tokens.parsers.google``).

Chat request parameters. A parameter set to ``null`` counts as absent. A parameter that
would change the answer if it were dropped is refused (400 naming it) rather than
ignored; a parameter not in this table is refused too, as OpenAI refuses unknown ones.

============================  =============================================================
OpenAI                        Gemini
============================  =============================================================
model                         the path: models/{deployment}
messages: system, developer   systemInstruction.parts (text, in order; moved out of the
                              turns, so a mid-conversation system message applies to the
                              whole chat)
messages: user                role "user": text; image_url -> inlineData (base64 data: URL)
                              or fileData (http(s) URL; ``detail`` dropped); input_audio ->
                              inlineData audio/wav|mp3; file.file_data (a data: URL) ->
                              inlineData
messages: assistant           role "model": text (and refusal) parts; tool_calls ->
                              functionCall parts {id, name, args} (arguments must be a JSON
                              object), with the thoughtSignature the id carries (below)
messages: tool                functionResponse {id, name (from the assistant call with that
                              id), response: the content if it is a JSON object, else
                              {"output": content}} in a "user" turn
(turn order)                  consecutive turns of one role are merged, so every function
                              call turn is answered by one turn holding all its responses
messages[].name               dropped (no equivalent)
max_completion_tokens,        generationConfig.maxOutputTokens (the first one set)
max_tokens
temperature, top_p, top_k,    generationConfig.temperature, topP, topK (top_k via
seed, frequency_penalty,      extra_body), seed, frequencyPenalty, presencePenalty
presence_penalty
stop (string or list)         generationConfig.stopSequences
n                             generationConfig.candidateCount
logprobs, top_logprobs        generationConfig.responseLogprobs, logprobs (top_logprobs
                              needs logprobs: true, as OpenAI says)
response_format               text: nothing; json_object: responseMimeType
                              application/json; json_schema: responseMimeType and
                              responseJsonSchema = its schema (name, strict dropped)
reasoning_effort              generationConfig.thinkingConfig.thinkingBudget, Google's own
                              OpenAI-compatibility mapping: none 0, minimal and low 1024,
                              medium 8192, high 24576 (a model that cannot turn thinking
                              off answers ``none`` with its own 400)
stream                        the path: :streamGenerateContent?alt=sse
stream_options.include_usage  not sent: Gemini streams always carry usage; it decides
                              whether the app gets the final usage chunk
tools (type function)         tools: [{functionDeclarations: [{name, description,
                              parametersJsonSchema = parameters}]}] (``strict`` dropped)
tool_choice                   toolConfig.functionCallingConfig.mode: auto -> AUTO, none ->
                              NONE, required -> ANY, {function: {name}} -> ANY with
                              allowedFunctionNames [name]
parallel_tool_calls           true: nothing (Gemini's behaviour); false: refused, Gemini
                              cannot be held to one call
user, service_tier, store,    dropped: about OpenAI's service (abuse ids, tiers, stored
metadata, prediction,         completions, its prompt cache, latency hints), not about the
prompt_cache_key,             answer
prompt_cache_retention,
safety_identifier
logit_bias (non-empty)        refused: no equivalent
functions, function_call      refused: deprecated, use tools / tool_choice
audio, modalities (not text)  refused: text output only
verbosity, web_search_options refused: no equivalent here
============================  =============================================================

Tool call ids: Gemini's ``functionCall.id`` when it gives one, else ``call_`` and a
nonce. Gemini 2.5 and later attach a ``thoughtSignature`` to function call parts, which
must come back with the call in the next request (Gemini 3 refuses a function-call turn
without it); the app only keeps the OpenAI tool call, so the signature travels inside
its id: ``{id}__thought__{signature}`` (the convention LiteLLM uses too), split again when
the app sends the call and its result back.

Chat responses: each candidate is a choice (``index``); text parts are the content
(thought parts, never asked for, are skipped), functionCall parts the tool calls.
``finishReason``: STOP -> ``stop`` (``tool_calls`` when the candidate called a function),
MAX_TOKENS -> ``length``, SAFETY, RECITATION, LANGUAGE, BLOCKLIST, PROHIBITED_CONTENT,
SPII, IMAGE_* and MODEL_ARMOR -> ``content_filter``, anything else -> ``stop``. A
prompt Gemini refused (``promptFeedback.blockReason``, no candidate) is one choice with no
content and ``content_filter``. Usage (the same mapping as
``ext_proc.tokens.parsers.google``): ``prompt_tokens = promptTokenCount +
toolUsePromptTokenCount``, ``completion_tokens = candidatesTokenCount +
thoughtsTokenCount``, ``prompt_tokens_details.cached_tokens = cachedContentTokenCount``,
``completion_tokens_details.reasoning_tokens = thoughtsTokenCount``. ``logprobsResult``
-> ``logprobs.content``. The chat ``id`` is Gemini's ``responseId``, the ``model`` its
``modelVersion``.

Embeddings: ``input`` (a string or a list of strings; token arrays are refused: Gemini
embeds text) -> one request per item, ``dimensions`` -> ``outputDimensionality``,
``user`` dropped, ``encoding_format`` (float, or base64 as the OpenAI SDK asks by
default) decides how the vectors are written back (little-endian float32, as OpenAI). The
answer names no model (Gemini's does not either), and its ``usage`` is Gemini's when it
reports one, else 0: Gemini reports no usage for embeddings, so the gateway's usage row is
estimated from the input (``tokens_estimated``).

Errors: Gemini's ``{"error": {"code", "message", "status"}}`` becomes OpenAI's
``{"error": {"message", "type", "code", "param"}}`` with the same HTTP status (the
``status`` names the type and code, see ``ERROR_STATUSES``; an invalid API key, which
Gemini answers 400, has code ``invalid_api_key``).
"""

from __future__ import annotations

import base64
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import orjson

from ext_proc.routing.translate.base import TranslationError
from ext_proc.tokens.parsers.google import (
    candidate_index,
    prompt_blocked,
    usage_from_metadata,
)
from ext_proc.tokens.sse import SSEDecoder
from ext_proc.tokens.types import Usage

# This pair's names: what the request side records and RESPONSE_TRANSLATORS is keyed by.
TRANSLATION = "openai_gemini"
EMBEDDINGS_TRANSLATION = "openai_gemini_embeddings"
EMBEDDINGS_BASE64_TRANSLATION = "openai_gemini_embeddings_base64"

# Joins a tool call's id and Gemini's thought signature in the id the app keeps.
SIGNATURE_SEPARATOR = "__thought__"

FINISH_REASONS: Mapping[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
}

# Gemini (google.rpc) error status -> (OpenAI error type, code).
ERROR_STATUSES: Mapping[str, tuple[str, str]] = {
    "INVALID_ARGUMENT": ("invalid_request_error", "invalid_argument"),
    "FAILED_PRECONDITION": ("invalid_request_error", "failed_precondition"),
    "OUT_OF_RANGE": ("invalid_request_error", "out_of_range"),
    "UNIMPLEMENTED": ("invalid_request_error", "unimplemented"),
    "UNAUTHENTICATED": ("authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": ("permission_error", "permission_denied"),
    "NOT_FOUND": ("not_found_error", "not_found"),
    "RESOURCE_EXHAUSTED": ("rate_limit_error", "rate_limit_exceeded"),
    "ABORTED": ("server_error", "aborted"),
    "CANCELLED": ("server_error", "cancelled"),
    "INTERNAL": ("server_error", "internal_error"),
    "UNKNOWN": ("server_error", "unknown_error"),
    "UNAVAILABLE": ("server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": ("timeout_error", "timeout"),
}

# reasoning_effort -> thinkingBudget (Google's OpenAI-compatibility table for Gemini 2.5;
# Gemini 3 accepts a budget too).
THINKING_BUDGETS: Mapping[str, int] = {
    "none": 0,
    "minimal": 1024,
    "low": 1024,
    "medium": 8192,
    "high": 24576,
}

AUDIO_MIME_TYPES: Mapping[str, str] = {"wav": "audio/wav", "mp3": "audio/mp3"}
# fileData for an http(s) image URL: its MIME type by extension, when the URL shows one.
_IMAGE_EXTENSIONS: Mapping[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "heic": "image/heic",
    "heif": "image/heif",
}

# Parameters read by to_gemini_request, or dropped on purpose (see the table).
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "reasoning_effort",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logit_bias",
        "modalities",
    }
)
_DROPPED = frozenset(
    {
        "user",
        "service_tier",
        "store",
        "metadata",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
    }
)
_REFUSED: Mapping[str, str] = {
    "functions": "'functions' is deprecated and not translated: use 'tools'.",
    "function_call": "'function_call' is deprecated and not translated: use 'tool_choice'.",
    "audio": "Gemini models are served here for text output only: 'audio' is not supported.",
    "verbosity": "'verbosity' has no equivalent for Gemini models.",
    "web_search_options": "'web_search_options' is not supported for Gemini models.",
}
_CHAT_PARAMS = _HANDLED | _DROPPED
# user is dropped (an abuse-monitoring id, not about the answer); the rest are read.
_EMBEDDING_PARAMS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})

# Sampling parameters copied as numbers: OpenAI name -> generationConfig name.
_NUMBERS = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("frequency_penalty", "frequencyPenalty"),
    ("presence_penalty", "presencePenalty"),
)


def _unsupported(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_parameter")


def _unsupported_value(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_value")


def _invalid_type(param: str, expected: str) -> TranslationError:
    return TranslationError(param, f"'{param}' must be {expected}.", code="invalid_type")


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _is_int(value: Any) -> bool:
    return type(value) is int


def _check_params(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for key, value in body.items():
        if value is None or key in known:
            continue
        raise _unsupported(
            key,
            _REFUSED.get(key) or f"Unrecognized request argument supplied: {key} (for this model).",
        )


def model_resource(deployment: str) -> str:
    """The Gemini resource name of a deployment: ``models/{name}``, or the name as given
    when it already is one (``models/...``, ``tunedModels/...``)."""
    if deployment.startswith(("models/", "tunedModels/")):
        return deployment
    return f"models/{deployment}"


def wants_usage_chunk(body: Mapping[str, Any]) -> bool:
    """True when the app asked for the final usage chunk of a stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def split_tool_call_id(call_id: str) -> tuple[str, str | None]:
    """``(id, thoughtSignature or None)`` from a tool call id this translation wrote."""
    base, sep, signature = call_id.partition(SIGNATURE_SEPARATOR)
    return (base, signature) if sep and signature else (call_id, None)


# ------------------------------------------------------------------ chat request


def to_gemini_request(body: Mapping[str, Any], deployment: str) -> dict[str, Any]:
    """The ``generateContent`` body for an OpenAI chat body (see the module's table).

    ``body`` is not modified; the model and the stream flag go in the path, which the
    adapter writes. Raises ``TranslationError`` naming the app's field.
    """
    _check_params(body, _CHAT_PARAMS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid_type("messages", "a non-empty array")
    system, contents = _convert_messages(messages)
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        out["generationConfig"] = config
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise _invalid_type("stream", "a boolean")

    tools = body.get("tools")
    declarations = _function_declarations(tools) if tools is not None else []
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if type(parallel) is not bool:
            raise _invalid_type("parallel_tool_calls", "a boolean")
        if parallel is False and declarations:
            raise _unsupported_value(
                "parallel_tool_calls",
                "Gemini models cannot be limited to one tool call per turn: "
                "'parallel_tool_calls: false' is not supported.",
            )
    calling = _function_calling_config(body.get("tool_choice"))
    # Without tools, AUTO and NONE both mean "answer in text": left out. A choice that
    # demands a tool is sent as is and refused by the provider, as OpenAI refuses it.
    if calling is not None and (declarations or calling["mode"] not in ("AUTO", "NONE")):
        out["toolConfig"] = {"functionCallingConfig": calling}
    return out


def _generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise TranslationError(name, f"'{name}' must be a positive integer.")
        config["maxOutputTokens"] = value
        break
    for name, gemini_name in _NUMBERS:
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _invalid_type(name, "a number")
            config[gemini_name] = value
    for name, gemini_name in (("top_k", "topK"), ("seed", "seed")):
        value = body.get(name)
        if value is not None:
            if not _is_int(value):
                raise _invalid_type(name, "an integer")
            config[gemini_name] = value
    stop = _stop_sequences(body.get("stop"))
    if stop:
        config["stopSequences"] = stop
    n = body.get("n")
    if n is not None:
        if not _is_int(n) or n < 1:
            raise TranslationError("n", "'n' must be a positive integer.")
        if n > 1:
            config["candidateCount"] = n
    _logprobs_config(body, config)
    _response_format(body.get("response_format"), config)
    effort = body.get("reasoning_effort")
    if effort is not None:
        budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
        if budget is None:
            raise _unsupported_value(
                "reasoning_effort",
                "'reasoning_effort' must be one of " + ", ".join(THINKING_BUDGETS) + ".",
            )
        config["thinkingConfig"] = {"thinkingBudget": budget}
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise _invalid_type("logit_bias", "an object")
        if logit_bias:
            raise _unsupported("logit_bias", "'logit_bias' is not supported for Gemini models.")
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list):
            raise _invalid_type("modalities", "an array")
        if any(m != "text" for m in modalities):
            raise _unsupported_value(
                "modalities", "Gemini models are served here for text output only."
            )
    return config


def _logprobs_config(body: Mapping[str, Any], config: dict[str, Any]) -> None:
    logprobs = body.get("logprobs")
    if logprobs is not None and type(logprobs) is not bool:
        raise _invalid_type("logprobs", "a boolean")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= 20:
            raise TranslationError(
                "top_logprobs", "'top_logprobs' must be an integer between 0 and 20."
            )
        if logprobs is not True:
            raise TranslationError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    if logprobs:
        config["responseLogprobs"] = True
        if top is not None:
            config["logprobs"] = top


def _response_format(response_format: Any, config: dict[str, Any]) -> None:
    if response_format is None:
        return
    if not isinstance(response_format, dict):
        raise _invalid_type("response_format", "an object")
    kind = response_format.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
        return
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _invalid_type("response_format.json_schema.schema", "a JSON Schema object")
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = schema
        return
    raise _unsupported_value(
        "response_format.type", "'response_format.type' must be text, json_object or json_schema."
    )


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _invalid_type("stop", "a string or an array of strings")


# --------------------------------------------------------------------- messages


def _convert_messages(
    messages: list[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id (without signature) -> function name
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(param, "an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), f"{param}.content"))
        elif role == "user":
            _append_turn(contents, "user", _user_parts(message.get("content"), param))
        elif role == "assistant":
            _append_turn(contents, "model", _model_parts(message, param, names))
        elif role == "tool":
            _append_turn(contents, "user", [_function_response(message, param, names)])
        else:
            raise TranslationError(
                f"{param}.role",
                f"'{param}.role' must be one of system, developer, user, assistant, tool.",
            )
    if not contents:
        raise TranslationError(
            "messages",
            "'messages' must hold at least one user or assistant message with content.",
        )
    return system, contents


def _append_turn(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if not parts:
        return  # Gemini refuses a turn without parts; an empty message adds nothing
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _text(text: str) -> list[dict[str, Any]]:
    return [{"text": text}] if text else []


def _text_parts(content: Any, param: str) -> list[dict[str, Any]]:
    """A system, developer or tool message's content: a string or text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return _text(content)
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        parts.extend(_text_part(part, f"{param}[{j}]"))
    return parts


def _text_part(part: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(part, dict):
        raise _invalid_type(param, "an object")
    kind = part.get("type")
    if kind != "text":
        raise _unsupported_value(
            f"{param}.type", f"Only text parts are supported here, not {kind!r}."
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid_type(f"{param}.text", "a string")
    return _text(text)


def _user_parts(content: Any, message_param: str) -> list[dict[str, Any]]:
    param = f"{message_param}.content"
    if isinstance(content, str):
        return _text(content)
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            parts.append(_image_part(part.get("image_url"), f"{part_param}.image_url"))
        elif kind == "input_audio":
            parts.append(_audio_part(part.get("input_audio"), f"{part_param}.input_audio"))
        elif kind == "file":
            parts.append(_file_part(part.get("file"), f"{part_param}.file"))
        elif kind not in ("text", None):
            raise _unsupported_value(
                f"{part_param}.type",
                f"Gemini models accept text, image_url, input_audio and file parts, not {kind!r}.",
            )
        else:
            parts.extend(_text_part(part, part_param))
    return parts


def _data_url(url: str, param: str) -> tuple[str, str]:
    """``(mime type, base64 data)`` of a ``data:`` URL."""
    header, comma, data = url[5:].partition(",")
    media_type, _, options = header.partition(";")
    media_type = media_type.strip().lower()
    if not comma or "base64" not in options.lower().split(";"):
        raise _unsupported_value(param, f"'{param}' data URLs must be base64-encoded.")
    if not media_type:
        raise _unsupported_value(param, f"'{param}' data URLs must name a MIME type.")
    return media_type, data


def _image_part(image_url: Any, param: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise _invalid_type(f"{param}.url", "a string")
    if url.startswith("data:"):
        mime_type, data = _data_url(url, f"{param}.url")
        return {"inlineData": {"mimeType": mime_type, "data": data}}
    if url.startswith(("https://", "http://")):
        file_data: dict[str, Any] = {"fileUri": url}
        extension = url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
        guessed = _IMAGE_EXTENSIONS.get(extension)
        if guessed is not None:
            file_data = {"mimeType": guessed, "fileUri": url}
        return {"fileData": file_data}
    raise _unsupported_value(f"{param}.url", "Image URLs must be http(s) or base64 data: URLs.")


def _audio_part(audio: Any, param: str) -> dict[str, Any]:
    if not isinstance(audio, dict):
        raise _invalid_type(param, "an object")
    data = audio.get("data")
    if not isinstance(data, str) or not data:
        raise _invalid_type(f"{param}.data", "a base64 string")
    audio_format = audio.get("format")
    mime_type = AUDIO_MIME_TYPES.get(audio_format) if isinstance(audio_format, str) else None
    if mime_type is None:
        raise _unsupported_value(f"{param}.format", f"'{param}.format' must be wav or mp3.")
    return {"inlineData": {"mimeType": mime_type, "data": data}}


def _file_part(file: Any, param: str) -> dict[str, Any]:
    if not isinstance(file, dict):
        raise _invalid_type(param, "an object")
    if file.get("file_id") is not None:
        raise _unsupported(
            f"{param}.file_id",
            "OpenAI file ids cannot be read by Gemini models: send 'file_data'.",
        )
    data = file.get("file_data")
    if not isinstance(data, str) or not data.startswith("data:"):
        raise _invalid_type(f"{param}.file_data", "a base64 data: URL")
    mime_type, payload = _data_url(data, f"{param}.file_data")
    return {"inlineData": {"mimeType": mime_type, "data": payload}}


def _model_parts(
    message: dict[str, Any], param: str, names: dict[str, str]
) -> list[dict[str, Any]]:
    if message.get("function_call") is not None:
        raise _unsupported(
            f"{param}.function_call", "'function_call' is deprecated and not translated."
        )
    if message.get("audio") is not None:
        raise _unsupported(f"{param}.audio", "Gemini models take no audio turns here.")
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str):
        parts.extend(_text(content))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            part_param = f"{param}.content[{j}]"
            if isinstance(part, dict) and part.get("type") == "refusal":
                refusal = part.get("refusal")
                if not isinstance(refusal, str):
                    raise _invalid_type(f"{part_param}.refusal", "a string")
                parts.extend(_text(refusal))
            else:
                parts.extend(_text_part(part, part_param))
    elif content is not None:
        raise _invalid_type(f"{param}.content", "a string, an array of parts or null")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _invalid_type(f"{param}.tool_calls", "an array")
        for j, call in enumerate(tool_calls):
            parts.append(_function_call(call, f"{param}.tool_calls[{j}]", names))
    return parts


def _function_call(call: Any, param: str, names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise _invalid_type(param, "an object")
    if call.get("type", "function") != "function":
        raise _unsupported_value(f"{param}.type", "Only function tool calls are supported.")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid_type(f"{param}.id", "a non-empty string")
    function = call.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise _invalid_type(f"{param}.function.name", "a non-empty string")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    args_param = f"{param}.function.arguments"
    if arguments is None or arguments == "":
        args: Any = {}
    elif isinstance(arguments, str):
        try:
            args = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise TranslationError(args_param, f"'{args_param}' is not valid JSON: {exc}") from None
        if not isinstance(args, dict):
            raise TranslationError(args_param, f"'{args_param}' must be a JSON object.")
    else:
        raise _invalid_type(args_param, "a string of JSON")
    base_id, signature = split_tool_call_id(call_id)
    names[base_id] = name
    part: dict[str, Any] = {"functionCall": {"id": base_id, "name": name, "args": args}}
    if signature is not None:
        part["thoughtSignature"] = signature
    return part


def _function_response(
    message: dict[str, Any], param: str, names: dict[str, str]
) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError(
            f"{param}.tool_call_id",
            f"'{param}.tool_call_id' is required for a tool message.",
            code="missing_required_parameter",
        )
    base_id, _ = split_tool_call_id(call_id)
    name = names.get(base_id)
    if name is None:
        # Gemini needs the function's name with its result: it comes from the call.
        raise TranslationError(
            f"{param}.tool_call_id",
            f"'{param}.tool_call_id' does not match a tool call of an earlier assistant message.",
        )
    content = message.get("content")
    text = (
        content
        if isinstance(content, str)
        else "".join(p["text"] for p in _text_parts(content, f"{param}.content"))
    )
    result: Any = None
    if text.lstrip().startswith("{"):
        try:
            result = orjson.loads(text)
        except orjson.JSONDecodeError:
            result = None
    response = result if isinstance(result, dict) else {"output": text}
    return {"functionResponse": {"id": base_id, "name": name, "response": response}}


# ------------------------------------------------------------------------- tools


def _function_declarations(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid_type("tools", "an array")
    out: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        param = f"tools[{j}]"
        if not isinstance(tool, dict):
            raise _invalid_type(param, "an object")
        if tool.get("type") != "function":
            raise _unsupported_value(
                f"{param}.type", f"Only function tools are supported, not {tool.get('type')!r}."
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid_type(f"{param}.function", "an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid_type(f"{param}.function.name", "a non-empty string")
        declaration: dict[str, Any] = {"name": name}
        description = function.get("description")
        if isinstance(description, str) and description:
            declaration["description"] = description
        schema = function.get("parameters")
        if schema is not None:
            if not isinstance(schema, dict):
                raise _invalid_type(f"{param}.function.parameters", "a JSON Schema object")
            declaration["parametersJsonSchema"] = schema
        out.append(declaration)
    return out


def _function_calling_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _invalid_type("tool_choice.function.name", "a non-empty string")
        return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise _unsupported_value(
        "tool_choice",
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
    )


# ------------------------------------------------------------- embeddings request


def to_gemini_embeddings_request(
    body: Mapping[str, Any], deployment: str
) -> tuple[dict[str, Any], bool]:
    """The ``batchEmbedContents`` body for an OpenAI embeddings body, and whether the
    app asked for base64 vectors. ``body`` is not modified."""
    _check_params(body, _EMBEDDING_PARAMS)
    items = body.get("input")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise _invalid_type("input", "a non-empty string or array of strings")
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise _unsupported_value(
                f"input[{j}]" if not isinstance(body.get("input"), str) else "input",
                "Gemini embeds text: 'input' must be a string or an array of strings "
                "(not token arrays).",
            )
        if not item:
            raise TranslationError("input", "'input' must not contain empty strings.")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise TranslationError("dimensions", "'dimensions' must be a positive integer.")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise _unsupported_value("encoding_format", "'encoding_format' must be float or base64.")
    model = model_resource(deployment)
    requests: list[dict[str, Any]] = []
    for item in items:
        request: dict[str, Any] = {"model": model, "content": {"parts": [{"text": item}]}}
        if dimensions is not None:
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return {"requests": requests}, encoding == "base64"


# ----------------------------------------------------------------------- errors


def _status_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"


def _api_key_invalid(error: dict[str, Any]) -> bool:
    details = error.get("details")
    return isinstance(details, list) and any(
        isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details
    )


def openai_error(obj: Any, status: int) -> dict[str, Any]:
    """``{"error": {...}}`` for a Gemini error object (or whatever else came)."""
    if isinstance(obj, list) and obj:  # a non-SSE stream wraps its error in an array
        obj = obj[0]
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        return {
            "error": {
                "message": f"The provider answered HTTP {status}.",
                "type": _status_error_type(status),
                "code": None,
                "param": None,
            }
        }
    kind = error.get("status")
    message = error.get("message")
    mapped = ERROR_STATUSES.get(kind) if isinstance(kind, str) else None
    code: str | None
    if _api_key_invalid(error):
        error_type, code = "authentication_error", "invalid_api_key"
    elif mapped is not None:
        error_type, code = mapped
    else:
        error_type = _status_error_type(status)
        code = kind.lower() if isinstance(kind, str) and kind else None
    return {
        "error": {
            "message": message
            if isinstance(message, str) and message
            else f"The provider answered {kind or status}.",
            "type": error_type,
            "code": code,
            "param": None,
        }
    }


def error_body(body: bytes, status: int) -> bytes:
    """The app's error body for a provider's error answer (JSON or not)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Not JSON: a proxy's or Envoy's own text ("upstream connect error ..."); keep it.
        text = body.decode("utf-8", "replace").strip()[:1000]
        out = openai_error(None, status)
        if text:
            out["error"]["message"] = text
        return orjson.dumps(out)
    return orjson.dumps(openai_error(obj, status))


def _untranslatable(what: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": f"The provider's response is not {what}.",
                "type": "upstream_error",
                "code": "untranslatable_response",
                "param": None,
            }
        }
    )


# ---------------------------------------------------------------- chat response


def openai_usage(usage: Usage | None) -> dict[str, Any]:
    """OpenAI's ``usage`` object from the format's ``Usage`` (None counts 0)."""
    u = usage or Usage()
    prompt, completion = u.prompt_tokens or 0, u.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": u.total_tokens if u.total_tokens is not None else prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens or 0},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens or 0},
    }


def _finish_reason(reason: Any, called: bool) -> str:
    mapped = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if called and mapped == "stop" else mapped


def _token_logprob(candidate: Any) -> dict[str, Any]:
    c = candidate if isinstance(candidate, dict) else {}
    raw_token = c.get("token")
    token = raw_token if isinstance(raw_token, str) else ""
    logprob = c.get("logProbability")
    return {
        "token": token,
        # proto3 JSON omits a 0.0 log probability (a certain token)
        "logprob": float(logprob) if isinstance(logprob, int | float) else 0.0,
        "bytes": list(token.encode()),
    }


def _logprobs(candidate: dict[str, Any]) -> dict[str, Any] | None:
    result = candidate.get("logprobsResult")
    if not isinstance(result, dict):
        return None
    chosen = result.get("chosenCandidates")
    top = result.get("topCandidates")
    content = []
    for i, pick in enumerate(chosen if isinstance(chosen, list) else ()):
        entry = _token_logprob(pick)
        alternatives = top[i].get("candidates") if isinstance(top, list) and i < len(top) else None
        entry["top_logprobs"] = (
            [_token_logprob(a) for a in alternatives] if isinstance(alternatives, list) else []
        )
        content.append(entry)
    return {"content": content, "refusal": None}


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _is_text(part: dict[str, Any]) -> bool:
    text = part.get("text")
    return isinstance(text, str) and bool(text) and part.get("thought") is not True


class GenerateContentToChatCompletion:
    """Gemini's answer to a translated chat request, as OpenAI's (ResponseTranslator).

    ``include_usage``: the app asked for ``stream_options.include_usage``, so a stream
    gets OpenAI's final ``choices: []`` chunk with usage (and ``"usage": null`` on the
    others, as OpenAI sends them). ``created`` is the ``created`` field of every object
    (the translator's creation time by default); ``nonce`` makes the ids of tool calls
    Gemini did not name (random by default).

    A stream is translated chunk by chunk (each is a whole ``GenerateContentResponse``):
    a candidate's first appearance -> its role chunk, text parts -> content deltas,
    functionCall parts -> a ``tool_calls`` delta each (Gemini sends a call whole: id,
    name and all its arguments at once), ``finishReason`` -> the candidate's finish chunk.
    When every candidate shown has finished (or the prompt was blocked) the stream is
    complete: the usage chunk (when asked) and ``data: [DONE]`` follow at once, and
    nothing after. A ``{"error": ...}`` chunk -> ``data: {"error": ...}`` (what the OpenAI
    SDK raises from) and nothing after it. A stream cut before its end gets no ``[DONE]``,
    so the app can tell it was cut. Events that are not JSON objects are skipped and
    counted in ``skipped``.
    """

    __slots__ = (
        "_calls",
        "_created",
        "_decoder",
        "_done",
        "_finished",
        "_id",
        "_include_usage",
        "_model",
        "_nonce",
        "_raw_usage",
        "_started",
        "_tool_calls",
        "skipped",
    )

    def __init__(
        self, *, include_usage: bool = False, created: int | None = None, nonce: str | None = None
    ) -> None:
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._nonce = os.urandom(6).hex() if nonce is None else nonce
        self._decoder = SSEDecoder()
        self._id = ""
        self._model = ""
        self._raw_usage: Any = None
        self._started: set[int] = set()  # candidates whose role chunk went out
        self._finished: set[int] = set()
        self._tool_calls: dict[int, int] = {}  # candidate -> tool calls sent so far
        self._calls = 0  # tool call ids made, for unique ids across candidates
        self._done = False
        self.skipped = 0

    # ---------------------------------------------------------------- buffered

    def translate_json(self, body: bytes, status: int) -> bytes:
        if status >= 400:
            return error_body(body, status)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return orjson.dumps(openai_error(obj, 502))
        if not isinstance(obj, dict) or not (
            "candidates" in obj or "promptFeedback" in obj or "usageMetadata" in obj
        ):
            return _untranslatable("a Gemini GenerateContentResponse")
        return orjson.dumps(self._completion(obj))

    def _completion(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._identify(obj)
        choices: list[dict[str, Any]] = []
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if not isinstance(candidate, dict):
                continue
            index = candidate_index(candidate)
            parts = _parts(candidate)
            texts = [p["text"] for p in parts if _is_text(p)]
            calls = [
                self._tool_call(p["functionCall"], p.get("thoughtSignature"))
                for p in parts
                if isinstance(p.get("functionCall"), dict)
            ]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(texts) if texts else None,
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = calls
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": _logprobs(candidate),
                    "finish_reason": _finish_reason(candidate.get("finishReason"), bool(calls)),
                }
            )
        if not choices and prompt_blocked(obj):
            choices.append(
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "content_filter",
                }
            )
        choices.sort(key=lambda choice: choice["index"])
        out: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        usage = usage_from_metadata(obj.get("usageMetadata"))
        out["usage"] = openai_usage(usage) if usage is not None else None
        return out

    def _identify(self, obj: dict[str, Any]) -> None:
        if not self._id:
            response_id = obj.get("responseId")
            self._id = (
                response_id
                if isinstance(response_id, str) and response_id
                else f"chatcmpl-{self._nonce}"
            )
        if not self._model:
            model = obj.get("modelVersion")
            if isinstance(model, str):
                self._model = model

    def _tool_call(self, call: dict[str, Any], signature: Any) -> dict[str, Any]:
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call_{self._nonce}{self._calls:02d}"
        self._calls += 1
        if isinstance(signature, str) and signature:
            call_id = f"{call_id}{SIGNATURE_SEPARATOR}{signature}"
        args = call.get("args")
        name = call.get("name")
        return {
            "id": call_id,
            "type": "function",
            "function": {
                "name": name if isinstance(name, str) else "",
                "arguments": orjson.dumps(args if isinstance(args, dict) else {}).decode(),
            },
        }

    # ---------------------------------------------------------------- streamed

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for _, data in self._decoder.feed_bytes(chunk):
            self._event(data, out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        for _, data in self._decoder.flush_bytes():
            self._event(data, out)
        return b"".join(out)

    def _event(self, data: bytes, out: list[bytes]) -> None:
        if self._done:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self.skipped += 1
            return
        if "error" in obj:
            out.append(b"data: " + orjson.dumps(openai_error(obj, 500)) + b"\n\n")
            self._done = True
            return
        self._identify(obj)
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if isinstance(candidate, dict):
                self._candidate(candidate, out)
        blocked = prompt_blocked(obj) and not self._started
        if blocked:
            out.append(self._chunk(0, {"role": "assistant", "content": ""}))
            out.append(self._chunk(0, {}, "content_filter"))
        if isinstance(obj.get("usageMetadata"), dict):
            self._raw_usage = obj["usageMetadata"]
        if blocked or (self._started and self._started.issubset(self._finished)):
            if self._include_usage:
                out.append(self._usage_chunk())
            out.append(b"data: [DONE]\n\n")
            self._done = True

    def _candidate(self, candidate: dict[str, Any], out: list[bytes]) -> None:
        index = candidate_index(candidate)
        if index in self._finished:
            return
        if index not in self._started:
            self._started.add(index)
            out.append(self._chunk(index, {"role": "assistant", "content": ""}))
        logprobs = _logprobs(candidate)
        for part in _parts(candidate):
            if _is_text(part):
                out.append(self._chunk(index, {"content": part["text"]}, logprobs=logprobs))
                logprobs = None  # a chunk's log probabilities go with its first text
            elif isinstance(part.get("functionCall"), dict):
                position = self._tool_calls.get(index, 0)
                self._tool_calls[index] = position + 1
                call = self._tool_call(part["functionCall"], part.get("thoughtSignature"))
                out.append(self._chunk(index, {"tool_calls": [{"index": position, **call}]}))
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason:
            self._finished.add(index)
            called = self._tool_calls.get(index, 0) > 0
            out.append(self._chunk(index, {}, _finish_reason(reason, called)))

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if self._include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _usage_chunk(self) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": openai_usage(usage_from_metadata(self._raw_usage)),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


# ---------------------------------------------------------- embeddings response


class EmbeddingsToOpenAI:
    """Gemini's ``batchEmbedContents`` answer as OpenAI's embeddings list
    (ResponseTranslator). ``base64``: write each vector as base64 little-endian float32,
    as OpenAI does for ``encoding_format: base64``. An embeddings answer is never
    streamed: ``feed`` keeps the bytes and ``finish`` translates them whole."""

    __slots__ = ("_base64", "_body")

    def __init__(self, *, base64: bool = False) -> None:
        self._base64 = base64
        self._body = bytearray()

    def translate_json(self, body: bytes, status: int) -> bytes:
        if status >= 400:
            return error_body(body, status)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return orjson.dumps(openai_error(obj, 502))
        embeddings = obj.get("embeddings") if isinstance(obj, dict) else None
        if not isinstance(embeddings, list):
            return _untranslatable("a Gemini batchEmbedContents response")
        data = []
        for index, embedding in enumerate(embeddings):
            raw = embedding.get("values") if isinstance(embedding, dict) else None
            values = [float(v) for v in raw if _is_number(v)] if isinstance(raw, list) else []
            vector: list[float] | str = values
            if self._base64:
                packed = struct.pack(f"<{len(values)}f", *values)
                vector = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = usage_from_metadata(obj.get("usageMetadata")) if isinstance(obj, dict) else None
        prompt = (usage.prompt_tokens or 0) if usage is not None else 0
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": "",
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    def feed(self, chunk: bytes) -> bytes:
        self._body += chunk
        return b""

    def finish(self) -> bytes:
        return self.translate_json(bytes(self._body), 200)
