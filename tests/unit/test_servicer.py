"""The servicer loop: dispatch by first message, denial, and a crash inside one request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.server import servicer as servicer_module
from ext_proc.server.processor import RequestProcessor
from ext_proc.server.servicer import ExternalProcessor
from tests.unit.test_processor import APP_KEY, CHAT, forwarded, headers, make_gateway, request


async def messages(*items: pb.ProcessingRequest) -> AsyncIterator[pb.ProcessingRequest]:
    for item in items:
        yield item


async def run(
    servicer: ExternalProcessor, *items: pb.ProcessingRequest
) -> list[pb.ProcessingResponse]:
    return [r async for r in servicer.Process(messages(*items), None)]  # type: ignore[arg-type]


async def test_request_stream_is_one_message() -> None:
    gw, _ = make_gateway()
    out = await run(ExternalProcessor(gw), request(CHAT))
    assert [r.WhichOneof("response") for r in out] == ["request_body"]
    assert "gw_route" in out[0].dynamic_metadata.fields


async def test_response_stream_dispatches_to_the_response_processor() -> None:
    gw, sink = make_gateway()
    body = pb.ProcessingRequest(
        response_body=pb.HttpBody(
            body=b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,'
            b'"total_tokens":2}}\n\ndata: [DONE]\n\n',
            end_of_stream=True,
        )
    )
    out = await run(ExternalProcessor(gw), forwarded(), body)
    assert [r.WhichOneof("response") for r in out] == ["response_headers", "response_body"]
    for _ in range(10):
        await asyncio.sleep(0)
    assert sink.records[0].total_tokens == 2


async def test_a_crash_answers_500_and_the_next_request_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, sink = make_gateway()
    servicer = ExternalProcessor(gw)

    async def boom(
        self: RequestProcessor, msg: pb.HttpBody, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        raise RuntimeError("bug")

    with monkeypatch.context() as m:
        m.setitem(servicer_module._REQUEST_SIDE, "request_body", boom)
        out = await run(servicer, request(CHAT))
    immediate = out[-1].immediate_response
    assert immediate.status.code == 500
    assert orjson.loads(immediate.body)["error"]["code"] == "gateway_internal_error"
    out = await run(servicer, request(CHAT))
    assert out[-1].WhichOneof("response") == "request_body"
    for _ in range(10):
        await asyncio.sleep(0)
    assert sink.records[0].status_code == 500
    assert gw.metrics.stream_errors.labels("internal")._value.get() == 1


async def test_a_message_for_the_other_side_answers_500_not_a_crash() -> None:
    gw, _ = make_gateway()
    first = pb.ProcessingRequest(
        request_headers=headers(
            **{
                ":path": "/v1/chat/completions",
                ":method": "POST",
                "x-request-id": "r",
                "content-type": "application/json",
                "authorization": f"Bearer {APP_KEY}",
            }
        )
    )
    stray = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True))
    out = await run(ExternalProcessor(gw), first, stray)
    assert out[0].HasField("request_headers")
    assert out[-1].immediate_response.status.code == 500
    assert gw.metrics.stream_errors.labels("internal")._value.get() == 1
