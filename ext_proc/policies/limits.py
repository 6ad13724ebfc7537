"""The limits facade the policy engine calls: Redis when it answers, a fallback when not.

``Limits.acquire_many`` is one Redis round trip for all of a request's limits and
cooldowns (``RedisLimits``). When the circuit breaker is open, or the call fails or
times out (the client's socket timeout bounds the wait; the failure is recorded on the
breaker, which opens after a few and then answers at once), each limit falls back by
its policy's ``on_error``:

- ``"allow"``: decided by the in-process ``LocalLimits`` (``source="local"``; limits
  are then per replica), counted in ``ext_proc_policy_fallback_total{action="local"}``;
- ``"deny"``: ``allowed=False, source="unavailable"`` and the caller answers 503,
  counted with ``action="deny"``.

Cooldowns fall back to the local ones. ``adjust`` (settling a token reservation) and
``set_cooldown`` are best effort: on a Redis failure they apply locally, warn once per
breaker opening, and never raise. A reservation taken in Redis and settled locally
(or the reverse) is not reconciled: the fallback is approximate by design.

Keys: ``key_for(policy, scope, scope_id, kind)`` =
``f"{prefix}lim:{kind}:{policy}:{scope}:{scope_id}"``, e.g.
``gw:lim:requests:sixty-per-minute:app:42``. ``kind`` is ``"requests"`` (rate_limit
buckets), ``"tokens"`` (token_limit buckets) or ``"cooldown"`` (post-check cooldowns);
``scope`` is ``app``, ``key`` or ``org`` and ``scope_id`` that entity's id. Renaming a
policy therefore starts it with fresh buckets; changing its numbers keeps the bucket
(the stored TAT is read with the new limit and window).

Without Redis configured (``redis_limits=None``) every limit is decided locally; that
is the deployment's choice, not a fallback, so no fallback metric is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from ext_proc.metrics import Metrics
from ext_proc.policies.limiter import ON_ERROR_DENY, AcquireResult, LimitResult, LimitSpec
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.redis_limits import RedisLimits

log = logging.getLogger(__name__)

KIND_REQUESTS = "requests"
KIND_COOLDOWN = "cooldown"

# LimitResult.source when a limit could not be checked and its policy fails closed.
SOURCE_UNAVAILABLE = "unavailable"

# What a failed Redis call raises: the client's errors (connection, timeout, script
# errors) and the OS's (refused, reset, timed out).
_REDIS_ERRORS = (RedisError, OSError)

_NOTHING_TO_CHECK = AcquireResult(results=(), allowed=True)


class Limits:
    def __init__(
        self,
        redis_limits: RedisLimits | None,
        local: LocalLimits,
        breaker: CircuitBreaker,
        metrics: Metrics,
        prefix: str,
    ) -> None:
        self._redis = redis_limits
        self._local = local
        self._breaker = breaker
        self._fallbacks = metrics.policy_fallbacks
        self._fallback_children: dict[tuple[str, str], Any] = {}  # bounded by policies x 2
        self._prefix = prefix
        # True from the first failed Redis call until one succeeds again: the outage has
        # been logged (once, not per call).
        self._degraded = False

    def key_for(self, policy: str, scope: str, scope_id: str, kind: str) -> str:
        """The Redis key of one bucket or cooldown (see the module docstring)."""
        return f"{self._prefix}lim:{kind}:{policy}:{scope}:{scope_id}"

    async def acquire_many(
        self, specs: Sequence[LimitSpec], cooldown_keys: Sequence[str] = ()
    ) -> AcquireResult:
        """Take every spec's cost, all or nothing, unless a cooldown is active."""
        if not specs and not cooldown_keys:
            return _NOTHING_TO_CHECK
        redis = self._redis
        if redis is None:
            return self._local.acquire_many_now(specs, cooldown_keys)
        breaker = self._breaker
        if breaker.allow():
            try:
                result = await redis.acquire_many(specs, cooldown_keys)
            except _REDIS_ERRORS as exc:
                breaker.record_failure()
                self._warn_once("acquire", exc)
            else:
                breaker.record_success()
                if self._degraded:
                    self._recovered()
                return result
        return self._fallback(specs, cooldown_keys)

    async def adjust(self, spec: LimitSpec, delta: int) -> None:
        """Settle a reservation: consume ``delta`` more (> 0) or refund (< 0). Never raises."""
        if delta == 0:
            return
        redis = self._redis
        if redis is not None and self._breaker.allow():
            try:
                await redis.adjust(spec, delta)
            except Exception as exc:  # best effort: applied locally below
                self._record_best_effort_failure("adjust", exc)
            else:
                self._breaker.record_success()
                if self._degraded:
                    self._recovered()
                return
        self._local.adjust_now(spec, delta)

    async def set_cooldown(self, key: str, seconds: float) -> None:
        """Block ``key`` for ``seconds`` (extends, never shortens). Never raises."""
        redis = self._redis
        if redis is not None and self._breaker.allow():
            try:
                await redis.set_cooldown(key, seconds)
            except Exception as exc:  # best effort: applied locally below
                self._record_best_effort_failure("set_cooldown", exc)
            else:
                self._breaker.record_success()
                if self._degraded:
                    self._recovered()
                return
        self._local.set_cooldown_now(key, seconds)

    def _fallback(self, specs: Sequence[LimitSpec], cooldown_keys: Sequence[str]) -> AcquireResult:
        denied = [spec for spec in specs if spec.on_error == ON_ERROR_DENY]
        if not denied:
            for spec in specs:
                self._count(spec.policy, "local")
            return self._local.acquire_many_now(specs, cooldown_keys)
        # Fail closed for these: nothing is consumed locally either (all or nothing), the
        # other limits are only read so the results stay complete.
        local_specs = [spec for spec in specs if spec.on_error != ON_ERROR_DENY]
        local = self._local.acquire_many_now(local_specs, cooldown_keys, blocked=True)
        local_results = iter(local.results)
        results: list[LimitResult] = []
        for spec in specs:
            if spec.on_error == ON_ERROR_DENY:
                self._count(spec.policy, "deny")
                results.append(LimitResult(False, spec.limit, 0, 0.0, None, SOURCE_UNAVAILABLE))
            else:
                self._count(spec.policy, "local")
                results.append(next(local_results))
        return AcquireResult(
            results=tuple(results),
            allowed=False,
            cooldown_remaining=local.cooldown_remaining,
            cooldown_key=local.cooldown_key,
        )

    def _count(self, policy: str, action: str) -> None:
        child = self._fallback_children.get((policy, action))
        if child is None:
            child = self._fallbacks.labels(policy, action)
            self._fallback_children[(policy, action)] = child
        child.inc()

    def _record_best_effort_failure(self, operation: str, exc: Exception) -> None:
        self._breaker.record_failure()
        if isinstance(exc, _REDIS_ERRORS):
            self._warn_once(operation, exc)
        else:  # not an outage: a bug worth its traceback every time
            log.error("limits %s failed unexpectedly; applied locally", operation, exc_info=exc)

    def _warn_once(self, operation: str, exc: BaseException) -> None:
        """One warning per outage (from the first failure to the next success)."""
        if not self._degraded:
            self._degraded = True
            log.warning(
                "%s unavailable for limits (%s: %s: %s); using the fallback until it answers",
                self._breaker.name,
                operation,
                type(exc).__name__,
                exc,
            )

    def _recovered(self) -> None:
        self._degraded = False
        log.info("%s answers limit calls again", self._breaker.name)
