"""Prompt token estimates before the call, and counts of delivered text after it.

The chat rules follow OpenAI's cookbook ("How to count tokens with tiktoken"), which
matches the ``usage.prompt_tokens`` that gpt-4 / gpt-4o family models report for plain
messages; images, tools and tool calls are approximations of OpenAI's undocumented
formatting. The mock upstream implements the same rules, so both must change together.

Everything here is called with request bodies from outside: a value of the wrong type
inside a message counts as 0 (or is skipped) and nothing raises. The body's shape was
validated before; this module's job is to never crash a request while counting it.

Text is encoded with ``encode_ordinary``: special-token text such as ``<|endoftext|>``
in user content is ordinary text (it never raises ``disallowed_special``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import tiktoken

from ext_proc.tokens.encodings import encoding_for_model, get_encoding

# Each chat message is wrapped as <|start|>{role}<|message|>{content}<|end|>: the three
# wrapper tokens; the role's own tokens are counted separately.
TOKENS_PER_MESSAGE = 3
# A message's ``name`` adds its own tokens plus one separator.
TOKENS_PER_NAME = 1
# Every reply is primed with <|start|>assistant<|message|>.
REPLY_PRIMING_TOKENS = 3
# Per assistant tool call, on top of the function name and arguments (approximation).
TOKENS_PER_TOOL_CALL = 3
# An image part at ``detail: "low"``: OpenAI's fixed low-detail cost.
IMAGE_TOKENS_LOW = 85
# Any other image part: the cost of a 512x512-tiled 1024x1024 image at high detail
# (85 + 4 * 170). The true cost depends on the image size, which we do not fetch.
IMAGE_TOKENS_HIGH = 765
# Above this many characters of text to encode (plus ``_CALL_COST_CHARS`` per string),
# the async variants encode in a worker thread (tiktoken releases the GIL while it
# encodes). Encoding runs at about 20 chars/us here and an ``asyncio.to_thread`` hop
# costs about 90 us of latency, so below ~4 KB (~200 us of encoding) the loop is cheaper.
LARGE_TEXT_CHARS = 4096
# The fixed cost of one encode call (~0.8 us), in characters of text, for that decision.
_CALL_COST_CHARS = 16

# Anthropic's tokenizer is not public: its estimate uses o200k_base whatever the model.
ANTHROPIC_ENCODING = "o200k_base"
# Per Anthropic message / the request itself: the chat framing's numbers, as an
# approximation of Anthropic's (unpublished) formatting.
ANTHROPIC_TOKENS_PER_MESSAGE = 3
ANTHROPIC_REQUEST_TOKENS = 3


# Roles, names and model names longer than this are not cached (junk: no real one is).
_SHORT_MAX_CHARS = 64


def _encoding(model: str | None, name: str | None = None) -> tiktoken.Encoding:
    """The encoding called ``name`` when given (a catalog route's, resolved at config
    load), else the one ``model``'s name implies."""
    if name is not None:
        return get_encoding(name)
    if type(model) is not str:  # junk (maybe unhashable) from a body: the default
        return _encoding_cached(None)
    if len(model) > _SHORT_MAX_CHARS:  # no real model name is this long: keep it out
        return encoding_for_model(model)
    return _encoding_cached(model)


@lru_cache(maxsize=256)
def _encoding_cached(model: str | None) -> tiktoken.Encoding:
    # Skips encoding_for_model's prefix scan per call. Model names repeat (a catalog's
    # worth); the bound only matters if apps send many names. Never invalidated: a
    # model's encoding is fixed.
    return encoding_for_model(model)


@lru_cache(maxsize=2048)
def _short_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    # Roles and names repeat on every request. Keyed by the Encoding object (hashed by
    # identity; there is one per encoding name). Token counts of a string never change.
    return len(encoding.encode_ordinary(text))


# Texts up to this long have their counts remembered: system prompts, tool schemas and
# few-shot examples are resent with every request of an app, and a dict lookup is far
# cheaper than encoding them again. Bounded: at most _TEXT_CACHE_SIZE entries of at most
# _TEXT_CACHE_MAX_CHARS characters each (about 8 MB of text). A string's count under an
# encoding never changes, so nothing invalidates it.
_TEXT_CACHE_MAX_CHARS = 8192
_TEXT_CACHE_SIZE = 1024


