"""A circuit breaker for one dependency (Redis): stop calling it while it is failing.

Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open:
``allow()`` says no at once (callers apply their fallback without waiting on a dead
socket) for ``open_seconds``. Then half-open: exactly one probe call is let through at
a time; its success closes the breaker, its failure opens it again for another
``open_seconds``. A probe whose outcome is never recorded (its caller was cancelled)
stops counting as in flight after ``open_seconds``, so the breaker cannot stick.

``allow()`` runs on every request: in the closed state it is one attribute compare.
Metrics are written only on changes: ``ext_proc_circuit_state{dependency}`` (0 closed,
1 half-open, 2 open) and ``ext_proc_dependency_up{dependency}`` (1 if the last call
answered, else 0). Single-threaded use (one asyncio event loop) is assumed: no locks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ext_proc.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Metrics

log = logging.getLogger(__name__)

_STATE_NAMES = {CIRCUIT_CLOSED: "closed", CIRCUIT_HALF_OPEN: "half-open", CIRCUIT_OPEN: "open"}


class CircuitBreaker:
    """Implements ``ext_proc.stores.redis.Breaker``."""

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_probe_started",
        "_state",
        "_state_gauge",
        "_up_gauge",
        "_up_value",
        "failure_threshold",
        "name",
        "open_seconds",
        "openings",
    )

    def __init__(
        self,
        name: str,
        metrics: Metrics,
        *,
        failure_threshold: int = 3,
        open_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if open_seconds <= 0:
            raise ValueError("open_seconds must be > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        # How many times the breaker has opened (for tests and debugging; Limits keeps
        # its own degraded flag to log once per outage).
        self.openings = 0
        self._clock = clock
        self._state = CIRCUIT_CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None  # a half-open probe is in flight
        self._state_gauge = metrics.circuit_state.labels(name)
        # dependency_up has no sample until the first call ends (0 would claim "down").
        self._up_gauge = metrics.dependency_up
        self._up_value: int | None = None
        self._state_gauge.set(CIRCUIT_CLOSED)

    @property
    def state(self) -> int:
        """``CIRCUIT_CLOSED`` (0), ``CIRCUIT_HALF_OPEN`` (1) or ``CIRCUIT_OPEN`` (2)."""
        return self._state

    @property
    def state_name(self) -> str:
        return _STATE_NAMES[self._state]

    def allow(self) -> bool:
        state = self._state
        if state == CIRCUIT_CLOSED:
            return True
        now = self._clock()
        if state == CIRCUIT_OPEN:
            if now - self._opened_at < self.open_seconds:
                return False
            self._set_state(CIRCUIT_HALF_OPEN)
            self._probe_started = now
            return True
        # Half-open: one probe at a time (a lost probe expires after open_seconds).
        started = self._probe_started
        if started is not None and now - started < self.open_seconds:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        self._failures = 0
        if self._up_value != 1:
            self._up_value = 1
            self._up_gauge.labels(self.name).set(1)
        if self._state == CIRCUIT_HALF_OPEN:
            self._probe_started = None
            self._set_state(CIRCUIT_CLOSED)
            log.info("%s circuit closed: the dependency answers again", self.name)
        # A success while open comes from a call started before the opening: stale, the
        # half-open probe decides.

    def record_failure(self) -> None:
        if self._up_value != 0:
            self._up_value = 0
            self._up_gauge.labels(self.name).set(0)
        state = self._state
        if state == CIRCUIT_OPEN:
            return  # late failures of calls started before the opening
        if state == CIRCUIT_HALF_OPEN:
            self._open()
            # Still down: said once when it opened, not every open_seconds.
            log.debug("%s circuit re-opened: the half-open probe failed", self.name)
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()
            log.warning(
                "%s circuit opened after %d consecutive failures: not calling it for %.1f s",
                self.name,
                self.failure_threshold,
                self.open_seconds,
            )

    def _open(self) -> None:
        self._failures = 0
        self._probe_started = None
        self._opened_at = self._clock()
        self.openings += 1
        self._set_state(CIRCUIT_OPEN)

    def _set_state(self, state: int) -> None:
        self._state = state
        self._state_gauge.set(state)
