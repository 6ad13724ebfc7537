"""OpenAI Chat Completions and Embeddings -> Cohere v2 Chat and Embed, and the answers back.

An app using the stock OpenAI SDK may name a model that Cohere serves.
``to_cohere_chat_request`` turns its ``/v1/chat/completions`` body into a ``/v2/chat``
body and ``CohereChatToChatCompletion`` turns Cohere's answer (a JSON chat response, an
SSE stream, or an error) into what the OpenAI SDK expects; ``to_cohere_embed_request``
and ``CohereEmbedToEmbeddings`` do the same for ``/v1/embeddings`` -> ``/v2/embed``. The
gateway's own accounting does not read the translation: it parses Cohere's usage from
the provider's bytes (``ext_proc.tokens.parsers.cohere``), and the usage the app sees is
the same mapping (``read_usage``: Cohere's billed tokens).

Chat request parameters. A parameter set to ``null`` counts as absent. A parameter that
would change the answer if it were dropped is refused (400 naming it) rather than
ignored; a parameter not in this table is refused too, as OpenAI refuses unknown ones.

============================  =============================================================
OpenAI                        Cohere v2 Chat
============================  =============================================================
model                         model = the catalog's deployment
messages: system, developer   system message, in place (text parts as text items)
messages: user                user message: text; text and image_url parts (url and
                              ``detail`` kept: Cohere takes OpenAI's image part as is)
messages: assistant           assistant message: text (and refusal) parts -> content;
                              with tool_calls, the text is the ``tool_plan`` (Cohere's
                              text before its calls) and tool_calls keep id, name and
                              arguments (a string of JSON, ``{}`` when empty)
messages: tool                tool message: tool_call_id, content (text or text parts)
messages[].name               dropped (no equivalent)
max_completion_tokens,        max_tokens (the first one set, in that order); neither:
max_tokens                    Cohere's default (the model's output limit)
temperature                   temperature (Cohere's default is 0.3 where OpenAI's is 1:
                              unset means the provider's default, as for every model)
top_p                         p (Cohere's range is 0.01..0.99: other values are answered
                              by the provider's 400)
top_k (extra_body)            k (Cohere's own parameter, same meaning)
stop (string or list)         stop_sequences
seed                          seed (best effort on both sides)
frequency_penalty,            same names (Cohere's range is 0..1: a negative value is
presence_penalty              answered by the provider's 400)
stream                        stream
stream_options.include_usage  not sent: Cohere streams always carry usage; it decides
                              whether the app gets the final usage chunk
tools (type function)         tools: type, name, description, parameters (an empty
                              object schema when absent: Cohere requires one); ``strict:
                              true`` on any tool -> ``strict_tools: true`` (Cohere's is
                              per request; the other tools' answers stay valid)
tool_choice                   auto -> not sent (Cohere's default), none -> NONE,
                              required -> REQUIRED, {function: {name}} -> tools narrowed
                              to that one and REQUIRED (Cohere cannot name a tool)
parallel_tool_calls           true: not sent (Cohere's behaviour); false with tools:
                              refused, Cohere cannot limit a turn to one call
response_format               text -> not sent; json_object -> json_object; json_schema
                              -> json_object with ``json_schema`` = its schema
n = 1, logprobs = false,      not sent (the defaults)
top_logprobs = 0
user, metadata, store,        dropped: about OpenAI's service (abuse ids, stored
service_tier, prediction,     completions, tiers, its prompt cache, latency hints), not
prompt_cache_key,             about the answer
prompt_cache_retention,
safety_identifier
n > 1                         refused: one choice only
logprobs, top_logprobs        refused: Cohere's log probabilities are per text chunk, not
                              per token with alternatives
logit_bias (non-empty)        refused: no equivalent
functions, function_call      refused: deprecated, use tools / tool_choice
audio, modalities (not text)  refused: text output only
reasoning_effort, verbosity,  refused: OpenAI-model knobs with no equivalent here
web_search_options
Cohere's other parameters     refused like any unknown one (documents, citation_options,
                              safety_mode, thinking, priority): not translated
============================  =============================================================

Embeddings request parameters, the same rules:

============================  =============================================================
OpenAI                        Cohere v2 Embed
============================  =============================================================
model                         model = the catalog's deployment
input (string or strings)     texts (token arrays are refused: Cohere embeds text only)
input_type (extra_body)       input_type (Cohere's own, required by v2); default
                              ``search_document`` (an app embedding queries sends
                              ``search_query``)
truncate (extra_body)         truncate (Cohere's own: NONE, START, END)
encoding_format               embedding_types is always ``["float"]``; ``base64`` (what
                              the OpenAI SDK asks for by default) is packed by the gateway
                              as OpenAI does (little-endian float32), by the translation
                              ``EMBED_BASE64_TRANSLATION``
dimensions                    output_dimension (embed-v4 and newer; others: the
                              provider's 400)
user                          dropped: an abuse id, not about the answer
============================  =============================================================

Chat answers: the text items of ``message.content``, after the ``tool_plan`` -> content
(null when empty); thinking items -> ``reasoning_content`` (the field OpenAI-compatible
servers use; the SDK keeps it as an extra field); ``tool_calls`` -> tool_calls as they
are. ``finish_reason`` COMPLETE / STOP_SEQUENCE -> ``stop``, MAX_TOKENS -> ``length``,
TOOL_CALL -> ``tool_calls``, TIMEOUT -> ``length`` (cut short, like a length cut), ERROR
-> an error (the generation failed). Usage: ``prompt_tokens`` = billed input,
``completion_tokens`` = billed output, ``prompt_tokens_details.cached_tokens`` =
Cohere's ``cached_tokens`` (0 when not reported). Cohere's answers do not name the model:
the app's ``model`` field is empty. Citations are not translated (the request side never
sends documents). Embeddings: ``embeddings.float`` -> ``data`` in order, usage
``prompt_tokens = total_tokens`` = billed input tokens.

Errors: Cohere's ``{"id", "message"}`` (any 4xx/5xx) -> ``{"error": {"message", "type",
"code", "param"}}`` with the same status, type and code by status (``ERROR_CODES``).
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Mapping
from typing import Any

import orjson

from ext_proc.routing.translate.base import TranslationError
from ext_proc.tokens.parsers.cohere import read_usage
from ext_proc.tokens.sse import SSEDecoder
from ext_proc.tokens.types import Usage

# The pairs' names: what the request side records and RESPONSE_TRANSLATORS is keyed by.
TRANSLATION = "openai_cohere"
EMBED_TRANSLATION = "openai_cohere_embed"
EMBED_BASE64_TRANSLATION = "openai_cohere_embed_base64"

DEFAULT_INPUT_TYPE = "search_document"

FINISH_REASONS: Mapping[str, str] = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TIMEOUT": "length",
    "TOOL_CALL": "tool_calls",
}

# HTTP status -> (OpenAI error type, code): Cohere's error bodies carry only a message.
ERROR_CODES: Mapping[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    498: ("authentication_error", "invalid_api_key"),  # Cohere's "invalid token"
    499: ("invalid_request_error", "client_closed_request"),
    500: ("server_error", "api_error"),
    501: ("server_error", "not_implemented"),
    503: ("server_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
}

_EMPTY_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}

# Chat parameters read by to_cohere_chat_request, or dropped on purpose (see the table).
_CHAT_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "modalities",
    }
)
_CHAT_DROPPED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
    }
)
_CHAT_REFUSED: Mapping[str, str] = {
    "functions": "'functions' is deprecated and not translated: use 'tools'.",
    "function_call": "'function_call' is deprecated and not translated: use 'tool_choice'.",
    "audio": "Cohere models produce text only: 'audio' is not supported.",
    "reasoning_effort": "'reasoning_effort' has no equivalent for Cohere models.",
    "verbosity": "'verbosity' has no equivalent for Cohere models.",
    "web_search_options": "'web_search_options' is not supported for Cohere models.",
}
_EMBED_HANDLED = frozenset(
    {"model", "input", "input_type", "truncate", "encoding_format", "dimensions"}
)
_EMBED_DROPPED = frozenset({"user"})


def _unsupported(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_parameter")


def _unsupported_value(param: str, message: str) -> TranslationError:
    return TranslationError(param, message, code="unsupported_value")


def _invalid_type(param: str, expected: str) -> TranslationError:
    return TranslationError(param, f"'{param}' must be {expected}.", code="invalid_type")


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _check_keys(
    body: Mapping[str, Any],
    handled: frozenset[str],
    dropped: frozenset[str],
    refused: Mapping[str, str],
) -> None:
    for key, value in body.items():
        if value is None or key in handled or key in dropped:
            continue
        raise _unsupported(
            key,
            refused.get(key) or f"Unrecognized request argument supplied: {key} (for this model).",
        )


# --------------------------------------------------------------------- chat request


def wants_usage_chunk(body: Mapping[str, Any]) -> bool:
    """True when the app asked for the final usage chunk of a stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def to_cohere_chat_request(body: Mapping[str, Any], deployment: str) -> dict[str, Any]:
    """The v2 Chat body for an OpenAI chat body (see the module's table).

    ``body`` is not modified. Raises ``TranslationError`` naming the app's field.
    """
    _check_keys(body, _CHAT_HANDLED, _CHAT_DROPPED, _CHAT_REFUSED)
    _check_refused_values(body)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid_type("messages", "a non-empty array")
    out: dict[str, Any] = {
        "model": deployment,
        "messages": [_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
    }
    max_tokens = _max_tokens(body)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for name, cohere_name in (
        ("temperature", "temperature"),
        ("top_p", "p"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
    ):
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _invalid_type(name, "a number")
            out[cohere_name] = value
    for name, cohere_name in (("top_k", "k"), ("seed", "seed")):
        value = body.get(name)
        if value is not None:
            if type(value) is not int:
                raise _invalid_type(name, "an integer")
            out[cohere_name] = value
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    stream = body.get("stream")
    if stream is not None:
        if type(stream) is not bool:
            raise _invalid_type("stream", "a boolean")
        if stream:
            out["stream"] = True
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        out["response_format"] = response_format
    _add_tools(body, out)
    return out


def _check_refused_values(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        if type(n) is not int:
            raise _invalid_type("n", "an integer")
        raise _unsupported_value("n", "Cohere models return one choice: 'n' must be 1.")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _unsupported(
            "logprobs", "Log probabilities in OpenAI's form are not available for Cohere models."
        )
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and top_logprobs != 0:
        raise _unsupported(
            "top_logprobs",
            "Log probabilities in OpenAI's form are not available for Cohere models.",
        )
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and logit_bias != {}:
        raise _unsupported("logit_bias", "'logit_bias' is not supported for Cohere models.")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported_value("modalities", "Cohere models produce text only.")


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise TranslationError(
                name, f"'{name}' must be a positive integer.", code="invalid_value"
            )
        return value
    return None


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _invalid_type("stop", "a string or an array of strings")


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            return {"type": "json_object"}
        if not isinstance(schema, dict):
            raise _invalid_type("response_format.json_schema.schema", "a JSON Schema object")
        return {"type": "json_object", "json_schema": schema}
    raise _unsupported_value(
        "response_format", "'response_format.type' must be 'text', 'json_object' or 'json_schema'."
    )


# ------------------------------------------------------------------------- messages


def _message(message: Any, param: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _invalid_type(param, "an object")
    role = message.get("role")
    if role in ("system", "developer"):
        return {"role": "system", "content": _text_content(message.get("content"), param)}
    if role == "user":
        return {"role": "user", "content": _user_content(message.get("content"), param)}
    if role == "assistant":
        return _assistant(message, param)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise TranslationError(
                f"{param}.tool_call_id",
                f"'{param}.tool_call_id' is required for a tool message.",
                code="missing_required_parameter",
            )
        return {
            "role": "tool",
            "tool_call_id": call_id,
            "content": _text_content(message.get("content"), param),
        }
    if role == "function":
        raise _unsupported_value(
            f"{param}.role", "'function' messages are deprecated: use 'tool' messages."
        )
    raise _invalid_type(
        f"{param}.role", "one of 'system', 'developer', 'user', 'assistant', 'tool'"
    )


def _text_content(content: Any, message_param: str) -> str | list[dict[str, Any]]:
    """A system, developer or tool message's content: a string, or text parts."""
    param = f"{message_param}.content"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of text parts")
    return [
        {"type": "text", "text": _part_text(part, f"{param}[{j}]")}
        for j, part in enumerate(content)
    ]


def _part_text(part: Any, param: str) -> str:
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
    return text


def _user_content(content: Any, message_param: str) -> str | list[dict[str, Any]]:
    param = f"{message_param}.content"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if isinstance(part, dict) and part.get("type") == "image_url":
            out.append(_image_part(part.get("image_url"), f"{part_param}.image_url"))
        elif isinstance(part, dict) and part.get("type") not in ("text", None):
            raise _unsupported_value(
                f"{part_param}.type",
                f"Cohere models accept text and image_url parts, not {part.get('type')!r}.",
            )
        else:
            out.append({"type": "text", "text": _part_text(part, part_param)})
    return out


def _image_part(image_url: Any, param: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or not url:
        raise _invalid_type(f"{param}.url", "a non-empty string")
    if not url.startswith(("https://", "http://", "data:")):
        raise _unsupported_value(f"{param}.url", "Image URLs must be http(s) or data: URLs.")
    image: dict[str, Any] = {"url": url}
    detail = image_url.get("detail")
    if detail is not None:
        if detail not in ("auto", "low", "high"):
            raise _unsupported_value(f"{param}.detail", "'detail' must be 'auto', 'low' or 'high'.")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _assistant(message: dict[str, Any], param: str) -> dict[str, Any]:
    if message.get("function_call") is not None:
        raise _unsupported(
            f"{param}.function_call", "'function_call' is deprecated and not translated."
        )
    if message.get("audio") is not None:
        raise _unsupported(f"{param}.audio", "Cohere models take no audio turns.")
    text = _assistant_text(message.get("content"), f"{param}.content")
    out: dict[str, Any] = {"role": "assistant"}
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _invalid_type(f"{param}.tool_calls", "an array")
        calls = [_tool_call(call, f"{param}.tool_calls[{j}]") for j, call in enumerate(tool_calls)]
        if calls:
            if text:
                out["tool_plan"] = text  # Cohere's text before its calls
            out["tool_calls"] = calls
            return out
    out["content"] = text
    return out


def _assistant_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid_type(param, "a string, an array of parts or null")
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if isinstance(part, dict) and part.get("type") == "refusal":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise _invalid_type(f"{part_param}.refusal", "a string")
            texts.append(refusal)
        else:
            texts.append(_part_text(part, part_param))
    return "".join(texts)


def _tool_call(call: Any, param: str) -> dict[str, Any]:
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
    if arguments is None or arguments == "":
        arguments = "{}"
    elif not isinstance(arguments, str):
        raise _invalid_type(f"{param}.function.arguments", "a string of JSON")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# ---------------------------------------------------------------------------- tools


def _add_tools(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    converted: list[dict[str, Any]] = []
    strict = False
    if tools is not None:
        converted, strict = _tools(tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and type(parallel) is not bool:
        raise _invalid_type("parallel_tool_calls", "a boolean")
    if parallel is False and converted:
        raise _unsupported_value(
            "parallel_tool_calls",
            "Cohere models cannot be limited to one tool call per turn: "
            "'parallel_tool_calls' must be true or absent.",
        )
    choice = body.get("tool_choice")
    cohere_choice: str | None = None
    if choice is None or choice == "auto":
        pass
    elif choice == "none":
        cohere_choice = "NONE"
    elif choice == "required":
        cohere_choice = "REQUIRED"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _invalid_type("tool_choice.function.name", "a non-empty string")
        chosen = [tool for tool in converted if tool["function"]["name"] == name]
        if not chosen:
            raise TranslationError(
                "tool_choice",
                f"'tool_choice' names the function {name!r}, which is not in 'tools'.",
                code="invalid_value",
            )
        converted = chosen  # Cohere cannot name a tool: only this one, and it must be called
        cohere_choice = "REQUIRED"
    else:
        raise _unsupported_value(
            "tool_choice",
            "'tool_choice' must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
        )
    if converted:
        out["tools"] = converted
        if strict:
            out["strict_tools"] = True
    # Without tools, "none" means "answer in text", Cohere's behaviour anyway; a choice
    # that demands a tool is sent as is and refused by the provider, as OpenAI refuses it.
    if cohere_choice is not None and (converted or cohere_choice != "NONE"):
        out["tool_choice"] = cohere_choice


def _tools(tools: Any) -> tuple[list[dict[str, Any]], bool]:
    if not isinstance(tools, list):
        raise _invalid_type("tools", "an array")
    out: list[dict[str, Any]] = []
    strict = False
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
            schema = dict(_EMPTY_SCHEMA)
        elif not isinstance(schema, dict):
            raise _invalid_type(f"{param}.function.parameters", "a JSON Schema object")
        converted: dict[str, Any] = {"name": name}
        description = function.get("description")
        if isinstance(description, str) and description:
            converted["description"] = description
        converted["parameters"] = schema
        if function.get("strict") is True:
            strict = True
        out.append({"type": "function", "function": converted})
    return out, strict


# -------------------------------------------------------------------- embed request


def to_cohere_embed_request(
    body: Mapping[str, Any], deployment: str
) -> tuple[dict[str, Any], bool]:
    """The v2 Embed body for an OpenAI embeddings body, and whether the app asked for
    base64 embeddings (see the module's table). ``body`` is not modified."""
    _check_keys(body, _EMBED_HANDLED, _EMBED_DROPPED, {})
    texts = _embed_texts(body.get("input"))
    input_type = body.get("input_type")
    if input_type is None:
        input_type = DEFAULT_INPUT_TYPE
    elif not isinstance(input_type, str) or not input_type:
        raise _invalid_type("input_type", "a string")
    out: dict[str, Any] = {
        "model": deployment,
        "texts": texts,
        "input_type": input_type,
        "embedding_types": ["float"],
    }
    truncate = body.get("truncate")
    if truncate is not None:
        if truncate not in ("NONE", "START", "END"):
            raise _unsupported_value("truncate", "'truncate' must be 'NONE', 'START' or 'END'.")
        out["truncate"] = truncate
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if type(dimensions) is not int or dimensions < 1:
            raise TranslationError(
                "dimensions", "'dimensions' must be a positive integer.", code="invalid_value"
            )
        out["output_dimension"] = dimensions
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise _unsupported_value(
            "encoding_format", "'encoding_format' must be 'float' or 'base64'."
        )
    return out, encoding == "base64"


def _embed_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(type(item) is int or isinstance(item, list) for item in value):
            raise _unsupported_value(
                "input", "Cohere models embed text: token arrays are not supported."
            )
    raise _invalid_type("input", "a string or a non-empty array of strings")


# ------------------------------------------------------------------------- answers


def _finish_reason(reason: Any) -> str:
    return FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


def openai_usage(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's chat ``usage`` for what ``read_usage`` found (None when nothing was reported)."""
    if usage is None:
        return None
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens or 0},
    }


def _status_error(status: int) -> tuple[str, str | None]:
    found = ERROR_CODES.get(status)
    if found is not None:
        return found
    return ("invalid_request_error" if 400 <= status < 500 else "server_error"), None


def openai_error(obj: Any, status: int) -> dict[str, Any]:
    """``{"error": {...}}`` for a Cohere error body (or whatever else came) at ``status``."""
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        # Already OpenAI's shape: Envoy's own reply (a timeout, a reset) is rendered so.
        error = obj["error"]
        return {
            "error": {
                "message": str(error.get("message") or f"The provider answered HTTP {status}."),
                "type": error.get("type") or _status_error(status)[0],
                "code": error.get("code"),
                "param": error.get("param"),
            }
        }
    error_type, code = _status_error(status)
    message = obj.get("message") if isinstance(obj, dict) else None
    return {
        "error": {
            "message": message
            if isinstance(message, str) and message
            else f"The provider answered HTTP {status}.",
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
        out = openai_error(None, status)
        if text:
            out["error"]["message"] = text
        return orjson.dumps(out)
    return orjson.dumps(openai_error(obj, status))


def _untranslatable(what: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": f"The provider's response is not a Cohere {what}.",
                "type": "upstream_error",
                "code": "untranslatable_response",
                "param": None,
            }
        }
    )


def _generation_error(message: Any) -> dict[str, Any]:
    return {
        "error": {
            "message": message
            if isinstance(message, str) and message
            else "The provider ended the generation with an error.",
            "type": "server_error",
            "code": "generation_error",
            "param": None,
        }
    }


class CohereChatToChatCompletion:
    """Cohere's answer to a translated chat request, as OpenAI's (a ResponseTranslator).

    ``include_usage``: the app asked for ``stream_options.include_usage``, so a stream
    gets OpenAI's final ``choices: []`` chunk with usage (and ``"usage": null`` on the
    others, as OpenAI sends them). ``created`` is the ``created`` field of every object
    (the translator's creation time by default).

    A stream is translated event by event: ``message-start`` -> the role chunk, text of
    ``content-start`` / ``content-delta`` -> content deltas (thinking ->
    ``reasoning_content`` deltas), ``tool-plan-delta`` -> content deltas,
    ``tool-call-start`` -> a ``tool_calls`` delta with id and name,
    ``tool-call-delta`` -> argument deltas, ``message-end`` -> the finish chunk, the usage
    chunk (when asked and reported) and ``data: [DONE]``; a ``message-end`` that reports
    an error (finish reason ERROR, ``delta.error``) -> ``data: {"error": ...}`` (what the
    OpenAI SDK raises from) and no ``[DONE]``. Nothing is sent after either. A stream cut
    before ``message-end`` gets no ``[DONE]``, so the app can tell it was cut. Events that
    are not JSON (other than Cohere's own ``[DONE]``) are skipped and counted in
    ``skipped``.
    """

    __slots__ = (
        "_created",
        "_decoder",
        "_done",
        "_id",
        "_include_usage",
        "_last_tool",
        "_tool_index",
        "skipped",
    )

    def __init__(self, *, include_usage: bool = False, created: int | None = None) -> None:
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._decoder = SSEDecoder()
        self._id = ""
        self._tool_index: dict[Any, int] = {}  # Cohere's tool-call index -> tool_calls index
        self._last_tool: int | None = None
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
        if not isinstance(obj, dict) or not isinstance(obj.get("message"), dict):
            if isinstance(obj, dict) and (
                isinstance(obj.get("message"), str) or isinstance(obj.get("error"), dict)
            ):
                return orjson.dumps(openai_error(obj, 502))
            return _untranslatable("chat response")
        if obj.get("finish_reason") == "ERROR":
            return orjson.dumps(_generation_error(None))
        return orjson.dumps(self._completion(obj))

    def _completion(self, obj: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = obj["message"]
        texts: list[str] = []
        thinking: list[str] = []
        plan = message.get("tool_plan")
        if isinstance(plan, str) and plan:
            texts.append(plan)
        content = message.get("content")
        for item in content if isinstance(content, list) else ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "text" and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif kind == "thinking" and isinstance(item.get("thinking"), str):
                thinking.append(item["thinking"])
        out_message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) or None,
            "refusal": None,
        }
        if thinking:
            out_message["reasoning_content"] = "".join(thinking)
        tool_calls = [
            _openai_tool_call(call)
            for call in message.get("tool_calls") or ()
            if isinstance(call, dict)
        ]
        if tool_calls:
            out_message["tool_calls"] = tool_calls
        completion: dict[str, Any] = {
            "id": str(obj.get("id") or ""),
            "object": "chat.completion",
            "created": self._created,
            "model": "",
            "choices": [
                {
                    "index": 0,
                    "message": out_message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(obj.get("finish_reason")),
                }
            ],
        }
        usage = openai_usage(read_usage(obj.get("usage")))
        if usage is not None:
            completion["usage"] = usage
        return completion

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
            if data != b"[DONE]":
                self.skipped += 1
            return
        kind = obj.get("type")
        delta = obj.get("delta")
        message = delta.get("message") if isinstance(delta, dict) else None
        if not isinstance(message, dict):
            message = {}
        if kind == "content-delta" or kind == "content-start":
            self._content(message.get("content"), out)
        elif kind == "tool-plan-delta":
            plan = message.get("tool_plan")
            if isinstance(plan, str) and plan:
                out.append(self._chunk({"content": plan}))
        elif kind == "tool-call-start":
            self._tool_start(obj, message.get("tool_calls"), out)
        elif kind == "tool-call-delta":
            self._tool_delta(obj, message.get("tool_calls"), out)
        elif kind == "message-start":
            self._id = str(obj.get("id") or "")
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "message-end":
            self._end(delta if isinstance(delta, dict) else {}, out)
        # content-end, tool-call-end, citation-start/end, debug: nothing for the app.

    def _content(self, content: Any, out: list[bytes]) -> None:
        if not isinstance(content, dict):
            return
        text = content.get("text")
        if isinstance(text, str) and text:
            out.append(self._chunk({"content": text}))
            return
        thinking = content.get("thinking")
        if isinstance(thinking, str) and thinking:
            out.append(self._chunk({"reasoning_content": thinking}))

    def _tool_start(self, obj: dict[str, Any], call: Any, out: list[bytes]) -> None:
        if not isinstance(call, dict):
            return
        index = len(self._tool_index)
        self._tool_index[obj.get("index", index)] = index
        self._last_tool = index
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        arguments = function.get("arguments")
        delta = {
            "index": index,
            "id": str(call.get("id") or ""),
            "type": "function",
            "function": {
                "name": str(function.get("name") or ""),
                "arguments": arguments if isinstance(arguments, str) else "",
            },
        }
        out.append(self._chunk({"tool_calls": [delta]}))

    def _tool_delta(self, obj: dict[str, Any], call: Any, out: list[bytes]) -> None:
        index = self._tool_index.get(obj.get("index"), self._last_tool)
        function = call.get("function") if isinstance(call, dict) else None
        fragment = function.get("arguments") if isinstance(function, dict) else None
        if index is not None and isinstance(fragment, str) and fragment:
            delta = {"index": index, "function": {"arguments": fragment}}
            out.append(self._chunk({"tool_calls": [delta]}))

    def _end(self, delta: dict[str, Any], out: list[bytes]) -> None:
        self._done = True
        reason = delta.get("finish_reason")
        error = delta.get("error")
        if reason == "ERROR" or error:
            out.append(b"data: " + orjson.dumps(_generation_error(error)) + b"\n\n")
            return
        out.append(self._chunk({}, _finish_reason(reason)))
        if self._include_usage:
            usage = openai_usage(read_usage(delta.get("usage")))
            if usage is not None:
                chunk = {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": "",
                    "choices": [],
                    "usage": usage,
                }
                out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        out.append(b"data: [DONE]\n\n")

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": "",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self._include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _openai_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict):
        function = {}
    arguments = function.get("arguments")
    return {
        "id": str(call.get("id") or ""),
        "type": "function",
        "function": {
            "name": str(function.get("name") or ""),
            "arguments": arguments if isinstance(arguments, str) and arguments else "{}",
        },
    }


class CohereEmbedToEmbeddings:
    """Cohere's answer to a translated embeddings request, as OpenAI's list (a
    ResponseTranslator). ``base64``: the app asked for ``encoding_format: base64``, so
    each vector is packed as OpenAI packs it (little-endian float32, base64). An embed
    answer is never streamed: should one arrive as a stream, it is read whole."""

    __slots__ = ("_base64", "_buffer")

    def __init__(self, *, base64: bool = False) -> None:
        self._base64 = base64
        self._buffer = bytearray()

    def translate_json(self, body: bytes, status: int) -> bytes:
        if status >= 400:
            return _error_body(body, status)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        embeddings = obj.get("embeddings") if isinstance(obj, dict) else None
        # v2: {"float": [...]} by type; v1: a plain list of float vectors.
        vectors = embeddings.get("float") if isinstance(embeddings, dict) else embeddings
        if not isinstance(obj, dict) or not isinstance(vectors, list):
            if isinstance(obj, dict) and (
                isinstance(obj.get("message"), str) or isinstance(obj.get("error"), dict)
            ):
                return orjson.dumps(openai_error(obj, 502))
            return _untranslatable("embed response")
        usage = read_usage(obj.get("meta"))
        prompt = (usage.prompt_tokens or 0) if usage is not None else 0
        data = [
            {"object": "embedding", "index": i, "embedding": self._vector(vector)}
            for i, vector in enumerate(vectors)
        ]
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": "",
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    def _vector(self, vector: Any) -> Any:
        if not self._base64 or not isinstance(vector, list):
            return vector
        try:
            packed = struct.pack(f"<{len(vector)}f", *vector)
        except struct.error:
            return vector  # not numbers: passed on as they came
        return base64.b64encode(packed).decode("ascii")

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        return b""

    def finish(self) -> bytes:
        return self.translate_json(bytes(self._buffer), 200)
