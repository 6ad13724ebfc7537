"""Prompt estimates: fixed inputs against numbers worked out once by hand.

How the expected numbers were obtained: each string's token count was taken once with
plain tiktoken (``tiktoken.get_encoding(name).encode_ordinary(s)``, the bundled
o200k_base / cl100k_base files), then added up by hand following the rules in
``estimator.py``. The per-string counts used are in the comments. The cookbook case is
OpenAI's "How to count tokens with tiktoken" example, whose totals (129 for gpt-4 and
gpt-3.5-turbo, 124 for gpt-4o / gpt-4o-mini) OpenAI checked against the API's
``usage.prompt_tokens``; our rules reproduce them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ext_proc.tokens import estimator
from ext_proc.tokens.estimator import (
    IMAGE_TOKENS_HIGH,
    IMAGE_TOKENS_LOW,
    count_text,
    count_texts,
    count_texts_async,
    estimate_anthropic,
    estimate_anthropic_async,
    estimate_chat,
    estimate_chat_async,
    estimate_input,
    estimate_input_async,
)

COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates "
        "corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

# "What is the weather in Paris?" = 7, "get_weather" = 2, '{"city":"Paris"}' = 5,
# "22 degrees and sunny." = 5 (same in both encodings); roles = 1 each.
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny."},
]
# Its compact JSON is 54 tokens in both encodings.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
                "required": ["city"],
            },
        },
    }
]
# Its compact JSON is 39 tokens (o200k_base).
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
# 12 tokens in o200k_base, 17 in cl100k_base.
MULTILINGUAL = "Résumé naïve café 日本語のテキスト 🎉"


def image_message(detail: str | None) -> list[dict[str, Any]]:
    image: dict[str, Any] = {"url": "https://example.com/cat.png"}
    if detail is not None:
        image["detail"] = detail
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},  # 5 o200k, 6 cl100k
                {"type": "image_url", "image_url": image},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_example(model: str, expected: int) -> None:
    assert estimate_chat(model, COOKBOOK_MESSAGES) == expected


def test_single_message() -> None:
    # 3 priming + 3 per message + 1 ("user") + 2 ("Hello world")
    assert estimate_chat("gpt-4o", [{"role": "user", "content": "Hello world"}]) == 9


def test_name_adds_its_tokens_plus_one() -> None:
    messages = [{"role": "user", "name": "Bob", "content": "Hello world"}]
    # 9 + 1 ("Bob") + 1 (TOKENS_PER_NAME)
    assert estimate_chat("gpt-4o", messages) == 11


@pytest.mark.parametrize(
    ("model", "detail", "expected"),
    [
        ("gpt-4o", "low", 3 + 3 + 1 + 5 + IMAGE_TOKENS_LOW),
        ("gpt-4o", "high", 3 + 3 + 1 + 5 + IMAGE_TOKENS_HIGH),
        ("gpt-4o", "auto", 3 + 3 + 1 + 5 + IMAGE_TOKENS_HIGH),
        ("gpt-4o", None, 3 + 3 + 1 + 5 + IMAGE_TOKENS_HIGH),
        ("gpt-4", "low", 3 + 3 + 1 + 6 + IMAGE_TOKENS_LOW),
    ],
)
def test_image_parts(model: str, detail: str | None, expected: int) -> None:
    assert IMAGE_TOKENS_LOW == 85
    assert IMAGE_TOKENS_HIGH == 765
    assert estimate_chat(model, image_message(detail)) == expected


def test_other_part_types_count_zero() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello world"},
                {"type": "input_audio", "input_audio": {"data": "UklGR...", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}},
            ],
        }
    ]
    assert estimate_chat("gpt-4o", messages) == 9


def test_tool_calls_and_tool_messages() -> None:
    # 3 priming
    # + user: 3 + 1 + 7 = 11
    # + assistant: 3 + 1 + 0 (content None) + tool call (3 + 3 id + 2 + 5) = 17
    # + tool: 3 + 1 + 3 (tool_call_id "call_1": the ids reach the model) + 5 = 12
    assert estimate_chat("gpt-4o", TOOL_CONVERSATION) == 43


def test_request_tools_add_their_compact_json() -> None:
    assert estimate_chat("gpt-4o", TOOL_CONVERSATION, TOOLS) == 43 + 54
    assert estimate_chat("gpt-4", TOOL_CONVERSATION, TOOLS) == 43 + 54


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Hello world", 2),
        (["Hello world", "Hello, world!"], 2 + 4),
        ([1, 2, 3], 3),
        ([[1, 2], [3, 4, 5]], 5),
        ([], 0),
        ("", 0),
    ],
)
def test_embeddings_input(value: Any, expected: int) -> None:
    assert estimate_input("text-embedding-3-small", value) == expected


def test_legacy_prompt_uses_the_same_rules() -> None:
    assert estimate_input("gpt-3.5-turbo-instruct", ["Hello world", [1, 2, 3]]) == 5


def test_unknown_model_uses_the_default_encoding() -> None:
    messages = [{"role": "user", "content": MULTILINGUAL}]
    assert estimate_chat("my-local-llama", messages) == 3 + 3 + 1 + 12  # o200k_base
    assert estimate_chat(None, messages) == 3 + 3 + 1 + 12
    assert estimate_chat("gpt-4", messages) == 3 + 3 + 1 + 17  # cl100k_base
    assert count_text("my-local-llama", MULTILINGUAL) == 12


def test_special_token_text_counts_as_text() -> None:
    # "<|endoftext|>" is 7 ordinary tokens; the sentence is 9 (o200k) / 8 (cl100k).
    assert count_text("gpt-4o", "<|endoftext|>") == 7
    assert count_text("gpt-4o", "hello <|endoftext|> world") == 9
    assert count_text("gpt-4", "hello <|endoftext|> world") == 8
    messages = [{"role": "user", "content": "hello <|endoftext|> world"}]
    assert estimate_chat("gpt-4o", messages) == 16
    assert estimate_input("text-embedding-3-small", "<|endoftext|>") == 7


def test_anthropic() -> None:
    messages = [
        {"role": "user", "content": "Hello, world!"},  # 4
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Hello world"},  # 2
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            ],
        },
    ]
    system = "You are a helpful assistant."  # 6
    # 3 + 6 + (3 + 4) + (3 + 2)
    assert estimate_anthropic("claude-sonnet-4-5", system, messages) == 21
    blocks = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    assert estimate_anthropic("claude-sonnet-4-5", blocks, messages) == 21
    assert estimate_anthropic("claude-sonnet-4-5", None, messages) == 15
    assert estimate_anthropic("claude-sonnet-4-5", system, messages, ANTHROPIC_TOOLS) == 60


def test_anthropic_always_uses_o200k() -> None:
    assert estimate_anthropic("gpt-4", MULTILINGUAL, []) == 3 + 12


def test_count_texts_sums_parts() -> None:
    assert count_texts("gpt-4o", ["Hello", " world", "", "Hello, world!"]) == 1 + 1 + 4
    assert count_texts("gpt-4o", []) == 0


JUNK_MESSAGES: list[Any] = [
    None,
    1,
    "a string",
    ["nested"],
    {"role": 5, "content": {"a": 1}, "name": 7, "tool_calls": "x"},  # 3
    {
        "content": [
            None,
            {"type": "text", "text": 5},
            {"type": "image_url", "image_url": "http://x"},  # not a dict: high detail
            {"no": "type"},
        ]
    },  # 3 + 765
    {"role": "assistant", "tool_calls": [None, {"function": None}, {"function": {"name": 1}}]},
    # 3 + 1 (role) + 2 tool calls x 3
]


def test_junk_never_raises_and_counts_zero() -> None:
    assert estimate_chat("gpt-4o", JUNK_MESSAGES) == 3 + 3 + (3 + 765) + (3 + 1 + 6)
    assert estimate_chat("gpt-4o", None) == 3
    assert estimate_chat("gpt-4o", "not a list", tools={1, 2}) == 3  # set: not JSON
    assert estimate_chat(12, {"messages": []}) == 3  # type: ignore[arg-type]
    assert estimate_chat(["unhashable"], []) == 3  # type: ignore[arg-type]
    assert estimate_input("gpt-4o", None) == 0
    assert estimate_input("gpt-4o", 5) == 0
    assert estimate_input("gpt-4o", [None, {"a": 1}, True, 1.5]) == 0
    assert estimate_anthropic("x", 5, [None, {"content": [5, {"type": "image"}]}]) == 3 + 3
    assert count_text("gpt-4o", None) == 0  # type: ignore[arg-type]
    assert count_texts("gpt-4o", [None, 3, "Hello"]) == 1  # type: ignore[list-item]
    # A lone surrogate (possible in a JSON body's "\ud800" escape) is replaced, not raised.
    assert count_text("gpt-4o", "a\ud800b") == 3


def test_long_junk_name_is_counted_not_cached() -> None:
    name = "n" * 1000
    before = estimator._short_tokens.cache_info().currsize
    tokens = estimate_chat("gpt-4o", [{"role": "user", "name": name, "content": ""}])
    assert tokens == 3 + 3 + 1 + 1 + count_text("gpt-4o", name)
    assert estimator._short_tokens.cache_info().currsize <= before + 1  # "user" at most


class _ThreadSpy:
    def __init__(self) -> None:
        self.calls = 0
        self._real = asyncio.to_thread

    async def __call__(self, func: Any, /, *args: Any) -> Any:
        self.calls += 1
        return await self._real(func, *args)


@pytest.fixture
def to_thread(monkeypatch: pytest.MonkeyPatch) -> _ThreadSpy:
    spy = _ThreadSpy()
    monkeypatch.setattr(estimator.asyncio, "to_thread", spy)
    return spy


async def test_async_variants_equal_sync_and_stay_on_loop_when_small(
    to_thread: _ThreadSpy,
) -> None:
    assert await estimate_chat_async("gpt-4", COOKBOOK_MESSAGES) == 129
    assert await estimate_chat_async("gpt-4o", TOOL_CONVERSATION, TOOLS) == 97
    assert await estimate_input_async("text-embedding-3-small", ["Hello world", [1, 2]]) == 4
    assert await estimate_anthropic_async("claude", "You are a helpful assistant.", []) == 9
    assert await count_texts_async("gpt-4o", ["Hello", " world"]) == 2
    assert to_thread.calls == 0


async def test_async_variants_encode_large_text_in_a_thread(to_thread: _ThreadSpy) -> None:
    big = "Hello world " * 1000  # 12000 chars > LARGE_TEXT_CHARS; 2001 tokens
    assert len(big) > estimator.LARGE_TEXT_CHARS
    messages = [{"role": "user", "content": big}]
    assert estimate_chat("gpt-4o", messages) == 2008
    assert await estimate_chat_async("gpt-4o", messages) == 2008
    assert await estimate_input_async("gpt-4o", [big]) == 2001
    assert await estimate_anthropic_async("claude", None, messages) == 3 + 3 + 2001
    assert await count_texts_async("gpt-4o", [big, "Hello"]) == 2002
    assert to_thread.calls == 4


async def test_many_short_parts_also_go_to_a_thread(to_thread: _ThreadSpy) -> None:
    deltas = ["Hello"] * 500  # 2500 chars, but 500 encode calls
    assert await count_texts_async("gpt-4o", deltas) == 500
    assert to_thread.calls == 1


def test_constants() -> None:
    assert estimator.TOKENS_PER_MESSAGE == 3
    assert estimator.TOKENS_PER_NAME == 1
    assert estimator.REPLY_PRIMING_TOKENS == 3
    assert estimator.TOKENS_PER_TOOL_CALL == 3
