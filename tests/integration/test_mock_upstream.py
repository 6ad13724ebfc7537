"""The mock LLM upstream, driven by the official openai and anthropic SDKs.

The mock is the ground truth for the gateway's tests, so these tests pin what it
answers: response and stream shapes the SDKs accept, token counts checked against
numbers computed once by hand with tiktoken, knobs, and the introspection endpoint.
No Postgres or Redis needed.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from ext_proc.mock import MockOptions, MockUpstream
from ext_proc.mock.counting import anthropic_input_tokens, chat_prompt_tokens, prompt_tokens
from ext_proc.tokens.encodings import encoding_for_model

HELLO = [{"role": "user", "content": "Hello, world"}]
# Computed once by hand with tiktoken (o200k_base): 3 priming + 3 per message
# + tokens("user") 1 + tokens("Hello, world") 3.
HELLO_GPT4O_PROMPT = 10
# "This is a mock response from gpt-4o." in o200k_base.
DEFAULT_GPT4O_COMPLETION = 12
DEFAULT_GPT4O_TEXT = "This is a mock response from gpt-4o."

# A gpt-4-turbo (cl100k_base) conversation with a system prompt, a name, an assistant
# tool call, a tool result and a tools list: 83 tokens by the cookbook rules, by hand,
# plus the call id "call_1" twice (3 tokens each: the assistant's call and the tool
# message's tool_call_id are part of the prompt the model reads).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "alice", "content": "Weather in Paris?"},
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
    {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
]
TOOL_CONVERSATION_PROMPT = 83 + 2 * 3
DEFAULT_GPT4_TURBO_COMPLETION = 14  # "This is a mock response from gpt-4-turbo." (cl100k)


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Raw:
    """One HTTP/1.1 request on a fresh connection, bytes as they came (chunks joined)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    head = f"{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    head += f"content-length: {len(payload)}\r\n\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    got = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    if got.get("transfer-encoding") == "chunked":
        data = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            data += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    else:
        data = await reader.readexactly(int(got["content-length"]))
    writer.close()
    return Raw(status, got, data)


def sse_payloads(body: bytes) -> list[str]:
    """The ``data:`` lines of an OpenAI-style event stream, in order."""
    events = body.decode().split("\n\n")
    assert events[-1] == "", "stream must end with a blank line"
    out = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        out.append(event[len("data: ") :])
    return out


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream(MockOptions())
    await upstream.start("127.0.0.1", 0)
    yield upstream
    await upstream.close()


def port_of(mock: MockUpstream) -> int:
    assert mock.port is not None
    return mock.port


@pytest.fixture
async def client(mock: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port_of(mock)}/v1", api_key="sk-test", max_retries=0
    )
    yield sdk
    await sdk.close()


@pytest.fixture
async def claude(mock: MockUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{port_of(mock)}", api_key="sk-ant-test", max_retries=0
    )
    yield sdk
    await sdk.close()


# --- chat completions ---


async def test_chat_completion_shape_and_usage(client: openai.AsyncOpenAI) -> None:
    response = await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == "gpt-4o"
    assert response.created > 0
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == DEFAULT_GPT4O_TEXT
    assert choice.finish_reason == "stop"
    usage = response.usage
    assert usage is not None
    assert usage.prompt_tokens == HELLO_GPT4O_PROMPT
    assert usage.completion_tokens == DEFAULT_GPT4O_COMPLETION
    assert usage.total_tokens == HELLO_GPT4O_PROMPT + DEFAULT_GPT4O_COMPLETION
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


async def test_chat_counts_names_tool_calls_and_tools(client: openai.AsyncOpenAI) -> None:
    response = await client.chat.completions.create(
        model="gpt-4-turbo",
        messages=TOOL_CONVERSATION,
        tools=TOOLS,
    )
    assert response.usage is not None
    assert response.usage.prompt_tokens == TOOL_CONVERSATION_PROMPT
    assert response.usage.completion_tokens == DEFAULT_GPT4_TURBO_COMPLETION
    assert chat_prompt_tokens("gpt-4-turbo", TOOL_CONVERSATION, TOOLS) == TOOL_CONVERSATION_PROMPT


