"""Streams counted by the observe-only response filter (Envoy's ``observability_mode``).

Envoy sends each chunk without waiting and ignores answers: the servicer sends none, the
processor keeps raw chunks and reads them once at the end, and the usage log stands in
for a stream whose observer never recorded it. What a user checks: one record per
request, exact usage from the usage chunk, the delivered text counted on a cut or a
cancel, whatever the provider's quirk (no content type, gzip, no usage chunk).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc import envoy_contract as contract
from ext_proc.config.loader import parse_config
from ext_proc.envoy_config import OBSERVE_FILTER, RESPONSE_FILTER, EnvoyOptions, render
from ext_proc.server import envoy_log
from ext_proc.server import response as response_module
from ext_proc.server.envoy_log import LOG_FIELDS, UsageLog
from ext_proc.server.facts import Facts
from ext_proc.server.processor import RequestProcessor
from ext_proc.server.response import ResponseProcessor
from ext_proc.server.servicer import ExternalProcessor
from ext_proc.tokens import estimator
from tests.unit.test_processor import (
    CHAT,
    CONFIG,
    forwarded,
    headers,
    make_gateway,
    metadata,
    request,
    send,
    settle,
)
from tests.unit.test_recent_ids import turns

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
TEXTS = ["The", " quick", " brown", " fox"]


def sse(*, usage: bool = True, done: bool = True, texts: list[str] = TEXTS) -> bytes:
    events = [
        {"model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "delta": {"content": t}}]}
        for t in texts
    ]
    if usage:
        events.append({"model": "gpt-4o-mini-2024-07-18", "choices": [], "usage": USAGE})
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def observed(msg: pb.ProcessingRequest) -> pb.ProcessingRequest:
    msg.observability_mode = True
    return msg


def first_message(content_type: str | None = "text/event-stream", **extra: str) -> Any:
    msg = forwarded()
    values = {":status": "200", **extra}
    if content_type is not None:
        values["content-type"] = content_type
    msg.response_headers.CopyFrom(headers(**values))
    return observed(msg)


def chunks(body: bytes, size: int, *, end: bool = True) -> list[pb.ProcessingRequest]:
    """The body as Envoy streams it: one message per ``size`` bytes."""
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return [
        observed(
            pb.ProcessingRequest(
                response_body=pb.HttpBody(body=part, end_of_stream=end and i == len(parts) - 1)
            )
        )
        for i, part in enumerate(parts)
    ]


async def messages(*items: pb.ProcessingRequest) -> AsyncIterator[pb.ProcessingRequest]:
    for item in items:
        yield item


async def serve(*items: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], Any]:
    gw, sink = make_gateway()
    servicer = ExternalProcessor(gw)
    out = [r async for r in servicer.Process(messages(*items), None)]  # type: ignore[arg-type]
    await settle()
    return out, sink


def delivered_tokens(texts: list[str] = TEXTS) -> int:
    return estimator.count_texts("gpt-4o-mini", texts)


async def test_an_observed_stream_is_answered_nothing_and_recorded_exactly() -> None:
    out, sink = await serve(first_message(), *chunks(sse(), 7))
    assert out == []  # Envoy ignores answers in observability mode: none is sent
    [record] = sink.records
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (9, 4, 13)
    assert record.tokens_estimated is False and record.partial is False
    assert record.response_model == "gpt-4o-mini-2024-07-18"
    assert record.recorded_by == "response" and record.status_code == 200


async def test_an_observed_stream_without_content_type_or_usage_counts_the_text() -> None:
    out, sink = await serve(first_message(content_type=None), *chunks(sse(usage=False), 11))
    assert out == []
    [record] = sink.records
    assert record.tokens_estimated is True and record.partial is False
    assert record.completion_tokens == delivered_tokens()
    assert record.prompt_tokens == 12  # the gateway's estimate (forwarded facts)


async def test_an_observed_gzip_stream_is_read_whole() -> None:
    compressor = zlib.compressobj(wbits=31)
    body = compressor.compress(sse()) + compressor.flush()
    _, sink = await serve(first_message(**{"content-encoding": "gzip"}), *chunks(body, 5))
    [record] = sink.records
    assert (record.prompt_tokens, record.completion_tokens) == (9, 4)
    assert record.tokens_estimated is False


async def test_an_observed_stream_cut_mid_way_counts_what_was_delivered() -> None:
    body = sse(usage=False, done=False, texts=["The", " quick"])
    # No end_of_stream: Envoy closed the observer's stream (the provider cut it).
    _, sink = await serve(first_message(), *chunks(body, 9, end=False))
    [record] = sink.records
    assert record.partial is True and record.tokens_estimated is True
    assert record.completion_tokens == delivered_tokens(["The", " quick"])
    assert record.prompt_tokens == 12


async def test_a_cancelled_observed_stream_is_counted_once() -> None:
    gw, sink = make_gateway()
    first = first_message()
    proc = ResponseProcessor(gw, first)
    await proc.on_response_headers(first.response_headers, first)
    for msg in chunks(sse(usage=False, done=False), 13, end=False):
        await proc.on_response_body(msg.response_body, msg)
    proc.close(cancelled=True)
    proc.close(cancelled=True)
    await settle()
    [record] = sink.records
    assert record.partial is True and record.completion_tokens == delivered_tokens()


async def test_a_long_stream_is_read_in_bounded_batches(monkeypatch: Any) -> None:
    """Raw chunks wait at most ``_PENDING_BYTES``: memory stays bounded, the count exact."""
    monkeypatch.setattr(response_module, "_PENDING_BYTES", 64)
    texts = [f" word{i}" for i in range(200)]
    gw, sink = make_gateway()
    first = first_message()
    proc = ResponseProcessor(gw, first)
    await proc.on_response_headers(first.response_headers, first)
    for msg in chunks(sse(usage=False, texts=texts), 10):
        await proc.on_response_body(msg.response_body, msg)
        assert proc._pending_bytes < 64
    for _ in range(200):  # a long text is counted in a worker thread
        if sink.records:
            break
        await asyncio.sleep(0.01)
    [record] = sink.records
    assert record.completion_tokens == delivered_tokens(texts)
    assert record.partial is False


async def test_the_mutating_filter_still_gets_its_answers() -> None:
    """Without observability mode (translations, fallback chains) every message is
    answered, the first one marking the request as recorded here."""
    first = forwarded()
    body = pb.ProcessingRequest(response_body=pb.HttpBody(body=sse(), end_of_stream=True))
    out, sink = await serve(first, body)
    assert [r.WhichOneof("response") for r in out] == ["response_headers", "response_body"]
    assert out[0].mode_override.response_body_mode == out[0].mode_override.STREAMED
    assert "gw_response" in out[0].dynamic_metadata.fields
    [record] = sink.records
    assert record.completion_tokens == 4


# ---------------------------------------------------------------- the usage log


def observed_line(*, ended_ago: float = 0.0, flags: str = "-") -> bytes:
    """A usage-log line of a stream on an observed route, as Envoy writes it."""
    facts = forwarded().metadata_context.filter_metadata["gw"].fields["f"].string_value
    started = time.time() - ended_ago - 0.5
    entry = {
        "id": "rid-9",
        "t0": f"{started:.6f}",
        "path": "/v1/chat/completions",
        "st": 200,
        "det": "via_upstream",
        "fl": flags,
        "dur": 500_000,
        "ms": 500,
        "rsb": 900,
        "att": 1,
        "uh": "127.0.0.1:8001",
        "route": "to_mock_observed",
        "ct": "text/event-stream",
        "gw": facts,
        "ob": "1",
    }
    assert set(entry) <= set(LOG_FIELDS)
    return orjson.dumps(entry)


async def test_the_log_skips_a_stream_its_observer_recorded() -> None:
    gw, sink = make_gateway()
    gw.recorded.add("rid-9")
    await UsageLog(gw).consume([observed_line()])
    await settle()
    assert sink.records == []


async def test_the_log_waits_for_an_observer_that_records_late() -> None:
    """A cancelled stream reaches the observer when Envoy closes its gRPC stream, after
    the line may have been read: the log waits for that record instead of writing a
    stand-in first, and is woken the moment the observer hands its record over (a few
    loop turns, no time passing: not at a polling interval, not at the deadline)."""
    gw, sink = make_gateway()
    reader = asyncio.create_task(UsageLog(gw).consume([observed_line()]))
    assert not await turns(reader)  # seconds before its deadline: it waits
    assert sink.records == []
    # The observer finishes the stream and hands its record over.
    first = first_message()
    proc = ResponseProcessor(gw, first)
    await proc.on_response_headers(first.response_headers, first)
    for msg in chunks(sse(), 16):
        await proc.on_response_body(msg.response_body, msg)
    assert await turns(reader)
    await settle()
    [record] = sink.records
    assert record.recorded_by == "response" and record.completion_tokens == 4
    assert gw.recorded._waiters == {}


async def test_the_log_stands_in_once_the_deadline_passes() -> None:
    """No record by the deadline (the request's end + Envoy's deferred close + grace):
    the log writes the fallback row, and leaves no waiter behind."""
    gw, sink = make_gateway()
    window = contract.OBSERVER_CLOSE_MS / 1000 + envoy_log._OBSERVER_GRACE
    line = observed_line(ended_ago=window - 0.05)  # the deadline is 50 ms away
    reader = asyncio.create_task(UsageLog(gw).consume([line]))
    assert not await turns(reader)  # it waits first: nothing written yet
    assert sink.records == []
    await reader
    await settle()
    [record] = sink.records
    assert record.recorded_by == "access_log_fallback"
    assert record.prompt_tokens == 12 and record.tokens_estimated is True
    assert gw.recorded._waiters == {}


async def test_the_log_stands_in_for_an_observer_that_never_recorded() -> None:
    """The observer failed (its filter lets the app's stream go on): the request still
    gets its one row, from the log, ranked below any record the owner writes later."""
    gw, sink = make_gateway()
    await UsageLog(gw).consume([observed_line(ended_ago=30.0, flags="DC")])
    await settle()
    [record] = sink.records
    assert record.recorded_by == "access_log_fallback"
    assert record.prompt_tokens == 12 and record.tokens_estimated is True


# ------------------------------------------------- which response filter runs


def routes_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [hcm] = [f["typed_config"] for f in chain["filters"]]
    [vhost] = hcm["route_config"]["virtual_hosts"]
    routes: list[dict[str, Any]] = vhost["routes"]
    return routes


def route_after_lua(routes: list[dict[str, Any]], route_md: dict[str, Any]) -> dict[str, Any]:
    """The route Envoy picks once the request Lua filter set the route headers from the
    processor's metadata: the first whose header matchers all hold."""
    sent = {
        ":method": "POST",
        contract.PROVIDER_HEADER: route_md[contract.ROUTE_PROVIDER],
        contract.RESPONSE_HEADER: route_md[contract.ROUTE_RESPONSE],
    }
    for route in routes:
        matchers = route["match"].get("headers", [])
        if all(sent.get(m["name"]) == m["string_match"]["exact"] for m in matchers):
            return route
    raise AssertionError(f"no route for {sent}")


def response_filters(route: dict[str, Any]) -> set[str]:
    """The response filters a route runs: the mutating one unless disabled on the route,
    the observer only where the route enables it (the virtual host disables it)."""
    per_filter = route.get("typed_per_filter_config", {})
    running = set()
    if not per_filter.get(RESPONSE_FILTER, {}).get("disabled"):
        running.add(RESPONSE_FILTER)
    if OBSERVE_FILTER in per_filter and not per_filter[OBSERVE_FILTER].get("disabled"):
        running.add(OBSERVE_FILTER)
    return running


@pytest.mark.parametrize(
    ("model", "stream", "mode", "filters"),
    [
        # Streams the gateway only counts: the observer (OpenAI's and Azure's shapes).
        ("gpt-4o-mini", True, contract.RESPONSE_OBSERVE, {OBSERVE_FILTER}),
        ("azure-mini", True, contract.RESPONSE_OBSERVE, {OBSERVE_FILTER}),
        # Translated answers, streamed or not: the mutating filter rewrites them.
        ("claude-4", True, contract.RESPONSE_PROCESS, {RESPONSE_FILTER}),
        ("claude-4", False, contract.RESPONSE_PROCESS, {RESPONSE_FILTER}),
        # Plain answers: no response filter (the usage log finishes them).
        ("gpt-4o-mini", False, contract.RESPONSE_NONE, set()),
    ],
)
async def test_the_request_side_picks_the_response_filter(
    model: str, stream: bool, mode: str, filters: set[str]
) -> None:
    """The request processor alone decides which response filter runs; the rendered
    routes, given the headers the Lua filter copies from its metadata, run that one."""
    gw, _ = make_gateway()
    body: dict[str, Any] = {**CHAT, "model": model, "max_tokens": 20}
    if stream:
        body["stream"] = True
    response = await send(RequestProcessor(gw), request(body))
    route_md = metadata(response, contract.ROUTE_NAMESPACE)
    assert route_md[contract.ROUTE_RESPONSE] == mode
    facts = Facts.from_struct(response.dynamic_metadata.fields[contract.NAMESPACE].struct_value)
    assert facts is not None
    assert facts.response_processor is (mode != contract.RESPONSE_NONE)
    assert bool(facts.translation) is (model == "claude-4")
    routes = routes_of(render(parse_config(CONFIG), EnvoyOptions.dev()))
    assert response_filters(route_after_lua(routes, route_md)) == filters


def test_the_request_lua_copies_the_processors_choice() -> None:
    """The Lua filter reads no facts to choose the response filter: it copies the
    processor's value into the route header."""
    from ext_proc.envoy_config import _request_lua

    lua = _request_lua()
    copy = f'hd:replace("{contract.RESPONSE_HEADER}", route["{contract.ROUTE_RESPONSE}"])'
    assert copy in lua
    assert lua.count(contract.RESPONSE_HEADER) == 1
    assert f'"{contract.NAMESPACE}"' not in lua and "string.find" not in lua
