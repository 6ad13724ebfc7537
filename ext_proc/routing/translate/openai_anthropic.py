"""OpenAI Chat Completions -> Anthropic Messages, and the response back.

An app using the stock OpenAI SDK may name a model that Anthropic serves.
``to_anthropic_request`` turns its ``/v1/chat/completions`` body into a ``/v1/messages``
body; ``MessagesToChatCompletion`` turns Anthropic's answer (a JSON message, an SSE
stream, or an error) into what the OpenAI SDK expects. The gateway's own accounting does
not read the translation: it parses Anthropic's usage from the provider's bytes.

Request parameters. A parameter set to ``null`` counts as absent. A parameter that would
change the answer if it were dropped is refused (400 naming it) rather than ignored; a
parameter not in this table is refused too, as OpenAI refuses unknown ones.

============================  =============================================================
OpenAI                        Anthropic
============================  =============================================================
model                         model = the catalog's deployment
messages: system, developer   system (text blocks in order; moved out of the turns, so a
                              mid-conversation system message applies to the whole chat)
messages: user                user turn: text; image_url as an image block (data: URL ->
                              base64 source, http(s) URL -> url source; ``detail`` dropped)
messages: assistant           assistant turn: text (and refusal) parts; tool_calls ->
                              tool_use blocks (arguments parsed: must be a JSON object)
messages: tool                tool_result block in a user turn
(turn order)                  consecutive turns of one role are merged into one, since
                              Anthropic requires alternating roles
messages[].name               dropped (no equivalent)
max_completion_tokens,        max_tokens (the first one set, in that order); Anthropic
max_tokens                    requires it: DEFAULT_MAX_TOKENS when the app sets neither
temperature, top_p            same names (Anthropic's temperature range is 0..1: a larger
                              value is answered by the provider's 400)
stop (string or list)         stop_sequences
stream                        stream
stream_options.include_usage  not sent: Anthropic streams always carry usage; it decides
                              whether the app gets the final usage chunk
tools (type function)         tools: name, description, input_schema = parameters
                              (``strict`` dropped)
tool_choice                   auto -> auto, none -> none, required -> any,
                              {function: {name}} -> {type: tool, name}
parallel_tool_calls = false   tool_choice.disable_parallel_tool_use = true
user                          metadata.user_id
top_k (extra_body)            top_k (Anthropic's own parameter, same meaning)
frequency_penalty,            dropped: sampling nudges with no Anthropic equivalent; the
presence_penalty, seed        answer stays valid (seed is best-effort in OpenAI too)
service_tier, store,          dropped: about OpenAI's service (tiers, stored completions,
metadata, prediction,         its prompt cache, abuse ids, latency hints), not about the
prompt_cache_key,             answer
prompt_cache_retention,
safety_identifier
n > 1                         refused: one choice only
logprobs, top_logprobs        refused: Anthropic returns no log probabilities
logit_bias (non-empty)        refused: no equivalent
response_format (not text)    refused: no JSON mode
functions, function_call      refused: deprecated, use tools / tool_choice
audio, modalities (not text)  refused: text output only
reasoning_effort, verbosity,  refused: OpenAI-model knobs with no equivalent here
web_search_options
============================  =============================================================

Responses: ``stop_reason`` end_turn / stop_sequence / pause_turn -> ``stop``,
max_tokens / model_context_window_exceeded -> ``length``, tool_use -> ``tool_calls``,
refusal -> ``content_filter``. Usage: ``prompt_tokens = input_tokens +
cache_read_input_tokens + cache_creation_input_tokens`` (everything the model read, as
OpenAI counts cached tokens inside ``prompt_tokens``), ``completion_tokens =
output_tokens``, ``prompt_tokens_details.cached_tokens = cache_read_input_tokens`` (the
same mapping as ``ext_proc.tokens.parsers.anthropic``). Thinking and server-tool blocks
are not translated (the request side never asks for them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from ext_proc.routing.translate.base import TranslationError
from ext_proc.tokens.parsers.anthropic import update_counts
from ext_proc.tokens.sse import SSEDecoder

# This pair's name: what the request side records and RESPONSE_TRANSLATORS is keyed by.
TRANSLATION = "openai_anthropic"

# Anthropic requires max_tokens; OpenAI lets the model stop on its own. 4096 is the
# largest output every current Claude model accepts (Claude 3 Haiku's ceiling), so the
# default is never refused, and long enough for an ordinary chat answer. An app that
# needs more sets max_completion_tokens.
DEFAULT_MAX_TOKENS = 4096

# Image types Anthropic accepts in a base64 source.
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI error type, code).
ERROR_TYPES: Mapping[str, tuple[str, str]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "permission_error": ("permission_error", "permission_denied"),
    "not_found_error": ("not_found_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "api_error": ("server_error", "api_error"),
    "overloaded_error": ("server_error", "overloaded"),
    "timeout_error": ("timeout_error", "timeout"),
}

_DEFAULT_INPUT_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}

# Parameters read by to_anthropic_request, or dropped on purpose (see the table).
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "response_format",
        "modalities",
    }
)
_DROPPED = frozenset(
    {
        "frequency_penalty",
        "presence_penalty",
        "seed",
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
    "audio": "Anthropic models produce text only: 'audio' is not supported.",
    "reasoning_effort": "'reasoning_effort' has no equivalent for Anthropic models.",
    "verbosity": "'verbosity' has no equivalent for Anthropic models.",
    "web_search_options": "'web_search_options' is not supported for Anthropic models.",
}


def _unsupported(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_parameter")


def _unsupported_value(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_value")


def _invalid_type(param: str, expected: str) -> TranslationError:
    return TranslationError(param, f"'{param}' must be {expected}.", code="invalid_type")


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


# ------------------------------------------------------------------------- request


def wants_usage_chunk(body: Mapping[str, Any]) -> bool:
    """True when the app asked for the final usage chunk of a stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def to_anthropic_request(body: Mapping[str, Any], deployment: str) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat body (see the module's table).

    ``body`` is not modified. Raises ``TranslationError`` naming the app's field.
    """
    for key, value in body.items():
        if value is None or key in _HANDLED or key in _DROPPED:
            continue
        refusal = _REFUSED.get(key)
        raise _unsupported(
            key, refusal or f"Unrecognized request argument supplied: {key} (for this model)."
        )
    _check_refused_values(body)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid_type("messages", "a non-empty array")
    system, turns = _convert_messages(messages)
    out: dict[str, Any] = {"model": deployment}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 else system
    out["messages"] = turns
    out["max_tokens"] = _max_tokens(body)

    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _invalid_type(name, "a number")
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int:
            raise _invalid_type("top_k", "an integer")
        out["top_k"] = top_k
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    stream = body.get("stream")
    if stream is not None:
        if type(stream) is not bool:
            raise _invalid_type("stream", "a boolean")
        if stream:
            out["stream"] = True

    tools = body.get("tools")
    if tools is not None:
        converted = _tools(tools)
        if converted:
            out["tools"] = converted
    choice = _tool_choice(body.get("tool_choice"))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and type(parallel) is not bool:
        raise _invalid_type("parallel_tool_calls", "a boolean")
    if parallel is False and "tools" in out:
        if choice is None:
            choice = {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    # Without tools, "auto" and "none" both mean "answer in text": Anthropic refuses a
    # tool_choice without tools, so it is left out. A choice that demands a tool is sent
    # as is and refused by the provider, as OpenAI refuses it.
    if choice is not None and ("tools" in out or choice["type"] not in ("auto", "none")):
        out["tool_choice"] = choice

    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _invalid_type("user", "a string")
        out["metadata"] = {"user_id": user}
    return out


def _max_tokens(body: Mapping[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise TranslationError(
                name, f"'{name}' must be a positive integer.", code="invalid_value"
            )
        return value
    return DEFAULT_MAX_TOKENS


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _invalid_type("stop", "a string or an array of strings")


def _check_refused_values(body: Mapping[str, Any]) -> None:
    """Parameters accepted only at the value that asks for nothing special."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _unsupported_value("n", "Anthropic models return one choice: 'n' must be 1.")
    if body.get("logprobs") not in (None, False):
        raise _unsupported("logprobs", "Anthropic models return no log probabilities.")
    if body.get("top_logprobs") not in (None, 0):
        raise _unsupported("top_logprobs", "Anthropic models return no log probabilities.")
    if body.get("logit_bias") not in (None, {}):
        raise _unsupported("logit_bias", "'logit_bias' has no equivalent for Anthropic models.")
    response_format = body.get("response_format")
    if response_format is not None and not (
        isinstance(response_format, dict) and response_format.get("type") == "text"
    ):
        raise _unsupported_value(
            "response_format",
            "Anthropic models have no JSON mode: only response_format type 'text' is supported.",
        )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported_value("modalities", "Anthropic models produce text only.")


# ------------------------------------------------------------------------ messages


def _convert_messages(
    messages: list[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, turns with alternating roles)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(param, "an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"{param}.content"))
        elif role == "user":
            _append_turn(turns, "user", _user_blocks(message.get("content"), param))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(message, param))
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result(message, param)])
        elif role == "function":
            raise _unsupported_value(
                f"{param}.role", "The 'function' role is deprecated and not translated: use 'tool'."
            )
        else:
            raise TranslationError(
                f"{param}.role",
                f"'{param}.role' must be one of system, developer, user, assistant, tool.",
            )
    for turn in turns:
        blocks = turn["content"]
        if not blocks:
            turn["content"] = ""  # the provider says whether an empty turn is allowed
        elif len(blocks) == 1 and blocks[0]["type"] == "text" and len(blocks[0]) == 2:
            turn["content"] = blocks[0]["text"]
    return system, turns


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text(text: str) -> list[dict[str, Any]]:
    # Anthropic refuses empty text blocks; an empty string adds nothing to a turn.
    return [{"type": "text", "text": text}] if text else []