async def test_chat_counts_image_parts(client: openai.AsyncOpenAI) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
            ],
        }
    ]
    response = await client.chat.completions.create(model="gpt-4o", messages=messages)
    assert response.usage is not None
    # 3 + 3 + tokens("user") 1 + tokens("What is this?") 4 + 85 (low) + 765 (high).
    assert response.usage.prompt_tokens == 861


async def test_chat_stream_without_usage(mock: MockUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *contents, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    # One token per chunk, as OpenAI streams.
    assert len(contents) == DEFAULT_GPT4O_COMPLETION
    assert "".join(c.choices[0].delta.content or "" for c in contents) == DEFAULT_GPT4O_TEXT
    assert all(c.choices[0].finish_reason is None for c in contents)
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)

    # On the wire: no "usage" key at all, and the [DONE] sentinel last.
    raw = await raw_request(
        port_of(mock),
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": HELLO, "stream": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(raw.body)
    assert payloads[-1] == "[DONE]"
    assert all("usage" not in orjson.loads(p) for p in payloads[:-1])
    assert len(payloads) == 1 + DEFAULT_GPT4O_COMPLETION + 1 + 1


async def test_chat_stream_with_include_usage(
    mock: MockUpstream, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *rest, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == HELLO_GPT4O_PROMPT
    assert usage_chunk.usage.prompt_tokens == chat_prompt_tokens("gpt-4o", HELLO)
    assert usage_chunk.usage.completion_tokens == DEFAULT_GPT4O_COMPLETION
    assert usage_chunk.usage.total_tokens == HELLO_GPT4O_PROMPT + DEFAULT_GPT4O_COMPLETION
    assert rest[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in rest)
    assert len(encoding_for_model("gpt-4o").encode(text)) == usage_chunk.usage.completion_tokens

    raw = await raw_request(
        port_of(mock),
        "POST",
        "/v1/chat/completions",
        {
            "model": "gpt-4o",
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = sse_payloads(raw.body)
    assert payloads[-1] == "[DONE]"
    events = [orjson.loads(p) for p in payloads[:-1]]
    # OpenAI puts "usage": null on every chunk before the usage chunk.
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] == 22


async def test_chat_stream_chunks_knob(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        stream=True,
        extra_headers={"x-mock-chunks": "3", "x-mock-completion-tokens": "10"},
    )
    chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(contents) == 3
    assert len(encoding_for_model("gpt-4o").encode("".join(c or "" for c in contents))) == 10


async def test_timing_knobs_keep_the_content(client: openai.AsyncOpenAI) -> None:
    # Timings are measured in benchmarks; here only that delayed answers stay whole.
    knobs = {"x-mock-latency-ms": "5", "x-mock-ttft-ms": "5", "x-mock-chunk-delay-ms": "2"}
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        stream=True,
        extra_headers=knobs,
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_GPT4O_TEXT
    plain = await client.chat.completions.create(
        model="gpt-4o", messages=HELLO, extra_headers=knobs
    )
    assert plain.choices[0].message.content == DEFAULT_GPT4O_TEXT


async def test_completion_tokens_knob_is_exact(client: openai.AsyncOpenAI) -> None:
    for model in ("gpt-4o", "gpt-4"):
        response = await client.chat.completions.create(
            model=model,
            messages=HELLO,
            extra_headers={"x-mock-completion-tokens": "250"},
        )
        assert response.usage is not None
        assert response.usage.completion_tokens == 250
        content = response.choices[0].message.content or ""
        assert len(encoding_for_model(model).encode(content)) == 250
        assert response.choices[0].finish_reason == "stop"


async def test_max_tokens_cut_the_completion(client: openai.AsyncOpenAI) -> None:
    response = await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=3)
    assert response.choices[0].message.content == "This is a"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 3

    capped = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        max_completion_tokens=20,
        extra_headers={"x-mock-completion-tokens": "50"},
    )
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 20


async def test_usage_detail_knobs(client: openai.AsyncOpenAI) -> None:
    response = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        extra_headers={"x-mock-cached-tokens": "7", "x-mock-reasoning-tokens": "5"},
    )
    usage = response.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    # Reasoning tokens are inside completion_tokens, as OpenAI reports them.
    assert usage.completion_tokens == DEFAULT_GPT4O_COMPLETION + 5
    assert usage.total_tokens == HELLO_GPT4O_PROMPT + DEFAULT_GPT4O_COMPLETION + 5


