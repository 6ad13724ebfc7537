"""The provider zoo end to end: each quirk of a real provider, sent through a real Envoy
+ ext_proc with the official SDKs, and the usage row it must produce.

The rules every row follows (DESIGN.md "Usage records"):
- exactly one row per request, found by the ``x-request-id`` the app received;
- usage reported by the provider -> its numbers exactly, ``tokens_estimated = false``,
  ``response_model`` = the provider's ``model``, cached / reasoning / cache-creation kept
  (Anthropic: prompt = input + cache reads + cache writes);
- no usage -> prompt = the gateway's own estimate (``estimated_prompt_tokens``),
  completion = tiktoken count of what the app received, ``tokens_estimated = true``;
  never "0 tokens, exact" for work the provider did;
- reached the provider but no usage came back (timeout, cut body, cancel) -> the
  estimate, what was delivered (0 if nothing), ``tokens_estimated = true``;
- Anthropic's ``message_start`` ``output_tokens: 1`` is a placeholder, never final;
- ``partial`` only when the app did not get the whole answer;
- ``status_code`` is what the app received.

The expected estimates are counted here with ``estimator.count_texts`` from the texts
the zoo is known to send; ``test_zoo_itself`` checks that counting them as the deltas
the zoo sends or as one text gives the same number, so the expectation does not depend
on how the gateway groups what it counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest

from ext_proc.tokens import estimator
from tests.e2e.zoo import server as z
from tests.e2e.zoo.conftest import (
    ANTHROPIC_CREDENTIAL,
    AZURE_API_VERSION,
    AZURE_CREDENTIAL,
    OPENAI_CREDENTIAL,
    ZooGateway,
)
from tests.e2e.zoo.server import ZooServer

pytestmark = pytest.mark.e2e

GPT_DEPLOYMENT = "gpt-4o-mini"  # what zoo-gpt is served as: its encoding counts
CLAUDE_DEPLOYMENT = "claude-sonnet-4-20250514"
QUESTION: list[Any] = [{"role": "user", "content": "How many animals does the zoo keep?"}]
WEATHER_TOOL: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": z.TOOL_NAME,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            },
        },
    }
]

EXACT_OPENAI: dict[str, Any] = {
    "status_code": 200,
    "decision": "allowed",
    "prompt_tokens": z.PROMPT,
    "completion_tokens": z.COMPLETION,
    "total_tokens": z.PROMPT + z.COMPLETION,
    "cached_tokens": z.CACHED,
    "reasoning_tokens": z.REASONING,
    "tokens_estimated": False,
    "partial": False,
    "response_model": z.OPENAI_MODEL,
}
EXACT_AZURE = {**EXACT_OPENAI, "response_model": z.AZURE_MODEL}
EXACT_ANTHROPIC: dict[str, Any] = {
    "status_code": 200,
    "decision": "allowed",
    "prompt_tokens": z.ANTHROPIC_PROMPT,
    "completion_tokens": z.A_OUTPUT,
    "total_tokens": z.ANTHROPIC_PROMPT + z.A_OUTPUT,
    "cached_tokens": z.A_CACHE_READ,
    "cache_creation_tokens": z.A_CACHE_CREATION,
    "tokens_estimated": False,
    "partial": False,
    "response_model": z.CLAUDE_MODEL,
}


def gpt_tokens(texts: list[str]) -> int:
    return estimator.count_texts(GPT_DEPLOYMENT, texts)


def claude_tokens(texts: list[str]) -> int:
    return estimator.count_texts(CLAUDE_DEPLOYMENT, texts)


def check_exact(row: dict[str, Any], expected: dict[str, Any]) -> None:
    got = {key: row[key] for key in expected}
    assert got == expected, f"row {row['request_id']}:\n  got      {got}\n  expected {expected}"


def check_estimated(
    row: dict[str, Any],
    completion: int,
    *,
    partial: bool,
    status: int = 200,
    reported_prompt: int | None = None,
    **more: Any,
) -> None:
    """Counted by the gateway: the prompt is the provider's count when it reported one
    (``reported_prompt``: Anthropic's ``message_start``), else the gateway's own estimate;
    the completion is what the app received."""
    estimate = row["estimated_prompt_tokens"]
    assert isinstance(estimate, int) and estimate > 0, (
        f"row {row['request_id']}: no prompt estimate ({estimate!r})"
    )
    prompt = estimate if reported_prompt is None else reported_prompt
    expected = {
        "status_code": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "tokens_estimated": True,
        "partial": partial,
        **more,
    }
    got = {key: row[key] for key in expected}
    assert got == expected, (
        f"row {row['request_id']} (estimate {estimate}):\n  got      {got}\n  expected {expected}"
    )


# ------------------------------------------------------------------ the zoo on its own


async def test_zoo_itself(zoo: ZooServer) -> None:
    """The zoo sends what it claims, hit directly (no gateway) with httpx."""
    url = zoo.url
    chat = f"{url}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": QUESTION}
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=10) as client:
        for case, encoding in (("json-gzip", "gzip"), ("json-deflate", "deflate")):
            r = await client.post(chat, json=body, headers={"x-zoo": case})
            assert r.headers["content-encoding"] == encoding
            assert r.json()["usage"] == z.OPENAI_USAGE
            assert r.json()["choices"][0]["message"]["content"] == z.TEXT
        r = await client.post(chat, json=body, headers={"x-zoo": "json-no-ct"})
        assert "content-type" not in r.headers and r.json()["model"] == z.OPENAI_MODEL
        r = await client.post(chat, json=body, headers={"x-zoo": "json-capital"})
        assert r.headers["content-type"] == "Application/JSON"
        r = await client.post(chat, json=body, headers={"x-zoo": "json-chunked"})
        assert r.headers["transfer-encoding"] == "chunked" and r.json()["usage"] == z.OPENAI_USAGE
        r = await client.post(chat, json=body, headers={"x-zoo": "json-no-usage-tools"})
        message = r.json()["choices"][0]["message"]
        assert "usage" not in r.json() and message["content"] is None
        assert message["tool_calls"][0]["function"] == {
            "name": z.TOOL_NAME,
            "arguments": z.TOOL_ARGS,
        }

        # CRLF framing, and usage only when asked for (like OpenAI).
        r = await client.post(chat, json=stream_body, headers={"x-zoo": "sse-crlf"})
        assert b"\r\n\r\n" in r.content and b"\n\n" not in r.content.replace(b"\r\n", b"")
        r = await client.post(chat, json={**body, "stream": True}, headers={"x-zoo": "sse-capital"})
        assert r.headers["content-type"] == "Text/Event-Stream" and b'"usage"' not in r.content

        # A 4-byte character arrives in two pieces; the whole stream is still UTF-8.
        raw: list[bytes] = []
        async with client.stream(
            "POST", chat, json=stream_body, headers={"x-zoo": "sse-split-utf8"}
        ) as r:
            raw = [piece async for piece in r.aiter_raw()]
        whole = b"".join(raw)
        assert z.SPLIT_CHAR.encode() in whole and whole.decode() and _split_mid_char(raw)
        events = [
            json.loads(line[6:]) for line in whole.split(b"\n") if line.startswith(b"data: {")
        ]
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
        assert text == z.TEXT_UTF8 and events[-1]["usage"] == z.OPENAI_USAGE

        # Azure's first chunk.
        r = await client.post(
            f"{url}/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
            json=stream_body,
            headers={"x-zoo": "azure-sse"},
        )
        first = json.loads(r.content.split(b"\n\n")[0][6:])
        assert first["choices"] == [] and first["model"] == "" and first["prompt_filter_results"]

        # Anthropic: the placeholder in message_start, the real count in message_delta.
        messages = f"{url}/v1/messages"
        a_body = {
            "model": CLAUDE_DEPLOYMENT,
            "max_tokens": 64,
            "messages": QUESTION,
            "stream": True,
        }
        r = await client.post(messages, json=a_body, headers={"x-zoo": "anthropic-sse"})
        names = [line[7:] for line in r.text.split("\n") if line.startswith("event: ")]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        start = json.loads(r.text.split("\n")[1][6:])
        assert start["message"]["usage"]["output_tokens"] == 1

        # Cuts: the body ends early and the connection closes.
        for where, case, payload in (
            (chat, "json-cut", body),
            (chat, "sse-cut", stream_body),
            (messages, "anthropic-sse-cut", a_body),
        ):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(where, json=payload, headers={"x-zoo": case})

        # Wrong path and unknown case are the zoo's own errors, never a silent answer.
        r = await client.post(messages, json=a_body, headers={"x-zoo": "json-plain"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "zoo_wrong_path"
        r = await client.post(chat, json=body, headers={"x-zoo": "no-such-case"})
        assert r.status_code == 400

    recorded = [r for r in zoo.received if r.case == "json-gzip"]
    assert recorded and recorded[-1].json()["messages"] == QUESTION

    # Counting the zoo's texts delta by delta or whole gives the same number, so the
    # expected estimates below hold however the gateway groups what it counts.
    for text in (z.TEXT, z.TEXT_2, z.TEXT_UTF8, " ".join(z.pieces(z.TEXT)[: z.CUT_AFTER])):
        assert gpt_tokens(z.pieces(text)) == gpt_tokens([text])
        assert claude_tokens(z.pieces(text)) == claude_tokens([text])
    assert gpt_tokens([z.TOOL_NAME, *z.TOOL_ARG_PIECES]) == gpt_tokens([z.TOOL_NAME, z.TOOL_ARGS])


def _split_mid_char(pieces: list[bytes]) -> bool:
    """Some piece (as read off the connection) ends inside a UTF-8 character."""
    joined = b""
    for piece in pieces[:-1]:
        joined += piece
        try:
            joined.decode()
        except UnicodeDecodeError:
            return True
    return False


# ---------------------------------------------------------- JSON with usage: exact


@pytest.mark.parametrize(
    "case",
    [
        "json-plain",
        "json-charset",
        "json-capital",
        "json-no-ct",
        "json-gzip",
        "json-br",
        "json-deflate",
        "json-chunked",
        "json-large",
    ],
)
async def test_openai_json_with_usage_is_exact(zoo_gw: ZooGateway, marker: str, case: str) -> None:
    if case == "json-br" and z.brotli is None:
        pytest.skip("the brotli package is not installed: the zoo cannot compress br")
    raw = await zoo_gw.openai(case, marker).chat.completions.with_raw_response.create(
        model="zoo-gpt", messages=QUESTION
    )
    answer = json.loads(raw.content)  # the SDK parses only content types ending in "json"
    expected_text = z.LARGE_TEXT if case == "json-large" else z.TEXT
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert answer["usage"] == z.OPENAI_USAGE
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    check_exact(await zoo_gw.row(raw.headers["x-request-id"]), EXACT_OPENAI)


async def test_embeddings_usage_is_exact(zoo_gw: ZooGateway, marker: str) -> None:
    raw = await zoo_gw.openai("embeddings", marker).embeddings.with_raw_response.create(
        model="zoo-embed", input="zebras and otters"
    )
    assert len(raw.parse().data[0].embedding) == 4
    seen = zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    assert seen.path == "/v1/embeddings" and seen.json()["model"] == "text-embedding-3-small"
    check_exact(
        await zoo_gw.row(raw.headers["x-request-id"]),
        {
            "status_code": 200,
            "prompt_tokens": z.PROMPT,
            "completion_tokens": 0,
            "total_tokens": z.PROMPT,
            "tokens_estimated": False,
            "response_model": z.EMBEDDING_MODEL,
        },
    )


async def test_azure_json_with_filter_results_is_exact(zoo_gw: ZooGateway, marker: str) -> None:
    raw = await zoo_gw.azure("azure-json", marker).chat.completions.with_raw_response.create(
        model="zoo-az", messages=QUESTION
    )
    assert raw.parse().choices[0].message.content == z.TEXT
    seen = zoo_gw.upstream(marker, AZURE_CREDENTIAL)
    assert seen.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen.query["api-version"] == AZURE_API_VERSION
    check_exact(await zoo_gw.row(raw.headers["x-request-id"]), EXACT_AZURE)


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
async def test_anthropic_json_with_cache_usage_is_exact(
    zoo_gw: ZooGateway, marker: str, sdk: str
) -> None:
    if sdk == "anthropic":
        araw = await zoo_gw.anthropic("anthropic-json", marker).messages.with_raw_response.create(
            model="zoo-sonnet", max_tokens=64, messages=QUESTION
        )
        message = await araw.parse()
        assert message.content[0].type == "text" and message.content[0].text == z.TEXT
        request_id = araw.headers["x-request-id"]
    else:
        oraw = await zoo_gw.openai(
            "anthropic-json", marker
        ).chat.completions.with_raw_response.create(
            model="zoo-sonnet", messages=QUESTION, max_tokens=64
        )
        assert oraw.parse().choices[0].message.content == z.TEXT
        request_id = oraw.headers["x-request-id"]
    seen = zoo_gw.upstream(marker, ANTHROPIC_CREDENTIAL)
    assert seen.path == "/v1/messages" and seen.json()["model"] == CLAUDE_DEPLOYMENT
    check_exact(await zoo_gw.row(request_id), EXACT_ANTHROPIC)


# ------------------------------------------------------- JSON without usage: estimated


@pytest.mark.parametrize(
    ("case", "texts", "options"),
    [
        ("json-no-usage", [z.TEXT], {}),
        ("json-no-usage-tools", [z.TOOL_NAME, z.TOOL_ARGS], {"tools": WEATHER_TOOL}),
        ("json-no-usage-n2", [z.TEXT, z.TEXT_2], {"n": 2}),
    ],
)
async def test_openai_json_without_usage_is_counted(
    zoo_gw: ZooGateway, marker: str, case: str, texts: list[str], options: dict[str, Any]
) -> None:
    raw = await zoo_gw.openai(case, marker).chat.completions.with_raw_response.create(
        model="zoo-gpt", messages=QUESTION, **options
    )
    completion = raw.parse()
    delivered: list[str] = []
    for choice in completion.choices:
        delivered += [choice.message.content] if choice.message.content else []
        for call in choice.message.tool_calls or []:
            assert call.type == "function"
            delivered += [call.function.name, call.function.arguments]
    assert delivered == texts
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    row = await zoo_gw.row(raw.headers["x-request-id"])
    check_estimated(row, gpt_tokens(texts), partial=False)


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
async def test_anthropic_json_without_usage_is_counted(
    zoo_gw: ZooGateway, marker: str, sdk: str
) -> None:
    case = "anthropic-json-no-usage"
    if sdk == "anthropic":
        araw = await zoo_gw.anthropic(case, marker).messages.with_raw_response.create(
            model="zoo-sonnet", max_tokens=64, messages=QUESTION
        )
        assert json.loads(await araw.read())["content"][0]["text"] == z.TEXT
        request_id = araw.headers["x-request-id"]
    else:
        oraw = await zoo_gw.openai(case, marker).chat.completions.with_raw_response.create(
            model="zoo-sonnet", messages=QUESTION, max_tokens=64
        )
        assert oraw.parse().choices[0].message.content == z.TEXT
        request_id = oraw.headers["x-request-id"]
    zoo_gw.upstream(marker, ANTHROPIC_CREDENTIAL)
    check_estimated(await zoo_gw.row(request_id), claude_tokens([z.TEXT]), partial=False)


# --------------------------------------------------------------------- OpenAI streams


@dataclass
class Streamed:
    request_id: str = ""
    status: int = 0
    texts: dict[int, str] = field(default_factory=dict)  # per choice index
    tool_name: str = ""
    tool_args: str = ""
    deltas: int = 0  # content deltas received
    usage: Any = None
    error: BaseException | None = None


async def openai_stream(
    client: openai.AsyncOpenAI | openai.AsyncAzureOpenAI,
    model: str,
    *,
    stop_after: int | None = None,
    **options: Any,
) -> Streamed:
    """Stream a chat completion with the SDK; read it to the end, to a connection
    error, or (``stop_after``) close it after that many content deltas."""
    got = Streamed()
    async with client.chat.completions.with_streaming_response.create(
        model=model, messages=QUESTION, stream=True, **options
    ) as response:
        got.request_id = response.headers.get("x-request-id", "")
        got.status = response.status_code
        stream = await response.parse()
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    got.usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        got.texts[choice.index] = got.texts.get(choice.index, "") + delta.content
                        got.deltas += 1
                    for call in delta.tool_calls or []:
                        if call.function is not None:
                            got.tool_name += call.function.name or ""
                            got.tool_args += call.function.arguments or ""
                if stop_after is not None and got.deltas >= stop_after:
                    break  # the app goes away mid-stream
        except openai.APIConnectionError as exc:
            got.error = exc
        finally:
            await stream.close()
    return got


@pytest.mark.parametrize(
    "case",
    [
        "sse-capital",
        "sse-gzip",
        "sse-no-ct",
        "sse-crlf",
        "sse-split-utf8",
        "sse-usage-early",
        "sse-n2",
        "sse-tools",
        "sse-done-linger",
    ],
)
async def test_openai_stream_with_usage_is_exact(
    zoo_gw: ZooGateway, marker: str, case: str
) -> None:
    options: dict[str, Any] = {}
    if case == "sse-n2":
        options["n"] = 2
    if case == "sse-tools":
        options["tools"] = WEATHER_TOOL
    got = await openai_stream(zoo_gw.openai(case, marker), "zoo-gpt", **options)
    assert got.error is None and got.status == 200
    if case == "sse-tools":
        assert (got.tool_name, got.tool_args) == (z.TOOL_NAME, z.TOOL_ARGS)
    elif case == "sse-n2":
        assert got.texts == {0: z.TEXT, 1: z.TEXT_2}
    else:
        assert got.texts == {0: z.TEXT_UTF8 if case == "sse-split-utf8" else z.TEXT}
    assert got.usage is not None and got.usage.prompt_tokens == z.PROMPT
    seen = zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    if case != "sse-usage-early":  # that one sends usage unasked; the others as OpenAI does
        assert z.wants_usage(seen), "the gateway did not ask for the stream's usage"
    check_exact(await zoo_gw.row(got.request_id), EXACT_OPENAI)


async def test_azure_stream_with_filter_chunks_is_exact(zoo_gw: ZooGateway, marker: str) -> None:
    got = await openai_stream(zoo_gw.azure("azure-sse", marker), "zoo-az")
    assert got.error is None and got.texts == {0: z.TEXT}
    seen = zoo_gw.upstream(marker, AZURE_CREDENTIAL)
    assert seen.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    check_exact(await zoo_gw.row(got.request_id), EXACT_AZURE)


@pytest.mark.parametrize(
    ("case", "texts"),
    [
        ("sse-no-usage", z.pieces(z.TEXT)),
        ("sse-tools-no-usage", [z.TOOL_NAME, *z.TOOL_ARG_PIECES]),
    ],
)
async def test_openai_stream_without_usage_is_counted(
    zoo_gw: ZooGateway, marker: str, case: str, texts: list[str]
) -> None:
    tools = {"tools": WEATHER_TOOL} if "tools" in case else {}
    got = await openai_stream(zoo_gw.openai(case, marker), "zoo-gpt", **tools)
    assert got.error is None and got.usage is None
    if tools:
        assert (got.tool_name, got.tool_args) == (z.TOOL_NAME, z.TOOL_ARGS)
    else:
        assert got.texts == {0: z.TEXT}
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    # The whole answer arrived: counted, but not partial.
    check_estimated(await zoo_gw.row(got.request_id), gpt_tokens(texts), partial=False)


async def test_openai_stream_cut_by_provider_counts_what_arrived(
    zoo_gw: ZooGateway, marker: str
) -> None:
    got = await openai_stream(zoo_gw.openai("sse-cut", marker), "zoo-gpt")
    delivered = z.pieces(z.TEXT)[: z.CUT_AFTER]
    assert got.error is not None, "the SDK should see the cut stream"
    assert got.texts == {0: "".join(delivered)}
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    check_estimated(await zoo_gw.row(got.request_id), gpt_tokens(delivered), partial=True)


async def test_openai_stream_cancelled_by_app_counts_what_arrived(
    zoo_gw: ZooGateway, marker: str
) -> None:
    got = await openai_stream(zoo_gw.openai("sse-hold", marker), "zoo-gpt", stop_after=z.CUT_AFTER)
    delivered = z.pieces(z.TEXT)[: z.CUT_AFTER]
    assert got.error is None and got.texts == {0: "".join(delivered)}
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    check_estimated(await zoo_gw.row(got.request_id), gpt_tokens(delivered), partial=True)


# ------------------------------------------------------------------ Anthropic streams


async def anthropic_stream(
    client: anthropic.AsyncAnthropic, *, stop_after: int | None = None
) -> Streamed:
    """Stream a message natively (raw events); read it to the end, to a connection
    error, or (``stop_after``) close it after that many text deltas."""
    got = Streamed()
    async with client.messages.with_streaming_response.create(
        model="zoo-sonnet", max_tokens=64, messages=QUESTION, stream=True
    ) as response:
        got.request_id = response.headers.get("x-request-id", "")
        got.status = response.status_code
        stream = await response.parse()
        try:
            async for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    got.texts[0] = got.texts.get(0, "") + event.delta.text
                    got.deltas += 1
                elif event.type == "message_delta":
                    got.usage = event.usage
                if stop_after is not None and got.deltas >= stop_after:
                    break
        except anthropic.APIConnectionError as exc:
            got.error = exc
        finally:
            await stream.close()
    return got


async def stream_either(
    gw: ZooGateway, sdk: str, case: str, marker: str, stop_after: int | None = None
) -> Streamed:
    if sdk == "anthropic":
        return await anthropic_stream(gw.anthropic(case, marker), stop_after=stop_after)
    return await openai_stream(
        gw.openai(case, marker), "zoo-sonnet", stop_after=stop_after, max_tokens=64
    )


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
@pytest.mark.parametrize("case", ["anthropic-sse", "anthropic-sse-gzip"])
async def test_anthropic_stream_complete_is_exact(
    zoo_gw: ZooGateway, marker: str, sdk: str, case: str
) -> None:
    # Gzip: the app on the openai SDK gets the translation, decoded; on the anthropic SDK
    # the provider's bytes as sent (its HTTP client decodes them).
    got = await stream_either(zoo_gw, sdk, case, marker)
    assert got.error is None and got.texts == {0: z.TEXT}
    zoo_gw.upstream(marker, ANTHROPIC_CREDENTIAL)
    check_exact(await zoo_gw.row(got.request_id), EXACT_ANTHROPIC)


# Anthropic reported the prompt in message_start before the cut: the provider's count
# is the prompt (with its cache reads and writes); the completion is the delivered
# deltas, never message_start's placeholder 1.
_REPORTED = {
    "reported_prompt": z.ANTHROPIC_PROMPT,
    "cached_tokens": z.A_CACHE_READ,
    "cache_creation_tokens": z.A_CACHE_CREATION,
}


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
async def test_anthropic_stream_cut_by_provider_counts_delivered_deltas(
    zoo_gw: ZooGateway, marker: str, sdk: str
) -> None:
    got = await stream_either(zoo_gw, sdk, "anthropic-sse-cut", marker)
    delivered = z.pieces(z.TEXT)[: z.CUT_AFTER]
    assert got.error is not None, "the SDK should see the cut stream"
    assert got.texts == {0: "".join(delivered)}
    zoo_gw.upstream(marker, ANTHROPIC_CREDENTIAL)
    check_estimated(
        await zoo_gw.row(got.request_id),
        claude_tokens(delivered),
        partial=True,
        **_REPORTED,
    )


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
async def test_anthropic_stream_cancelled_by_app_counts_delivered_deltas(
    zoo_gw: ZooGateway, marker: str, sdk: str
) -> None:
    got = await stream_either(zoo_gw, sdk, "anthropic-sse-hold", marker, stop_after=z.CUT_AFTER)
    delivered = z.pieces(z.TEXT)[: z.CUT_AFTER]
    assert got.error is None and got.texts == {0: "".join(delivered)}
    zoo_gw.upstream(marker, ANTHROPIC_CREDENTIAL)
    check_estimated(
        await zoo_gw.row(got.request_id),
        claude_tokens(delivered),
        partial=True,
        **_REPORTED,
    )


# ------------------------------------------------------------------------- failures


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_timeout_is_504_with_the_estimate(
    zoo_gw: ZooGateway, marker: str, stream: bool
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await zoo_gw.openai("silent", marker).chat.completions.create(
            model="zoo-gpt", messages=QUESTION, stream=stream
        )
    assert info.value.status_code == 504
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    row = await zoo_gw.row(info.value.response.headers.get("x-request-id", ""))
    # The provider got the prompt and may bill it: never "0 tokens, exact". The app got
    # none of the answer: partial.
    check_estimated(row, 0, partial=True, status=504, decision="error")


async def test_provider_json_body_cut_is_estimated(zoo_gw: ZooGateway, marker: str) -> None:
    client = zoo_gw.openai("json-cut", marker)
    broken = False
    try:
        async with client.chat.completions.with_streaming_response.create(
            model="zoo-gpt", messages=QUESTION
        ) as response:
            request_id = response.headers.get("x-request-id", "")
            status = response.status_code
            try:
                await response.read()
            except Exception:  # the SDK's or its HTTP library's error for a cut body
                broken = True
    except openai.APIStatusError as exc:  # Envoy answered the cut itself (502)
        request_id = exc.response.headers.get("x-request-id", "")
        status = exc.status_code
    assert status == 502 or (status == 200 and broken), (status, broken)
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    row = await zoo_gw.row(request_id)
    # Nothing of the answer's text was delivered: completion 0, prompt the estimate.
    if status == 200:
        check_estimated(row, 0, partial=True)  # the app did not get the whole answer
    else:
        check_estimated(row, 0, partial=True, status=status, decision="error")


async def test_provider_500_passes_through_and_is_recorded(zoo_gw: ZooGateway, marker: str) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await zoo_gw.openai("error-500", marker).chat.completions.create(
            model="zoo-gpt", messages=QUESTION
        )
    assert info.value.status_code == 500
    assert info.value.response.json() == z.PROVIDER_500  # provider errors pass unchanged
    zoo_gw.upstream(marker, OPENAI_CREDENTIAL)
    row = await zoo_gw.row(info.value.response.headers.get("x-request-id", ""))
    # The provider's own error: nothing generated, nothing estimated.
    keys = ("status_code", "decision", "prompt_tokens", "completion_tokens", "tokens_estimated")
    got = {k: row[k] for k in keys}
    assert got == {
        "status_code": 500,
        "decision": "error",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "tokens_estimated": False,
    }, got