@lru_cache(maxsize=_TEXT_CACHE_SIZE)
def _text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


def _count(encoding: tiktoken.Encoding, texts: Iterable[str]) -> int:
    encode = encoding.encode_ordinary
    total = 0
    for text in texts:
        if len(text) <= _TEXT_CACHE_MAX_CHARS:
            total += _text_tokens(encoding, text)
        else:
            total += len(encode(text))
    return total


def _tools_json(tools: Any) -> str:
    try:
        return json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        # Only reachable with Python objects that did not come from a JSON body (a
        # parsed body always serialises): such tools count as 0, by the module's rule.
        return ""


class _Collector:
    """Walks a request once: fixed token overhead plus the texts that still need encoding.

    Splitting the walk from the encode lets the async variants decide on the total text
    length before choosing between the loop and a worker thread.
    """

    __slots__ = ("chars", "encoding", "fixed", "texts")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.fixed = 0
        self.texts: list[str] = []
        self.chars = 0

    def text(self, value: Any) -> None:
        if type(value) is str and value:
            self.texts.append(value)
            self.chars += len(value)

    def short(self, value: Any) -> None:
        """A role or name: short and repeated, so its count is cached."""
        if type(value) is str and value:
            if len(value) <= _SHORT_MAX_CHARS:
                self.fixed += _short_tokens(self.encoding, value)
            else:  # junk: do not let it into the cache
                self.text(value)

    def total(self) -> int:
        return self.fixed + _count(self.encoding, self.texts)

    def tools(self, tools: Any) -> None:
        if tools is not None:
            self.text(_tools_json(tools))

    def chat(self, messages: Any, tools: Any) -> None:
        self.fixed += REPLY_PRIMING_TOKENS
        if type(messages) is list:
            for message in messages:
                if type(message) is dict:
                    self._chat_message(message)
        self.tools(tools)

    def _chat_message(self, message: dict[str, Any]) -> None:
        self.fixed += TOKENS_PER_MESSAGE
        self.short(message.get("role"))
        content = message.get("content")
        if type(content) is str:
            self.text(content)
        elif type(content) is list:
            self._chat_parts(content)
        if "name" in message:
            name = message["name"]
            if type(name) is str:
                self.fixed += TOKENS_PER_NAME
                self.short(name)
        # A tool result names the call it answers: the id is part of the prompt.
        self.text(message.get("tool_call_id"))
        tool_calls = message.get("tool_calls")
        if type(tool_calls) is list:
            # Counted on any message that carries them (only assistant messages do in a
            # valid request): those tokens reach the model either way.
            for call in tool_calls:
                if type(call) is dict:
                    self.fixed += TOKENS_PER_TOOL_CALL
                    self.text(call.get("id"))  # unique: not worth caching
                    function = call.get("function")
                    if type(function) is dict:
                        self.short(function.get("name"))
                        self.text(function.get("arguments"))

    def _chat_parts(self, parts: list[Any]) -> None:
        for part in parts:
            if type(part) is not dict:
                continue
            kind = part.get("type")
            if kind == "text":
                self.text(part.get("text"))
            elif kind == "image_url":
                image = part.get("image_url")
                low = type(image) is dict and image.get("detail") == "low"
                self.fixed += IMAGE_TOKENS_LOW if low else IMAGE_TOKENS_HIGH

    def input(self, value: Any) -> None:
        if type(value) is str:
            self.text(value)
        elif type(value) is list:
            for item in value:
                kind = type(item)
                if kind is str:
                    self.text(item)
                elif kind is int:  # one token id of a flat token array
                    self.fixed += 1
                elif kind is list:  # one token array
                    self.fixed += len(item)

    def responses(self, items: Any, instructions: Any, tools: Any) -> None:
        """An OpenAI Responses API request: ``instructions`` as a system message, then
        ``input`` (a string, or items: messages, function calls and their outputs)."""
        self.fixed += REPLY_PRIMING_TOKENS
        if type(instructions) is str and instructions:
            self.fixed += TOKENS_PER_MESSAGE
            self.short("system")
            self.text(instructions)
        if type(items) is str:
            self.fixed += TOKENS_PER_MESSAGE
            self.short("user")
            self.text(items)
        elif type(items) is list:
            for item in items:
                if type(item) is dict:
                    self._responses_item(item)
        self.tools(tools)

    def _responses_item(self, item: dict[str, Any]) -> None:
        kind = item.get("type", "message")
        if kind == "message":
            self.fixed += TOKENS_PER_MESSAGE
            self.short(item.get("role"))
            content = item.get("content")
            if type(content) is str:
                self.text(content)
            elif type(content) is list:
                for part in content:
                    if type(part) is not dict:
                        continue
                    part_kind = part.get("type")
                    if part_kind in ("input_text", "output_text", "text"):
                        self.text(part.get("text"))
                    elif part_kind == "refusal":
                        self.text(part.get("refusal"))
                    elif part_kind == "input_image":
                        low = part.get("detail") == "low"
                        self.fixed += IMAGE_TOKENS_LOW if low else IMAGE_TOKENS_HIGH
        elif kind in ("function_call", "custom_tool_call"):  # an assistant's tool call
            self.fixed += TOKENS_PER_MESSAGE + TOKENS_PER_TOOL_CALL
            self.short("assistant")
            self.text(item.get("call_id"))
            self.short(item.get("name"))
            self.text(item.get("arguments") if kind == "function_call" else item.get("input"))
        elif kind in ("function_call_output", "custom_tool_call_output"):  # a tool message
            self.fixed += TOKENS_PER_MESSAGE
            self.short("tool")
            self.text(item.get("call_id"))
            output = item.get("output")
            self.text(output if type(output) is str else _tools_json(output))
        elif kind == "reasoning":
            for part in item.get("summary") or ():
                if type(part) is dict:
                    self.text(part.get("text"))

    def anthropic(self, system: Any, messages: Any, tools: Any) -> None:
        self.fixed += ANTHROPIC_REQUEST_TOKENS
        self._anthropic_content(system)
        if type(messages) is list:
            for message in messages:
                if type(message) is dict:
                    self.fixed += ANTHROPIC_TOKENS_PER_MESSAGE
                    self._anthropic_content(message.get("content"))
        self.tools(tools)

    def _anthropic_content(self, content: Any) -> None:
        if type(content) is str:
            self.text(content)
        elif type(content) is list:
            for block in content:
                if type(block) is dict and block.get("type") == "text":
                    self.text(block.get("text"))