# --- errors and failures ---


async def test_status_knob_raises_the_sdk_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            extra_headers={"x-mock-status": "429"},
        )
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.code == "rate_limit_exceeded"
    body = limited.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "code", "param"}

    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            stream=True,
            extra_headers={"x-mock-status": "500"},
        )
    assert failed.value.status_code == 500

    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(
            model="text-embedding-3-small", input="x", extra_headers={"x-mock-status": "400"}
        )


async def test_bad_knob_and_bad_body_get_400(mock: MockUpstream) -> None:
    raw = await raw_request(
        port_of(mock),
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": HELLO},
        {"x-mock-latency-ms": "soon"},
    )
    assert raw.status == 400
    assert "x-mock-latency-ms" in raw.json()["error"]["message"]

    raw = await raw_request(port_of(mock), "POST", "/v1/chat/completions", b"{not json")
    assert raw.status == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"

    raw = await raw_request(port_of(mock), "POST", "/v1/chat/completions", {"model": "gpt-4o"})
    assert raw.status == 400
    assert raw.json()["error"]["param"] == "messages"


async def test_unknown_path_gets_openai_404(mock: MockUpstream) -> None:
    raw = await raw_request(port_of(mock), "POST", "/v1/nothing-here", {})
    assert raw.status == 404
    error = raw.json()["error"]
    assert error["message"] == "Invalid URL (POST /v1/nothing-here)"
    assert set(error) == {"message", "type", "code", "param"}


async def test_cut_after_makes_the_sdk_stream_raise(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-cut-after": "3"},
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)  # noqa: PERF401 (keep what came before the error)
    # The role chunk and three content chunks; no finish chunk, no usage.
    assert len(received) == 4
    assert all(c.choices[0].finish_reason is None for c in received)
    assert all(c.usage is None for c in received)


async def test_cut_after_on_a_plain_request(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            extra_headers={"x-mock-cut-after": "0"},
        )


# --- legacy completions, embeddings, models ---


async def test_legacy_completions(client: openai.AsyncOpenAI) -> None:
    model = "gpt-3.5-turbo-instruct"
    response = await client.completions.create(model=model, prompt="Say this is a test")
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.choices[0].text == f"This is a mock response from {model}."
    assert response.usage is not None
    assert response.usage.prompt_tokens == 5  # "Say this is a test" in cl100k_base
    assert response.usage.completion_tokens == 18

    listed = await client.completions.create(model=model, prompt=["Say this is a test", "hi"])
    assert listed.usage is not None
    assert listed.usage.prompt_tokens == 5 + 1
    assert prompt_tokens(model, ["Say this is a test", "hi"]) == 6

    stream = await client.completions.create(
        model=model, prompt=[1, 2, 3], stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == response.choices[0].text


async def test_embeddings_float_and_base64_agree(client: openai.AsyncOpenAI) -> None:
    texts = ["hello world", "The quick brown fox"]
    as_float = await client.embeddings.create(
        model="text-embedding-3-small", input=texts, encoding_format="float"
    )
    # The SDK asks for base64 by default and decodes it.
    as_base64 = await client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert [d.index for d in as_float.data] == [0, 1]
    for a, b in zip(as_float.data, as_base64.data, strict=True):
        assert len(a.embedding) == 8
        assert a.embedding == b.embedding
        assert math.isclose(math.sqrt(sum(v * v for v in a.embedding)), 1.0, rel_tol=1e-5)
    assert as_float.data[0].embedding != as_float.data[1].embedding
    assert as_float.usage.prompt_tokens == 2 + 4  # cl100k_base
    assert as_float.usage.total_tokens == 6

    again = await client.embeddings.create(
        model="text-embedding-3-small", input="hello world", dimensions=16, encoding_format="float"
    )
    assert len(again.data[0].embedding) == 16
    tokens = await client.embeddings.create(
        model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]], encoding_format="float"
    )
    assert tokens.usage.prompt_tokens == 5


async def test_embeddings_base64_is_little_endian_float32(mock: MockUpstream) -> None:
    body = {"model": "text-embedding-3-small", "input": "abc", "encoding_format": "base64"}
    encoded = (await raw_request(port_of(mock), "POST", "/v1/embeddings", body)).json()
    body["encoding_format"] = "float"
    plain = (await raw_request(port_of(mock), "POST", "/v1/embeddings", body)).json()
    vector = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert list(vector) == plain["data"][0]["embedding"]


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert "gpt-4o" in ids
    assert "text-embedding-3-small" in ids


