"""The gateway's prompt estimator against the mock upstream's counting.

Two independent implementations of OpenAI's counting rules (the mock is our stand-in
for the provider's truth): they must agree on every shape of request, for both
encodings, so an estimated usage row is as close to billing as counting can make it.
"""

from __future__ import annotations

from typing import Any

import pytest

from ext_proc.mock import counting as mock
from ext_proc.tokens import estimator

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4", "gpt-3.5-turbo", "unknown-model", None]

CHATS: list[tuple[list[dict[str, Any]], Any]] = [
    ([{"role": "user", "content": "Hello, world"}], None),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Explain GCRA in one line.", "name": "alice"},
            {"role": "assistant", "content": "A leaky bucket with one timestamp."},
        ],
        None,
    ),
    (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://x/z.png"}},
                ],
            }
        ],
        None,
    ),
    (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
        ],
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather now",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    ),
    ([{"role": "user", "content": "<|endoftext|> unicode: héllo 世界 🚀 " * 20}], None),
]

INPUTS: list[Any] = ["one string", ["two", "strings here"], [1, 2, 3, 4], [[5, 6], [7]], ""]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("messages", "tools"), CHATS)
def test_chat_estimate_equals_mock_count(
    model: str | None, messages: list[dict[str, Any]], tools: Any
) -> None:
    assert estimator.estimate_chat(model, messages, tools) == mock.chat_prompt_tokens(
        model, messages, tools
    )


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("value", INPUTS)
def test_input_estimate_equals_mock_count(model: str | None, value: Any) -> None:
    assert estimator.estimate_input(model, value) == mock.prompt_tokens(model, value)


def test_anthropic_estimate_equals_mock_count() -> None:
    system = [{"type": "text", "text": "Be brief."}]
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "Count to three."},
    ]
    assert estimator.estimate_anthropic("claude-sonnet-4", system, messages) == (
        mock.anthropic_input_tokens(system, messages)
    )


def test_completion_text_counts_agree() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 7
    for model in MODELS:
        assert estimator.count_text(model, text) == mock.text_tokens(model, text)