def _chat(model: str | None, messages: Any, tools: Any, encoding: str | None) -> _Collector:
    collector = _Collector(_encoding(model, encoding))
    collector.chat(messages, tools)
    return collector


def _input(model: str | None, value: Any, encoding: str | None) -> _Collector:
    collector = _Collector(_encoding(model, encoding))
    collector.input(value)
    return collector


def _texts(model: str | None, parts: Any, encoding: str | None) -> _Collector:
    collector = _Collector(_encoding(model, encoding))
    if type(parts) is list:
        for part in parts:
            collector.text(part)
    return collector


def _responses(
    model: str | None, items: Any, instructions: Any, tools: Any, encoding: str | None
) -> _Collector:
    collector = _Collector(_encoding(model, encoding))
    collector.responses(items, instructions, tools)
    return collector


def _anthropic(system: Any, messages: Any, tools: Any) -> _Collector:
    collector = _Collector(get_encoding(ANTHROPIC_ENCODING))
    collector.anthropic(system, messages, tools)
    return collector


async def _total_async(collector: _Collector) -> int:
    # Cost in "characters": each encode call also has a fixed cost, which dominates for
    # many short strings (a stream's 500 deltas cost ~400 us however short they are).
    cost = collector.chars + _CALL_COST_CHARS * len(collector.texts)
    if cost > LARGE_TEXT_CHARS:
        return await asyncio.to_thread(collector.total)
    return collector.total()


def count_text(model: str | None, text: str) -> int:
    """Tokens of ``text`` in ``model``'s encoding (special-token text counts as text)."""
    if type(text) is not str or not text:
        return 0
    return len(_encoding(model).encode_ordinary(text))