# --- Azure OpenAI ---


async def test_azure_sdk_chat_and_embeddings(mock: MockUpstream) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{port_of(mock)}",
        api_version="2024-10-21",
        api_key="azure-key",
        max_retries=0,
    )
    try:
        response = await azure.chat.completions.create(model="gpt-4o-prod", messages=HELLO)
        assert response.model == "gpt-4o-prod"
        assert response.usage is not None
        assert response.usage.prompt_tokens == HELLO_GPT4O_PROMPT  # gpt-4o* -> o200k_base
        embedded = await azure.embeddings.create(model="emb-prod", input="hello world")
        assert len(embedded.data[0].embedding) == 8
        with pytest.raises(openai.RateLimitError):
            await azure.chat.completions.create(
                model="gpt-4o-prod",
                messages=HELLO,
                extra_headers={"x-mock-status": "429"},
            )
    finally:
        await azure.close()
    seen = [r for r in mock.received if r.path.startswith("/openai/deployments/")]
    assert seen[0].path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen[0].query == "api-version=2024-10-21"
    assert seen[0].headers["api-key"] == "azure-key"


async def test_azure_model_defaults_to_deployment_and_needs_api_version(
    mock: MockUpstream,
) -> None:
    path = "/openai/deployments/my-dep/chat/completions"
    raw = await raw_request(
        port_of(mock), "POST", path + "?api-version=2024-10-21", {"messages": HELLO}
    )
    assert raw.status == 200
    assert raw.json()["model"] == "my-dep"

    missing = await raw_request(port_of(mock), "POST", path, {"messages": HELLO})
    assert missing.status == 400
    assert missing.json()["error"]["code"] == "MissingApiVersionParameter"


# --- Anthropic ---

ANTHROPIC_SYSTEM = "Be brief."
ANTHROPIC_MESSAGES = [
    {"role": "user", "content": "Hello, Claude"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
    {"role": "user", "content": "How are you?"},
]
# 3 + tokens("Be brief.") 3 + (3 + 3) + (3 + 2) + (3 + 4), o200k_base, by hand.
ANTHROPIC_INPUT = 24
ANTHROPIC_MODEL = "claude-test"
ANTHROPIC_OUTPUT = 10  # "This is a mock response from claude-test."


async def test_anthropic_message(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        system=ANTHROPIC_SYSTEM,
        messages=ANTHROPIC_MESSAGES,
    )
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == ANTHROPIC_MODEL
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == f"This is a mock response from {ANTHROPIC_MODEL}."
    assert message.usage.input_tokens == ANTHROPIC_INPUT
    assert anthropic_input_tokens(ANTHROPIC_SYSTEM, ANTHROPIC_MESSAGES) == ANTHROPIC_INPUT
    assert message.usage.output_tokens == ANTHROPIC_OUTPUT
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0


async def test_anthropic_stream(mock: MockUpstream, claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        system=ANTHROPIC_SYSTEM,
        messages=ANTHROPIC_MESSAGES,
        extra_headers={"x-mock-cached-tokens": "4"},
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(texts) == ANTHROPIC_OUTPUT
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == ANTHROPIC_OUTPUT
    # Cache reads are not part of input_tokens in Anthropic's usage.
    assert final.usage.input_tokens == ANTHROPIC_INPUT - 4
    assert final.usage.cache_read_input_tokens == 4

    raw = await raw_request(
        port_of(mock),
        "POST",
        "/v1/messages",
        {
            "model": ANTHROPIC_MODEL,
            "max_tokens": 100,
            "messages": ANTHROPIC_MESSAGES,
            "stream": True,
        },
        {"x-mock-chunks": "2"},
    )
    events = []
    for block in raw.body.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = orjson.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append(data)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == ANTHROPIC_INPUT - 3  # no system
    assert events[0]["message"]["usage"]["output_tokens"] == 1
    assert events[6]["usage"]["output_tokens"] == ANTHROPIC_OUTPUT
    assert events[6]["delta"]["stop_reason"] == "end_turn"


async def test_anthropic_max_tokens(mock: MockUpstream, claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=4,
        messages=ANTHROPIC_MESSAGES,
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4

    raw = await raw_request(
        port_of(mock),
        "POST",
        "/v1/messages",
        {"model": ANTHROPIC_MODEL, "messages": ANTHROPIC_MESSAGES},
    )
    assert raw.status == 400
    assert raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in raw.json()["error"]["message"]


async def test_anthropic_errors_and_cut(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANTHROPIC_MESSAGES,
            extra_headers={"x-mock-status": "429"},
        )
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "mock upstream error (x-mock-status: 429)",
        },
    }
    with pytest.raises(anthropic.InternalServerError):
        await claude.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=10,
            messages=ANTHROPIC_MESSAGES,
            extra_headers={"x-mock-status": "500"},
        )
    texts: list[str] = []
    # The anthropic SDK lets the transport's error through while streaming.
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        async with claude.messages.stream(
            model=ANTHROPIC_MODEL,
            max_tokens=50,
            messages=ANTHROPIC_MESSAGES,
            extra_headers={"x-mock-cut-after": "2"},
        ) as stream:
            async for text in stream.text_stream:
                texts.append(text)  # noqa: PERF401 (keep what came before the error)
    assert len(texts) == 2