def _text_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    """A system, developer or tool message's content: a string or text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return _text(content)
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        blocks.extend(_text_part(part, f"{param}[{j}]"))
    return blocks


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


def _user_blocks(content: Any, message_param: str) -> list[dict[str, Any]]:
    param = f"{message_param}.content"
    if isinstance(content, str):
        return _text(content)
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if isinstance(part, dict) and part.get("type") == "image_url":
            blocks.append(_image_block(part.get("image_url"), f"{part_param}.image_url"))
        elif isinstance(part, dict) and part.get("type") not in ("text", None):
            raise _unsupported_value(
                f"{part_param}.type",
                f"Anthropic models accept text and image_url parts, not {part.get('type')!r}.",
            )
        else:
            blocks.extend(_text_part(part, part_param))
    return blocks


def _image_block(image_url: Any, param: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise _invalid_type(f"{param}.url", "a string")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, options = header.partition(";")
        media_type = media_type.strip().lower()
        if not comma or "base64" not in options.lower().split(";"):
            raise _unsupported_value(f"{param}.url", "Image data URLs must be base64-encoded.")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise _unsupported_value(
                f"{param}.url",
                f"Image type {media_type or '(none)'!r} is not supported: use "
                + ", ".join(sorted(IMAGE_MEDIA_TYPES))
                + ".",
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    raise _unsupported_value(f"{param}.url", "Image URLs must be http(s) or base64 data: URLs.")


def _assistant_blocks(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    if message.get("function_call") is not None:
        raise _unsupported(
            f"{param}.function_call", "'function_call' is deprecated and not translated."
        )
    if message.get("audio") is not None:
        raise _unsupported(f"{param}.audio", "Anthropic models take no audio turns.")
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        blocks.extend(_text(content))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            part_param = f"{param}.content[{j}]"
            if isinstance(part, dict) and part.get("type") == "refusal":
                refusal = part.get("refusal")
                if not isinstance(refusal, str):
                    raise _invalid_type(f"{part_param}.refusal", "a string")
                blocks.extend(_text(refusal))
            else:
                blocks.extend(_text_part(part, part_param))
    elif content is not None:
        raise _invalid_type(f"{param}.content", "a string, an array of parts or null")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _invalid_type(f"{param}.tool_calls", "an array")
        for j, call in enumerate(tool_calls):
            blocks.append(_tool_use(call, f"{param}.tool_calls[{j}]"))
    return blocks


def _tool_use(call: Any, param: str) -> dict[str, Any]:
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
        tool_input: Any = {}
    elif isinstance(arguments, str):
        try:
            tool_input = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise TranslationError(
                args_param, f"'{args_param}' is not valid JSON: {exc}", code="invalid_value"
            ) from None
        if not isinstance(tool_input, dict):
            raise TranslationError(
                args_param, f"'{args_param}' must be a JSON object.", code="invalid_value"
            )
    else:
        raise _invalid_type(args_param, "a string of JSON")
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input}


def _tool_result(message: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError(
            f"{param}.tool_call_id",
            f"'{param}.tool_call_id' is required for a tool message.",
            code="missing_required_parameter",
        )
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        result["content"] = content
    else:
        result["content"] = _text_blocks(content, f"{param}.content")
    return result


# --------------------------------------------------------------------------- tools


def _tools(tools: Any) -> list[dict[str, Any]]:
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
        schema = function.get("parameters")
        if schema is None:
            schema = dict(_DEFAULT_INPUT_SCHEMA)
        elif not isinstance(schema, dict):
            raise _invalid_type(f"{param}.function.parameters", "a JSON Schema object")
        converted: dict[str, Any] = {"name": name}
        description = function.get("description")
        if isinstance(description, str) and description:
            converted["description"] = description
        converted["input_schema"] = schema
        out.append(converted)
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _invalid_type("tool_choice.function.name", "a non-empty string")
        return {"type": "tool", "name": name}
    raise _unsupported_value(
        "tool_choice",
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
    )


# ------------------------------------------------------------------------ response


def _finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _openai_usage(counts: list[int | None]) -> dict[str, Any]:
    """From ``update_counts``' [input, cache read, cache write, output] (None counts 0)."""
    input_tokens, cache_read, cache_write, output = (count or 0 for count in counts)
    prompt = input_tokens + cache_read + cache_write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


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


