"""Token counting for the mock upstream: the ground truth the gateway's numbers are checked on.

Written independently of the gateway's estimator (``ext_proc.tokens``) on purpose: a
test compares the two, so they must follow the same published rules and nothing else.
The rules are OpenAI's cookbook ("How to count tokens with tiktoken"):

chat prompt = 3 (reply priming) + for each message:
    3 + tokens(role) + tokens(content) [+ tokens(name) + 1 when "name" is present]
    content: str -> tokens; None -> 0; list of parts -> text parts' tokens,
    image_url parts 85 (detail "low") or 765 (otherwise), other parts 0.
    assistant tool_calls: each 3 + tokens(id) + tokens(function.name)
    + tokens(function.arguments); a tool message's ``tool_call_id``: tokens(it) (the ids
    are part of the prompt the model reads: a realistic ``call_...`` id is ~10 tokens).
  + tokens(compact JSON of the request's ``tools``) when present:
    ``json.dumps(tools, separators=(",", ":"), ensure_ascii=False)``.
legacy completion prompt = tokens of the prompt (summed over a list; token arrays count
    their length). embeddings input = the same, no overhead.
Anthropic input (an approximation: Anthropic's tokenizer is not public, we count with
    o200k_base) = 3 + tokens(system: a string or its text blocks) + for each message
    3 + tokens(its text: a string or its text blocks) + tokens(compact JSON of ``tools``).

Text is encoded with ``encode_ordinary``: text that looks like a special token
(``<|endoftext|>``) is counted as ordinary text, the way providers treat user input.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import tiktoken

from ext_proc.tokens.encodings import encoding_for_model, get_encoding

# Anthropic's tokenizer is not published: o200k_base is a stand-in (counts are close for
# English text, not exact).
ANTHROPIC_ENCODING = "o200k_base"

IMAGE_LOW_DETAIL_TOKENS = 85
IMAGE_HIGH_DETAIL_TOKENS = 765
_PER_MESSAGE = 3
_REPLY_PRIMING = 3
_PER_TOOL_CALL = 3

# Strings up to this length have their count memoised (system prompts and other text
# that repeats across requests); longer ones are counted each time.
_MEMO_MAX_CHARS = 4096
_MEMO_ENTRIES = 8192
# Request bodies above this size are counted in a worker thread (tiktoken releases the
# GIL): one huge prompt must not stall every other request on the loop.
OFFLOAD_BODY_BYTES = 32 * 1024


class TokenCounter:
    """Counts tokens of request and response parts with one tiktoken encoding."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        encode = encoding.encode_ordinary

        def count(text: str) -> int:
            return len(encode(text))

        # Entries depend only on the text (the encoding is fixed per counter): they never
        # go stale; the bound keeps memory flat.
        self._memo: Callable[[str], int] = lru_cache(maxsize=_MEMO_ENTRIES)(count)
        self._count = count

    def text(self, text: str) -> int:
        if not text:
            return 0
        if len(text) <= _MEMO_MAX_CHARS:
            return self._memo(text)
        return self._count(text)

    def chat_prompt(self, messages: list[Any], tools: Any = None) -> int:
        total = _REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE
            role = message.get("role")
            if isinstance(role, str):
                total += self.text(role)
            total += self.chat_content(message.get("content"))
            name = message.get("name")
            if isinstance(name, str):
                total += self.text(name) + 1
            total += self._str(message.get("tool_call_id"))
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list):
                for call in tool_calls:
                    total += _PER_TOOL_CALL
                    if isinstance(call, dict):
                        total += self._str(call.get("id"))
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        total += self._str(function.get("name"))
                        total += self._str(function.get("arguments"))
        return total + self.tools(tools)

    def tools(self, tools: Any) -> int:
        """Tokens of a request's ``tools`` as compact JSON (0 when absent or null)."""
        if tools is None:
            return 0
        return self.text(json.dumps(tools, separators=(",", ":"), ensure_ascii=False))

    def chat_content(self, content: Any) -> int:
        if isinstance(content, str):
            return self.text(content)
        if not isinstance(content, list):
            return 0
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                total += self._str(part.get("text"))
            elif kind == "image_url":
                image = part.get("image_url")
                detail = image.get("detail") if isinstance(image, dict) else None
                total += IMAGE_LOW_DETAIL_TOKENS if detail == "low" else IMAGE_HIGH_DETAIL_TOKENS
        return total

    def prompt(self, prompt: Any) -> int:
        """A legacy completion prompt or an embeddings input: str, token array, or lists."""
        if isinstance(prompt, str):
            return self.text(prompt)
        if not isinstance(prompt, list):
            return 0
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += self.text(item)
            elif isinstance(item, list):
                total += len(item)
        return total

    def anthropic_input(self, system: Any, messages: list[Any], tools: Any = None) -> int:
        """Approximate Anthropic input tokens (see the module docstring)."""
        total = _REPLY_PRIMING + self._anthropic_text(system)
        for message in messages:
            if isinstance(message, dict):
                total += _PER_MESSAGE + self._anthropic_text(message.get("content"))
        return total + self.tools(tools)

    def _anthropic_text(self, content: Any) -> int:
        if isinstance(content, str):
            return self.text(content)
        if not isinstance(content, list):
            return 0
        return sum(
            self._str(block.get("text"))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )

    def _str(self, value: Any) -> int:
        return self.text(value) if isinstance(value, str) else 0


@lru_cache(maxsize=8)
def _counter_for_encoding(name: str) -> TokenCounter:
    return TokenCounter(get_encoding(name))


def counter_for_model(model: str | None) -> TokenCounter:
    """The counter for a model's encoding (one per encoding, built once per process)."""
    return _counter_for_encoding(encoding_for_model(model).name)


def anthropic_counter() -> TokenCounter:
    return _counter_for_encoding(ANTHROPIC_ENCODING)


def chat_prompt_tokens(model: str | None, messages: list[Any], tools: Any = None) -> int:
    return counter_for_model(model).chat_prompt(messages, tools)


def prompt_tokens(model: str | None, prompt: Any) -> int:
    return counter_for_model(model).prompt(prompt)


def anthropic_input_tokens(system: Any, messages: list[Any], tools: Any = None) -> int:
    return anthropic_counter().anthropic_input(system, messages, tools)


def text_tokens(model: str | None, text: str) -> int:
    return counter_for_model(model).text(text)


async def count_for_body(count: Callable[[], int], body_bytes: int) -> int:
    """Run ``count`` on the loop for ordinary bodies, in a thread for large ones."""
    if body_bytes > OFFLOAD_BODY_BYTES:
        return await asyncio.to_thread(count)
    return count()
