"""The gateway path end to end: official SDK → real Envoy → ext_proc → mock upstream.

Every test asserts the usage row the request left, not only the HTTP answer.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ext_proc.tokens.encodings import encoding_for_model
from tests.e2e.conftest import AZURE_KEY, E2E, OPENAI_KEY

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the gateway tests."},
]


async def test_chat_plain_usage_row_matches_provider(e2e: E2E, marker: str) -> None:
    raw = await e2e.sdk(marker).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.choices[0].message.content
    assert completion.usage is not None

    row = await e2e.usage_row(request_id)
    assert row["status_code"] == 200
    assert row["decision"] == "allowed"
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["model"] == "gpt-4o-mini"
    assert row["response_model"] == completion.model
    assert row["provider"] == "mock"
    assert row["stream"] is False
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert row["completion_tokens"] == completion.usage.completion_tokens
    assert row["total_tokens"] == completion.usage.total_tokens
    assert row["tokens_estimated"] is False
    assert row["partial"] is False
    assert row["latency_ms"] > 0
    assert row["request_bytes"] > 0
    assert await e2e.count_rows(request_id) == 1
    # The app's gateway key never reaches the provider.
    [seen] = e2e.mock_requests(marker)
    assert e2e.api_key not in json.dumps(seen["headers"])
    assert "authorization" not in seen["headers"]


async def test_stream_with_include_usage(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker, **{"x-mock-chunks": "7"})
    async with c.chat.completions.with_streaming_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    usage = chunks[-1].usage
    assert usage is not None
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    row = await e2e.usage_row(request_id)
    assert row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert row["tokens_estimated"] is False
    assert row["partial"] is False
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


async def test_stream_without_include_usage_is_still_exact(e2e: E2E, marker: str) -> None:
    """The gateway asks the provider for the usage chunk; the SDK accepts the extra chunk."""
    async with e2e.sdk(marker).chat.completions.with_streaming_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    [seen] = e2e.mock_requests(marker)
    assert json.loads(seen["body"])["stream_options"] == {"include_usage": True}
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    row = await e2e.usage_row(request_id)
    assert row["completion_tokens"] == usage.completion_tokens
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["tokens_estimated"] is False


async def test_embeddings(e2e: E2E, marker: str) -> None:
    raw = await e2e.sdk(marker).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first text", "a second, longer text"]
    )
    result = raw.parse()
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["endpoint"] == "/v1/embeddings"
    assert row["prompt_tokens"] == result.usage.prompt_tokens > 0
    assert row["completion_tokens"] == 0
    assert row["total_tokens"] == result.usage.total_tokens
    assert row["tokens_estimated"] is False


async def test_client_cancel_mid_stream_counts_what_was_delivered(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker, **{"x-mock-chunks": "60", "x-mock-chunk-delay-ms": "40"})
    received = ""
    async with c.chat.completions.with_streaming_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-completion-tokens": "60"},
    ) as response:
        request_id = response.headers["x-request-id"]
        stream = await response.parse()
        async for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
            if len(received) > 20:
                break
        await stream.close()
    row = await e2e.usage_row(request_id)
    assert row["partial"] is True
    assert row["tokens_estimated"] is True
    delivered_tokens = len(encoding_for_model("gpt-4o").encode(received))
    # Envoy may have passed on a few chunks the client had not read yet, never all 60.
    assert delivered_tokens <= row["completion_tokens"] < 60
    assert row["prompt_tokens"] == row["estimated_prompt_tokens"] > 0


async def test_upstream_cuts_stream(e2e: E2E, marker: str) -> None:
    # Chunks 40 ms apart: the stream is under way (the app has its 200 and some chunks)
    # when the upstream dies.
    c = e2e.sdk(
        marker,
        **{"x-mock-chunks": "10", "x-mock-cut-after": "3", "x-mock-chunk-delay-ms": "40"},
    )
    received = ""
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its transport error
        async with c.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-completion-tokens": "10"},
        ) as response:
            async for chunk in await response.parse():
                if chunk.choices:
                    received += chunk.choices[0].delta.content or ""
    # The cut can land before the response headers reach the app: take the request id
    # Envoy passed upstream.
    [seen] = e2e.mock_requests(marker)
    row = await e2e.usage_row(seen["headers"]["x-request-id"])
    assert row["partial"] is True
    assert row["tokens_estimated"] is True
    # The upstream sent 3 one-token chunks before cutting; Envoy may drop data in flight
    # when it resets the app's stream, so the app can have received fewer.
    assert len(encoding_for_model("gpt-4o").encode(received)) <= row["completion_tokens"] <= 3


async def test_upstream_500(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker, **{"x-mock-status": "500"})
    with pytest.raises(openai.InternalServerError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    request_id = info.value.response.headers["x-request-id"]
    row = await e2e.usage_row(request_id)
    assert row["status_code"] == 500
    assert row["decision"] == "error"
    assert row["error_code"] == "upstream_error"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)


async def test_upstream_429_passes_through(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker, **{"x-mock-status": "429"})
    with pytest.raises(openai.RateLimitError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.headers.get("retry-after") == "1"
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert row["status_code"] == 429 and row["decision"] == "error"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "param"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "invalid_json", None),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            {"content-type": "application/json"},
            400,
            "invalid_encoding",
            None,
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}',
            {"content-type": "application/json"},
            400,
            "missing_required_parameter",
            "model",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": []}',
            {"content-type": "application/json"},
            400,
            "invalid_type",
            "messages",
        ),
        (
            b"model=gpt-4o-mini",
            {"content-type": "application/x-www-form-urlencoded"},
            400,
            "invalid_content_type",
            "content-type",
        ),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "invalid_json", None),
        (
            b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
            {"content-type": "application/json"},
            404,
            "model_not_found",
            None,
        ),
    ],
)
async def test_bad_requests_get_openai_errors(
    e2e: E2E, body: bytes, headers: dict[str, str], status: int, code: str, param: str | None
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{e2e.base_url}/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {e2e.api_key}", **headers},
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    row = await e2e.usage_row(response.headers["x-request-id"])
    assert row["status_code"] == status
    assert row["error_code"] == code
    assert row["decision"] == ("denied" if status == 404 else "error")


async def test_one_mib_prompt_passes_and_bigger_gets_413(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker)
    big = "word " * (1024 * 1024 // 5)  # 1 MiB of prompt text
    raw = await c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": big}], max_tokens=5
    )
    assert raw.status_code == 200
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["prompt_tokens"] > 200_000

    too_big = "word " * (2 * 1024 * 1024 // 5)
    with pytest.raises(openai.APIStatusError) as info:
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": too_big}]
        )
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"  # type: ignore[index]
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert row["status_code"] == 413 and row["decision"] == "denied"


async def test_oversized_chunked_body_gets_413(e2e: E2E) -> None:
    """No content-length: the body phase enforces the same limit."""

    async def body() -> object:
        chunk = b" " * 65536
        yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(40):  # 2.5 MiB
            yield chunk
        yield b'"}]}'

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{e2e.base_url}/v1/chat/completions",
            content=body(),
            headers={"content-type": "application/json", "authorization": f"Bearer {e2e.api_key}"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] in ("request_too_large", "request_payload_too_large")


async def test_azure_style_path_and_credentials(e2e: E2E, marker: str) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=e2e.base_url,
        api_key=e2e.api_key,
        api_version="2024-10-21",
        max_retries=0,
        default_headers={"x-test-id": marker},
    )
    raw = await azure.chat.completions.with_raw_response.create(
        model="gpt-4o-prod", messages=MESSAGES
    )
    assert raw.parse().choices[0].message.content
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert "api-version=2024-10-21" in seen["query"]
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert e2e.api_key not in json.dumps(seen["headers"])
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["provider"] == "azure-mock" and row["deployment"] == "gpt-4o-prod"


async def test_openai_sdk_to_azure_served_model(e2e: E2E, marker: str) -> None:
    raw = await e2e.sdk(marker).chat.completions.with_raw_response.create(
        model="azure-4o", messages=MESSAGES
    )
    assert raw.status_code == 200
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in seen["headers"]


async def test_model_renamed_and_provider_key_injected(e2e: E2E, marker: str) -> None:
    raw = await e2e.sdk(marker).chat.completions.with_raw_response.create(
        model="renamed", messages=MESSAGES
    )
    assert raw.parse().model == "gpt-4o-mini"
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini"
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["model"] == "renamed" and row["deployment"] == "gpt-4o-mini"


async def test_list_models_answered_by_gateway(e2e: E2E, marker: str) -> None:
    models = await e2e.sdk(marker).models.list()
    ids = {m.id async for m in models}
    assert {"gpt-4o-mini", "azure-4o", "text-embedding-3-small"} <= ids
    assert e2e.mock_requests(marker) == []


async def test_unknown_path_is_404(e2e: E2E) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{e2e.base_url}/v1/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


async def test_metrics_move(e2e: E2E, marker: str) -> None:
    before = e2e.metric(
        "gen_ai_client_token_usage_count", gen_ai_token_type="input", gen_ai_request_model="gpt-4"
    )
    written_before = e2e.metric("ext_proc_usage_records_written_total")
    raw = await e2e.sdk(marker).chat.completions.with_raw_response.create(
        model="gpt-4", messages=MESSAGES
    )
    await e2e.usage_row(raw.headers["x-request-id"])
    after = e2e.metric(
        "gen_ai_client_token_usage_count", gen_ai_token_type="input", gen_ai_request_model="gpt-4"
    )
    assert after == before + 1
    assert e2e.metric("ext_proc_usage_records_written_total") > written_before
    assert (
        e2e.metric("gen_ai_server_request_duration_seconds_count", gen_ai_request_model="gpt-4")
        >= 1
    )
    assert e2e.metric("ext_proc_phase_duration_seconds_count", phase="request_body") >= 1
    assert e2e.metric("ext_proc_usage_queue_depth") >= 0


async def test_concurrent_requests_each_leave_one_row(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker)

    async def one(i: int) -> str:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {i}"}]
        )
        return raw.headers["x-request-id"]

    ids = await asyncio.gather(*(one(i) for i in range(40)))
    assert len(set(ids)) == 40
    rows = [await e2e.usage_row(i) for i in ids]
    assert all(r["status_code"] == 200 and r["tokens_estimated"] is False for r in rows)


async def test_request_without_body_is_400_and_recorded(e2e: E2E) -> None:
    """Envoy answers it without the request processor (no body to send it): the access
    log still records it."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{e2e.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {e2e.api_key}", "content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    row = await e2e.usage_row(response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["recorded_by"]) == (400, "error", "access_log")


async def test_get_on_a_post_endpoint_is_405(e2e: E2E) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{e2e.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {e2e.api_key}"},
        )
        unknown = await http.get(
            f"{e2e.base_url}/v1/nope", headers={"authorization": f"Bearer {e2e.api_key}"}
        )
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    row = await e2e.usage_row(response.headers["x-request-id"])
    assert row["status_code"] == 405 and row["recorded_by"] == "request"