# --- introspection ---


async def test_introspection_endpoint(mock: MockUpstream) -> None:
    port = port_of(mock)
    for key in ("k1", "k2", "k1"):
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        await sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
        await sdk.close()

    everything = (await raw_request(port, "GET", "/_mock/requests")).json()
    assert len(everything) == 3
    assert [r["headers"]["authorization"] for r in everything] == [
        "Bearer k1",
        "Bearer k2",
        "Bearer k1",
    ]
    assert everything[0]["method"] == "POST"
    assert everything[0]["path"] == "/v1/chat/completions"
    assert orjson.loads(everything[0]["body"])["messages"] == HELLO

    only_k1 = (
        await raw_request(port, "GET", "/_mock/requests?header=Authorization:Bearer%20k1")
    ).json()
    assert len(only_k1) == 2
    last = (await raw_request(port, "GET", "/_mock/requests?limit=1")).json()
    assert last[0]["headers"]["authorization"] == "Bearer k1"
    assert mock.received[-1].headers["authorization"] == "Bearer k1"
    assert mock.received[-1].json()["model"] == "gpt-4o"

    cleared = await raw_request(port, "DELETE", "/_mock/requests")
    assert cleared.json() == {"cleared": 3}
    assert (await raw_request(port, "GET", "/_mock/requests")).json() == []
    assert len(mock.received) == 0


async def test_healthz(mock: MockUpstream) -> None:
    raw = await raw_request(port_of(mock), "GET", "/healthz")
    assert raw.status == 200
    assert len(mock.received) == 0  # probes are not recorded


async def test_history_is_bounded() -> None:
    upstream = MockUpstream(MockOptions(history=2))
    port = await upstream.start("127.0.0.1", 0)
    try:
        for i in range(3):
            await raw_request(port, "GET", f"/v1/models?i={i}")
        assert [r.query for r in upstream.received] == ["i=1", "i=2"]
    finally:
        await upstream.close()


async def test_options_are_the_defaults_for_requests_without_headers() -> None:
    upstream = MockUpstream(MockOptions(completion_tokens=7, chunks=2))
    port = await upstream.start("127.0.0.1", 0)
    try:
        raw = await raw_request(
            port,
            "POST",
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": HELLO, "stream": True},
        )
        events = [orjson.loads(p) for p in sse_payloads(raw.body)[:-1]]
        assert len(events) == 1 + 2 + 1
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert len(encoding_for_model("gpt-4o").encode(text)) == 7
    finally:
        await upstream.close()


# --- command line ---


async def test_run_prints_its_address_and_stops_on_sigterm() -> None:
    code = (
        "import argparse, sys\n"
        "from ext_proc.mock import add_arguments, options_from_args, run\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "ns = p.parse_args(sys.argv[1:])\n"
        "run(ns.host, ns.port, options_from_args(ns))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--port",
        "0",
        "--completion-tokens",
        "5",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        raw = await raw_request(
            port, "POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO}
        )
        assert raw.json()["usage"]["completion_tokens"] == 5
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
