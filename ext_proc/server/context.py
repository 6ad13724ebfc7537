"""What a request processor needs from its process: built once, shared by all streams.

``Runtime`` is everything derived from one version of the gateway config (catalog,
limits, policies). It is immutable; a config reload builds a new one and swaps the
reference, so a request keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import logging
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
    def submit(self, record: UsageRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    catalog: Catalog
    engine: PolicyEngine
    limits: RequestLimits = RequestLimits()


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
