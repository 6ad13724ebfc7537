"""Redis: one client per process, short timeouts, and the circuit-breaker protocol.

The hot path never waits long on Redis: calls time out in ``DEFAULT_TIMEOUT`` and a
breaker (``ext_proc.stores.circuit``) stops calling it at all while it is failing, so
policies can apply their ``on_error`` choice at once.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis

# Per-command socket timeout: long enough for a loaded 2-core machine, short enough
# that a dead Redis costs one request 250 ms before the breaker opens.
DEFAULT_TIMEOUT = 0.25
CONNECT_TIMEOUT = 1.0


def create_redis(
    url: str, *, timeout: float = DEFAULT_TIMEOUT, max_connections: int = 64
) -> aioredis.Redis:
    """A pooled asyncio client (``redis://``, ``rediss://`` or ``unix://`` URLs)."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        max_connections=max_connections,
        health_check_interval=30,
        retry_on_timeout=False,
        decode_responses=False,
    )


class Breaker(Protocol):
    """What callers of a guarded dependency need from a circuit breaker."""

    def allow(self) -> bool:
        """True if a call may be attempted now (closed, or a half-open probe)."""
        ...

    def record_success(self) -> None: ...

    def record_failure(self) -> None: ...
