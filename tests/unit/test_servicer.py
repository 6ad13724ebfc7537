"""The servicer loop: dispatch, denial, and a crash inside one request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.server.processor import RequestProcessor
from ext_proc.server.servicer import ExternalProcessor
from tests.unit.test_processor import CHAT, body, make_gateway, request_headers


async def messages(*items: pb.ProcessingRequest) -> AsyncIterator[pb.ProcessingRequest]:
    for item in items:
        yield item


async def run(
    servicer: ExternalProcessor, *items: pb.ProcessingRequest
) -> list[pb.ProcessingResponse]:
    return [r async for r in servicer.Process(messages(*items), None)]  # type: ignore[arg-type]


async def test_dispatches_each_phase() -> None:
    gw, _ = make_gateway()
    out = await run(
        ExternalProcessor(gw),
        pb.ProcessingRequest(request_headers=request_headers()),
        pb.ProcessingRequest(request_body=body(CHAT)),
    )
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]


async def test_a_crash_answers_500_and_the_next_request_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, sink = make_gateway()
    servicer = ExternalProcessor(gw)

    async def boom(self: RequestProcessor, msg: pb.HttpBody) -> pb.ProcessingResponse:
        raise RuntimeError("bug")

    with monkeypatch.context() as m:
        m.setattr(RequestProcessor, "on_request_body", boom)
        out = await run(
            servicer,
            pb.ProcessingRequest(request_headers=request_headers()),
            pb.ProcessingRequest(request_body=body(CHAT)),
        )
    immediate = out[-1].immediate_response
    assert immediate.status.code == 500
    assert orjson.loads(immediate.body)["error"]["code"] == "gateway_internal_error"
    out = await run(
        servicer,
        pb.ProcessingRequest(request_headers=request_headers()),
        pb.ProcessingRequest(request_body=body(CHAT)),
    )
    assert out[-1].WhichOneof("response") == "request_body"
    await asyncio.sleep(0)
    assert sink.records[0].status_code == 500
    assert gw.metrics.stream_errors.labels("internal")._value.get() == 1


async def test_stream_that_ends_early_leaves_one_partial_record() -> None:
    gw, sink = make_gateway()
    await run(
        ExternalProcessor(gw),
        pb.ProcessingRequest(request_headers=request_headers()),
        pb.ProcessingRequest(request_body=body(CHAT)),
    )
    for _ in range(5):
        await asyncio.sleep(0)
    [record] = sink.records
    assert record.partial is True and record.status_code == 499
