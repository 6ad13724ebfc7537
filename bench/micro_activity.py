"""The activity feed's cost on the request path: ``python -m bench.micro_activity``.

Every finished request's record goes through ``ActivityFeed.submit`` (the usage sink);
this times it with 0 subscribers (the usual case: one truth test), with 1 and 4
subscribers (one event dict built and queued to each), and with one subscriber that
does not keep up (its full queue drops the oldest event), against the sink alone.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

from ext_proc.admin.activity import ActivityFeed
from ext_proc.usage.record import UsageRecord

N = 200_000


class _Sink:
    def submit(self, record: UsageRecord) -> None:
        pass


def _record() -> UsageRecord:
    return UsageRecord(
        request_id="req-0123456789abcdef",
        org_id="acme",
        app_id="support-bot",
        key_id="key_0123456789ab",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        provider="openai",
        deployment="gpt-4o-mini",
        status_code=200,
        prompt_tokens=12,
        completion_tokens=34,
        total_tokens=46,
        latency_ms=123.4,
        cost_usd=Decimal("0.0000222000"),
    )


def _time(submit: object, record: UsageRecord) -> float:
    call = submit  # a bound method
    started = time.perf_counter()
    for _ in range(N):
        call(record)  # type: ignore[operator]
    return (time.perf_counter() - started) / N * 1e9


async def main() -> None:
    record = _record()
    sink = _Sink()
    rows = [("sink alone (no feed)", _time(sink.submit, record))]
    feed = ActivityFeed(sink)
    rows.append(("feed, 0 subscribers", _time(feed.submit, record)))
    for count in (1, 4):
        feed = ActivityFeed(sink)
        subs = [feed.subscribe(lambda record: True, size=N + 1) for _ in range(count)]
        rows.append((f"feed, {count} subscriber(s)", _time(feed.submit, record)))
        for sub in subs:
            feed.unsubscribe(sub)
    feed = ActivityFeed(sink)
    slow = feed.subscribe(lambda record: True, size=1000)
    for _ in range(1000):
        feed.submit(record)
    rows.append(("feed, 1 full subscriber (drops)", _time(feed.submit, record)))
    assert slow.dropped > 0
    print(f"ActivityFeed.submit, {N} records each (ns per record):")
    for label, ns in rows:
        print(f"  {label:34s} {ns:8.0f} ns")


if __name__ == "__main__":
    asyncio.run(main())
