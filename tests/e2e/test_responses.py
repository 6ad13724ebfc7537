"""OpenAI's Responses API end to end: the stock SDK's ``client.responses.create`` (JSON
and streamed, OpenAI-style and Azure-style) through the real Envoy, ext_proc and the
mock, each asserting the usage row; policies see ``input`` / ``instructions``."""

from __future__ import annotations

import json

import openai
import pytest

from ext_proc.tokens import estimator
from tests.e2e.conftest import AZURE_KEY, E2E

pytestmark = pytest.mark.e2e

INPUT = [{"role": "user", "content": "Say hello to the Responses API tests."}]


async def test_json_response_row_is_exact(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(marker, **{"x-mock-cached-tokens": "3", "x-mock-reasoning-tokens": "4"})
    raw = await client.responses.with_raw_response.create(
        model="gpt-4o-mini", input=INPUT, instructions="Be brief.", previous_response_id=None
    )
    response = raw.parse()
    assert response.output_text and response.usage is not None
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["status_code"], row["decision"]) == (
        "/v1/responses",
        200,
        "allowed",
    )
    assert row["prompt_tokens"] == response.usage.input_tokens
    assert row["completion_tokens"] == response.usage.output_tokens
    assert row["total_tokens"] == response.usage.total_tokens
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (3, 4)
    assert row["tokens_estimated"] is False and row["partial"] is False
    assert row["response_model"] == response.model
    assert row["recorded_by"] == "access_log"  # read by Envoy: no message through Python
    # The gateway's estimate counts input and instructions by the same rules.
    assert row["estimated_prompt_tokens"] == response.usage.input_tokens
    assert await e2e.count_rows(raw.headers["x-request-id"]) == 1
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/v1/responses"
    assert json.loads(seen["body"])["instructions"] == "Be brief."
    assert e2e.api_key not in json.dumps(seen["headers"])


async def test_streamed_response_row_is_exact(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(marker, **{"x-mock-chunks": "9"})
    async with client.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="Stream something.", stream=True
    ) as raw:
        request_id = raw.headers["x-request-id"]
        text, usage = "", None
        async for event in await raw.parse():
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.completed":
                usage = event.response.usage
    assert text and usage is not None
    row = await e2e.usage_row(request_id)
    assert (row["stream"], row["partial"], row["tokens_estimated"]) == (True, False, False)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert row["recorded_by"] == "response"


async def test_cancelled_stream_counts_what_was_delivered(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(
        marker,
        **{
            "x-mock-chunks": "60",
            "x-mock-chunk-delay-ms": "40",
            "x-mock-completion-tokens": "60",
        },
    )
    received = ""
    async with client.responses.with_streaming_response.create(
        model="gpt-4o-mini", input=INPUT, stream=True
    ) as raw:
        request_id = raw.headers["x-request-id"]
        stream = await raw.parse()
        async for event in stream:
            if event.type == "response.output_text.delta":
                received += event.delta
            if len(received) > 20:
                break
        await stream.close()
    row = await e2e.usage_row(request_id)
    assert (row["partial"], row["tokens_estimated"]) == (True, True)
    assert row["prompt_tokens"] == row["estimated_prompt_tokens"] > 0
    delivered = estimator.count_texts("gpt-4o-mini", [received])
    assert delivered <= row["completion_tokens"] < 60  # never the whole 60


async def test_azure_style_responses(e2e: E2E, marker: str) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=e2e.base_url,
        api_key=e2e.api_key,
        api_version="2025-04-01-preview",
        max_retries=0,
        default_headers={"x-test-id": marker},
    )
    raw = await azure.responses.with_raw_response.create(model="gpt-4o-prod", input=INPUT)
    response = raw.parse()
    assert response.output_text and response.usage is not None
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/openai/responses"
    assert "api-version=" in seen["query"]
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert json.loads(seen["body"])["model"] == "gpt-4o-prod"
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert (row["provider"], row["deployment"], row["endpoint"]) == (
        "azure-mock",
        "gpt-4o-prod",
        "/openai/responses",
    )
    assert row["prompt_tokens"] == response.usage.input_tokens
    assert row["tokens_estimated"] is False


async def test_policies_read_responses_requests(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("checked-app"))
    # checked-app: streams refused by a CEL pre-check, models limited to gpt-4o-mini.
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.responses.create(model="gpt-4o-mini", input=INPUT, stream=True)
    assert info.value.body["code"] == "policy_violation"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.responses.create(model="gpt-4o", input=INPUT)
    assert info.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    response = await client.responses.create(model="gpt-4o-mini", input=INPUT)
    assert response.output_text


async def test_a_provider_without_the_responses_api_is_400(e2e: E2E) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await e2e.sdk().responses.create(model="claude-sonnet-4", input=INPUT)
    assert info.value.body["code"] == "unsupported_endpoint"  # type: ignore[index]
