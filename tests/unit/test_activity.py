"""The activity feed: records reach the usage sink always, subscribers only when there
are any, each bounded (the oldest dropped, counted), filtered, and ended at shutdown."""

from __future__ import annotations

import orjson

from ext_proc.admin.activity import ActivityFeed, event_of, sse
from ext_proc.usage.record import UsageRecord


class Sink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def record(n: int, org: str = "acme") -> UsageRecord:
    return UsageRecord(request_id=f"req-{n}", org_id=org, app_id="bot", status_code=200)


async def test_records_reach_the_sink_with_or_without_subscribers() -> None:
    sink = Sink()
    feed = ActivityFeed(sink)
    feed.submit(record(1))
    with feed.subscribe(lambda r: True) as subscription:
        feed.submit(record(2))
        got = await subscription.next(1.0)
    assert [r.request_id for r in sink.records] == ["req-1", "req-2"]
    assert isinstance(got, UsageRecord) and got.request_id == "req-2"
    assert feed.subscribers == 0  # leaving the block unsubscribed


async def test_a_slow_subscriber_loses_its_oldest_records_and_is_told() -> None:
    feed = ActivityFeed(Sink())
    subscription = feed.subscribe(lambda r: r.org_id == "acme", size=3)
    for n in range(5):
        feed.submit(record(n))
    feed.submit(record(99, org="globex"))  # filtered out: not counted as dropped
    stream = sse(subscription, heartbeat=0.05)
    assert await anext(stream) == b": connected\n\n"
    dropped = await anext(stream)
    assert dropped.startswith(b"event: dropped") and b'"dropped":2' in dropped
    first = await anext(stream)
    data = orjson.loads(first.split(b"data: ", 1)[1])
    assert data["request_id"] == "req-2" and data == {**event_of(record(2)), "time": data["time"]}
    assert (await anext(stream)).count(b"req-3") == 1
    assert (await anext(stream)).count(b"req-4") == 1
    assert await anext(stream) == b": keepalive\n\n"
    feed.close()
    assert [chunk async for chunk in stream] == []
    assert feed.subscribers == 0