def _openai_error(obj: Any, status: int) -> dict[str, Any]:
    """``{"error": {...}}`` for an Anthropic error object (or whatever else came)."""
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
    kind = error.get("type")
    message = error.get("message")
    mapped = ERROR_TYPES.get(kind) if isinstance(kind, str) else None
    code: str | None
    if mapped is not None:
        error_type, code = mapped
    else:
        error_type = _status_error_type(status)
        code = kind if isinstance(kind, str) else None
    return {
        "error": {
            "message": message if isinstance(message, str) else f"The provider answered {kind}.",
            "type": error_type,
            "code": code,
            "param": None,
        }
    }


def _error_body(body: bytes, status: int) -> bytes:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Not JSON: a proxy's or Envoy's own text ("upstream connect error ..."); keep it.
        text = body.decode("utf-8", "replace").strip()[:1000]
        out = _openai_error(None, status)
        if text:
            out["error"]["message"] = text
        return orjson.dumps(out)
    return orjson.dumps(_openai_error(obj, status))


class MessagesToChatCompletion:
    """Anthropic's response to a translated chat request, as OpenAI's (ResponseTranslator).

    ``include_usage``: the app asked for ``stream_options.include_usage``, so a stream
    gets OpenAI's final ``choices: []`` chunk with usage (and ``"usage": null`` on the
    others, as OpenAI sends them). ``created`` is the ``created`` field of every object
    (the translator's creation time by default).

    A stream is translated event by event: ``message_start`` -> the role chunk,
    ``text_delta`` -> content deltas, a ``tool_use`` block -> a ``tool_calls`` delta with
    id and name, its ``input_json_delta`` fragments -> argument deltas, ``message_delta``
    -> the finish chunk, ``message_stop`` -> the usage chunk (when asked) and
    ``data: [DONE]``, ``error`` -> ``data: {"error": ...}`` (what the OpenAI SDK raises
    from) and nothing after it. A stream cut before ``message_stop`` gets no ``[DONE]``,
    so the app can tell it was cut. Events that are not JSON are skipped and counted in
    ``skipped``.
    """

    __slots__ = (
        "_counts",
        "_created",
        "_decoder",
        "_done",
        "_id",
        "_include_usage",
        "_model",
        "_tool_index",
        "skipped",
    )

    def __init__(self, *, include_usage: bool = False, created: int | None = None) -> None:
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._decoder = SSEDecoder()
        self._id = ""
        self._model = ""
        self._counts: list[int | None] = [None, None, None, None]
        self._tool_index: dict[Any, int] = {}  # Anthropic block index -> tool_calls index
        self._done = False
        self.skipped = 0

    # ---------------------------------------------------------------- buffered

    def translate_json(self, body: bytes, status: int) -> bytes:
        if status >= 400:
            return _error_body(body, status)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or obj.get("type") != "message":
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                return orjson.dumps(_openai_error(obj, 502))
            return orjson.dumps(
                {
                    "error": {
                        "message": "The provider's response is not an Anthropic message.",
                        "type": "upstream_error",
                        "code": "untranslatable_response",
                        "param": None,
                    }
                }
            )
        return orjson.dumps(self._completion(obj))

    def _completion(self, message: dict[str, Any]) -> dict[str, Any]:
        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        content = message.get("content")
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                text = block.get("text")
                if isinstance(text, str):
                    texts.append(text)
            elif kind == "tool_use":
                tool_calls.append(
                    {
                        "id": block.get("id") or "",
                        "type": "function",
                        "function": {
                            "name": block.get("name") or "",
                            "arguments": orjson.dumps(block.get("input", {})).decode(),
                        },
                    }
                )
        out_message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
            "refusal": None,
        }
        if tool_calls:
            out_message["tool_calls"] = tool_calls
        counts: list[int | None] = [None, None, None, None]
        update_counts(counts, message.get("usage"))
        return {
            "id": message.get("id") or "",
            "object": "chat.completion",
            "created": self._created,
            "model": message.get("model") or "",
            "choices": [
                {
                    "index": 0,
                    "message": out_message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(message.get("stop_reason")),
                }
            ],
            "usage": _openai_usage(counts),
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
        kind = obj.get("type")
        if kind == "content_block_delta":
            self._block_delta(obj, out)
        elif kind == "content_block_start":
            self._block_start(obj, out)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self._id = str(message.get("id") or "")
                self._model = str(message.get("model") or "")
                update_counts(self._counts, message.get("usage"))
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "message_delta":
            update_counts(self._counts, obj.get("usage"))
            delta = obj.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if reason is not None:
                out.append(self._chunk({}, _finish_reason(reason)))
        elif kind == "message_stop":
            if self._include_usage:
                out.append(self._usage_chunk())
            out.append(b"data: [DONE]\n\n")
            self._done = True
        elif kind == "error":
            out.append(b"data: " + orjson.dumps(_openai_error(obj, 500)) + b"\n\n")
            self._done = True
        # ping, content_block_stop and unknown events carry nothing for the app.

    def _block_start(self, obj: dict[str, Any], out: list[bytes]) -> None:
        block = obj.get("content_block")
        if not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "tool_use":
            index = len(self._tool_index)
            self._tool_index[obj.get("index")] = index
            tool_input = block.get("input")
            # Streamed tool input arrives as deltas; a start block carries only {}.
            arguments = orjson.dumps(tool_input).decode() if tool_input else ""
            call = {
                "index": index,
                "id": block.get("id") or "",
                "type": "function",
                "function": {"name": block.get("name") or "", "arguments": arguments},
            }
            out.append(self._chunk({"tool_calls": [call]}))

    def _block_delta(self, obj: dict[str, Any], out: list[bytes]) -> None:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "input_json_delta":
            index = self._tool_index.get(obj.get("index"))
            fragment = delta.get("partial_json")
            if index is not None and isinstance(fragment, str) and fragment:
                call = {"index": index, "function": {"arguments": fragment}}
                out.append(self._chunk({"tool_calls": [call]}))

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
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
            "usage": _openai_usage(self._counts),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
