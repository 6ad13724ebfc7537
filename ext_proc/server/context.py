"""What a request processor needs from its process: built once, shared by all streams.

``Runtime`` is everything derived from one version of the gateway config (catalog,
limits, policies). It is immutable; a config reload builds a new one and swaps the
reference, so a request keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ext_proc.auth.authenticator import Authenticator
from ext_proc.config.model import GatewayConfig
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.routing.catalog import Catalog
from ext_proc.usage.record import UsageRecord

log = logging.getLogger(__name__)

# A 1 MiB prompt plus the JSON around it passes; more gets a 413 (Envoy's listener
# buffer limit is rendered from the same number, so both sides agree).
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 + 64 * 1024


class UsageSink(Protocol):
    def submit(self, record: UsageRecord, trace: object | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    catalog: Catalog
    engine: PolicyEngine
    limits: RequestLimits = RequestLimits()


class RecentIds:
    """The last ``capacity`` request ids recorded by this process: a bounded set, O(1)
    add and lookup, the oldest dropped first. (Not a dict evicted with
    ``del d[next(iter(d))]``: once full, each such eviction scans past the deleted slots at
    the front of the dict; it cost 28 µs per add at 200,000 ids, against 0.3 µs here.)

    ``wait`` lets a reader wait for an id to be added (the usage log, for the record of a
    stream the observe-only filter counts): ``add`` wakes it at once, no polling. Event
    loop only, like every caller of ``add``."""

    __slots__ = ("_capacity", "_ids", "_order", "_waiters")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: set[str] = set()
        self._order: deque[str] = deque()
        # Ids someone waits for -> their futures; an entry lives only while they wait, so
        # this holds a few observed streams at most and is usually empty.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def add(self, request_id: str) -> None:
        ids = self._ids
        if request_id in ids:
            return
        ids.add(request_id)
        order = self._order
        order.append(request_id)
        if len(order) > self._capacity:
            ids.discard(order.popleft())
        if self._waiters:  # nobody waiting (the usual case): one truth test
            self._wake(request_id)

    def _wake(self, request_id: str) -> None:
        for future in self._waiters.pop(request_id, ()):
            if not future.done():
                future.set_result(None)

    async def wait(self, request_id: str, timeout: float) -> bool:
        """Whether ``request_id`` is added within ``timeout`` seconds: True at once when
        it already was, as soon as ``add`` hands it over otherwise; False after
        ``timeout``."""
        if request_id in self._ids:
            return True
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiters.setdefault(request_id, [])
        waiting.append(future)
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return request_id in self._ids  # handed over just as the timeout fired
        finally:
            # Woken, timed out or cancelled: this waiter's entry goes (``add`` already
            # removed it when it woke it).
            if self._waiters.get(request_id) is waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[request_id]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._order)


# Request ids remembered as "recorded here": far more than the requests whose usage-log
# lines can be waiting to be read (a few seconds' worth at thousands per second).
RECENT_RECORDS = 200_000


class Gateway:
    """Process-wide collaborators of the request processors."""

    def __init__(
        self, runtime: Runtime, usage: UsageSink, metrics: Metrics, auth: Authenticator
    ) -> None:
        self.runtime = runtime
        self.usage = usage
        self.metrics = metrics
        self.auth = auth
        self._tasks: set[asyncio.Task[Any]] = set()
        # Requests whose record this process handed to the writer. The usage log reader
        # skips their lines; a line it does not find here (another replica's request, or
        # one this process lost in a crash) becomes a fallback record.
        self.recorded = RecentIds(RECENT_RECORDS)

    def record(self, record: UsageRecord, trace: object | None = None) -> None:
        """Hand a finished request's record to the writer (never raises); ``trace``: the
        record span's context, for the write span to link to (tracing on)."""
        if trace is None:
            self.usage.submit(record)
        else:
            self.usage.submit(record, trace)
        self.recorded.add(record.request_id)

    def swap_runtime(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run work off the request path (accounting after a response), tracked so that
        shutdown can wait for it and failures are logged, never lost silently."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for in-flight background work (used at shutdown, before the usage flush)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
