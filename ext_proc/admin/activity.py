"""The live activity stream (``GET /v1/activity``): every finished request, as it ends.

``ActivityFeed`` stands between the request path and the usage writer (it is the
gateway's usage sink): each finished request's record (``ext_proc.server.completion``
hands every one to the sink) goes on to the writer, and to the subscribers when there
are any. With nobody listening that is a loop over an empty tuple. With subscribers the
record itself is appended to each one's bounded buffer (its filter is a few attribute
reads); a subscriber that does not keep up loses its oldest records (and is told how
many), never slows the gateway. The event is built and serialised in the subscriber's
own task (the SSE response), off the request path.

A replica streams the requests it finished: behind several replicas, a console
subscribes to each (the requests of one app spread over all of them).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, Protocol

from ext_proc.usage.record import UsageRecord

DEFAULT_QUEUE = 1000  # events a subscriber may fall behind by before losing the oldest
MAX_SUBSCRIBERS = 64


class UsageSink(Protocol):
    def submit(self, record: UsageRecord, trace: object | None = None) -> None: ...


def event_of(record: UsageRecord) -> dict[str, Any]:
    """What a subscriber sees of one finished request (never the key, only its id)."""
    cost = record.cost_usd
    return {
        "request_id": record.request_id,
        "time": record.created_at.isoformat() if record.created_at else None,
        "org": record.org_id,
        "app": record.app_id,
        "environment": record.environment,
        "key_id": record.key_id,
        "endpoint": record.endpoint,
        "model": record.model,
        "provider": record.provider,
        "deployment": record.deployment,
        "stream": record.stream,
        "decision": record.decision,
        "policy": record.policy,
        "status": record.status_code,
        "error_code": record.error_code,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
        "tokens_estimated": record.tokens_estimated,
        "cost_usd": f"{cost:.10f}" if isinstance(cost, Decimal) else None,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
    }


class Subscription:
    """One listener: a bounded buffer of finished requests' records (the oldest dropped
    when it is full), those its predicate accepts."""

    def __init__(self, feed: ActivityFeed, accepts: Callable[[UsageRecord], bool], size: int):
        self._feed = feed
        self.accepts = accepts
        self._records: deque[UsageRecord] = deque(maxlen=size)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.dropped = 0

    def offer(self, record: UsageRecord) -> None:
        """On the request path: an append, and a wake-up when the reader waits."""
        if not self.accepts(record):
            return
        records = self._records
        if len(records) == records.maxlen:
            self.dropped += 1  # the deque drops the oldest
        records.append(record)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """End the stream (the feed is shutting down)."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout: float) -> UsageRecord | bool | None:
        """The next record; False when none came within ``timeout``; None at the end."""
        if not self._records and not self._closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                return False
            finally:
                self._waiter = None
        if self._records:
            return self._records.popleft()
        return None if self._closed else False

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self._feed.unsubscribe(self)


class ActivityFeed:
    """The usage sink that also feeds live subscribers (see the module docstring)."""

    def __init__(self, sink: UsageSink) -> None:
        self._sink = sink
        self._subscribers: tuple[Subscription, ...] = ()

    def submit(self, record: UsageRecord, trace: object | None = None) -> None:
        if trace is None:
            self._sink.submit(record)
        else:
            self._sink.submit(record, trace)
        for subscriber in self._subscribers:  # () while nobody listens
            subscriber.offer(record)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self, accepts: Callable[[UsageRecord], bool], size: int = DEFAULT_QUEUE
    ) -> Subscription:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise OverflowError(f"at most {MAX_SUBSCRIBERS} activity streams at once")
        subscription = Subscription(self, accepts, size)
        self._subscribers = (*self._subscribers, subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscription)

    def close(self) -> None:
        for subscription in self._subscribers:
            subscription.close()


async def sse(
    subscription: Subscription, *, heartbeat: float = 15.0, stopping: asyncio.Event | None = None
) -> AsyncIterator[bytes]:
    """Server-sent events: ``event: request`` with the JSON event, a comment every
    ``heartbeat`` seconds (keeps proxies from closing an idle stream), ``event:
    dropped`` when the subscriber fell behind."""
    import orjson

    with subscription:
        yield b": connected\n\n"
        reported = 0
        seq = 0
        while stopping is None or not stopping.is_set():
            record = await subscription.next(heartbeat)
            if record is None:
                return
            if subscription.dropped != reported:
                lost = subscription.dropped - reported
                reported = subscription.dropped
                yield b"event: dropped\ndata: " + orjson.dumps({"dropped": lost}) + b"\n\n"
            if record is False:
                yield b": keepalive\n\n"
                continue
            assert isinstance(record, UsageRecord)
            seq += 1
            yield (
                f"id: {seq}\nevent: request\n".encode()
                + b"data: "
                + orjson.dumps(event_of(record))
                + b"\n\n"
            )