def count_texts(model: str | None, parts: list[str], *, encoding: str | None = None) -> int:
    """Sum of the tokens of each part (for ``ResponseSummary.delivered_text``).

    Here and below, ``encoding`` (an encoding's name) overrides what ``model`` implies.
    """
    return _texts(model, parts, encoding).total()


async def count_texts_async(
    model: str | None, parts: list[str], *, encoding: str | None = None
) -> int:
    """``count_texts``, in a worker thread when encoding is costly (see ``_total_async``)."""
    return await _total_async(_texts(model, parts, encoding))


def estimate_chat(
    model: str | None, messages: Any, tools: Any = None, *, encoding: str | None = None
) -> int:
    """Prompt tokens of a chat/completions request (``messages`` and optional ``tools``).

    ``REPLY_PRIMING_TOKENS`` + per message: ``TOKENS_PER_MESSAGE`` + tokens(role) +
    content tokens (+ tokens(name) + ``TOKENS_PER_NAME`` when ``name`` is present) + per
    tool call ``TOKENS_PER_TOOL_CALL`` + tokens(function.name) + tokens(arguments);
    plus tokens of the compact JSON of ``tools``. Content parts: text is encoded, an
    ``image_url`` costs ``IMAGE_TOKENS_LOW`` at ``detail: "low"`` else
    ``IMAGE_TOKENS_HIGH``, other part types 0.
    """
    return _chat(model, messages, tools, encoding).total()


def estimate_input(model: str | None, input: Any, *, encoding: str | None = None) -> int:
    """Tokens of an embeddings ``input`` or a legacy completions ``prompt``.

    A string or list of strings is encoded; token arrays (``list[int]`` or
    ``list[list[int]]``) count their length. No per-item overhead.
    """
    return _input(model, input, encoding).total()


def estimate_anthropic(model: str | None, system: Any, messages: Any, tools: Any = None) -> int:
    """Approximate input tokens of an Anthropic ``/v1/messages`` request (o200k_base).

    3 + tokens(system: a string or its text blocks) + per message (3 + its text: a
    string or its ``text`` blocks; other blocks count 0) + tokens of the compact JSON of
    ``tools``. ``model`` is accepted for symmetry: Anthropic's tokenizer is not public.
    """
    del model
    return _anthropic(system, messages, tools).total()


def estimate_responses(
    model: str | None,
    items: Any,
    instructions: Any = None,
    tools: Any = None,
    *,
    encoding: str | None = None,
) -> int:
    """Prompt tokens of an OpenAI Responses API request, by the chat rules for the chat
    messages it stands for: priming, then ``instructions`` as a system message; ``input``
    as one user message (a string) or per item: a message (``TOKENS_PER_MESSAGE`` + role
    + its text parts; images as in chat), a function call (an assistant message with one
    tool call: call id + name + arguments), a function call's output (a tool message:
    call id + output), a reasoning item's summary text; plus the compact JSON of
    ``tools``. Items only a stored response holds
    (``previous_response_id``) are not seen: the provider's own count covers them.
    """
    return _responses(model, items, instructions, tools, encoding).total()


async def estimate_responses_async(
    model: str | None,
    items: Any,
    instructions: Any = None,
    tools: Any = None,
    *,
    encoding: str | None = None,
) -> int:
    """``estimate_responses``; encodes in a worker thread above ``LARGE_TEXT_CHARS``."""
    return await _total_async(_responses(model, items, instructions, tools, encoding))


async def estimate_chat_async(
    model: str | None, messages: Any, tools: Any = None, *, encoding: str | None = None
) -> int:
    """``estimate_chat``; encodes in a worker thread above ``LARGE_TEXT_CHARS`` of text."""
    return await _total_async(_chat(model, messages, tools, encoding))


async def estimate_input_async(
    model: str | None, input: Any, *, encoding: str | None = None
) -> int:
    """``estimate_input``; encodes in a worker thread above ``LARGE_TEXT_CHARS`` of text."""
    return await _total_async(_input(model, input, encoding))


async def estimate_anthropic_async(
    model: str | None, system: Any, messages: Any, tools: Any = None
) -> int:
    """``estimate_anthropic``; encodes in a worker thread above ``LARGE_TEXT_CHARS``."""
    del model
    return await _total_async(_anthropic(system, messages, tools))
