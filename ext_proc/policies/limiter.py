"""The rate/token limiting algorithm: GCRA on plain numbers, no I/O, no clock.

GCRA (generic cell rate algorithm) is a token bucket of capacity ``limit`` refilled
continuously at ``limit / window`` units per second, stored as a single number: the
theoretical arrival time (TAT), the moment the bucket would be full again. We use it
rather than fixed or sliding windows because:

- state is O(1) per key: one float, so a Redis key is one short string that expires
  by itself when the bucket is full (idle keys vanish);
- it is exact under concurrency when each step runs atomically (one Lua script);
- there is no double burst at window boundaries (a fixed window lets 2N through
  across the edge; GCRA never lets more than N pass in any span of ``window``);
- OpenAI's rate-limit headers fall straight out of it: ``remaining`` is how many units
  could pass now, ``reset`` is the time until the bucket is full again (TAT - now) and
  ``retry-after`` is the time until this request's cost would fit.

Costs are weighted: a request costs 1 against a ``rate_limit``; a ``token_limit``
reservation costs its estimated tokens, settled afterwards with :func:`adjust` (which
may push the bucket "into debt" when real usage exceeds the reservation: allowed, later
requests just wait longer).

With emission interval ``T = window / limit``, a request of ``cost`` passes iff
``max(TAT, now) + cost * T - now <= window`` and then sets ``TAT`` to that sum. From a
fresh bucket N unit requests pass, the N+1st is told to retry in T, and ``remaining``
counts N-1, ..., 0. A cost above ``limit`` can never fit and is denied with
``retry_after=None``.

**Calendar periods.** A budget counted per UTC day or month (``period: month``) is not a
rolling window but a fixed one: a plain counter of the units used in the period, whose
key names the period (``...:2026-12``) and expires when it ends, so the next period
starts at zero. A spec with ``period_left`` set is one of those; :func:`acquire_fixed`
and :func:`adjust_fixed` are its arithmetic (a request passes iff ``used + cost <=
limit``; ``retry_after`` is the time left in the period). Settling may push the counter
past the limit (debt, as with GCRA) and never below zero.

``ext_proc.stores.redis_limits`` runs the very same arithmetic in Lua (same operations
in the same order, so the same doubles come out; it reports durations in whole
microseconds); the tests hold the two together.
Time values are seconds as floats in whatever time base the caller uses (Redis server
time there, ``time.monotonic()`` for the in-process fallback).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Tolerance, in seconds, on the "does it fit" comparison, so that rounding cannot deny
# the Nth of N requests. Precision: Redis keeps the TAT as Unix time (~1.7e9 s), where a
# double resolves ~0.24 µs, so each store may be off by 0.12 µs. In real traffic the
# clock moves between calls by far more than that, and the enforced rate is off by at
# most 0.12 µs / interval (0.012% at 1000 requests/s on one key; nothing measurable at
# LLM rates). With a frozen clock the rounding accumulates; 1 µs absorbs a handful of
# stores at Unix magnitudes and any realistic burst at small ones (tests, the monotonic
# clock of the in-process fallback). 1 µs is also far below any emission interval we
# expect: it takes over a million units/s on one key before it can admit an extra
# unit. The Lua script embeds this same constant.
SLACK = 1e-6

ON_ERROR_DENY = "deny"


@dataclass(frozen=True, slots=True)
class LimitResult:
    """One limit's answer, ready for the ``x-ratelimit-*`` and ``retry-after`` headers.

    ``retry_after`` is 0.0 for an allowed request, the seconds until the cost would fit
    for a denied one, and ``None`` when it never can (cost above the limit, or the
    limit could not be checked at all: ``source="unavailable"``). ``source`` says who
    decided: ``"redis"`` (shared across replicas), ``"local"`` (this process only) or
    ``"unavailable"`` (the store was down and the policy fails closed).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float | None
    source: str = "redis"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit to check: its fully qualified key, its size and this request's cost.

    ``on_error`` is the policy's choice when the shared store is unavailable:
    ``"allow"`` (decide with the in-process limiter) or ``"deny"`` (answer 503).
    ``cost`` is >= 0 (0 reads the state without consuming).
    """

    key: str
    limit: int
    window: float  # seconds
    cost: int
    policy: str
    on_error: str
    # Set for a calendar-period counter (see the module docstring): the seconds until
    # its period ends (<= 0: it has ended, nothing is charged to it any more).
    period_left: float | None = None


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """The outcome of checking several limits (and cooldowns) as one all-or-nothing step.

    ``allowed`` is True only when every limit allowed and no cooldown is active; then
    every limit consumed its cost. Otherwise nothing consumed anything, and ``results``
    show the untouched state (each result's ``allowed`` says whether that limit alone
    would have passed, so the caller can name the one that denied).
    ``cooldown_key`` is the active cooldown with the longest time left, if any.
    """

    results: tuple[LimitResult, ...]
    allowed: bool
    cooldown_remaining: float = 0.0
    cooldown_key: str | None = None


def remaining_units(used: float, window: float, interval: float, limit: int) -> int:
    """Whole units that fit now when the bucket is ``used`` seconds from full."""
    units = math.floor((window - used + SLACK) / interval)
    if units < 0:
        return 0
    return limit if units > limit else units


def peek(
    tat: float | None, now: float, limit: int, window: float, *, source: str = "local"
) -> LimitResult:
    """The current state, consuming nothing (as an allowed zero-cost request sees it)."""
    return acquire(tat, now, limit, window, 0, source=source)[0]


def acquire(
    tat: float | None,
    now: float,
    limit: int,
    window: float,
    cost: int,
    *,
    source: str = "local",
) -> tuple[LimitResult, float | None]:
    """Try to take ``cost`` units; return the result and the new TAT (None: unchanged).

    ``tat`` is None for a key never seen or expired (a full bucket).
    """
    interval = window / limit
    base = now if tat is None or tat < now else tat
    used = base - now
    if cost > limit:
        rem = remaining_units(used, window, interval, limit)
        return LimitResult(False, limit, rem, used, None, source), None
    new_tat = base + cost * interval
    after = new_tat - now
    if after > window + SLACK:
        rem = remaining_units(used, window, interval, limit)
        return LimitResult(False, limit, rem, used, after - window, source), None
    rem = remaining_units(after, window, interval, limit)
    return LimitResult(True, limit, rem, after, 0.0, source), (new_tat if cost > 0 else None)


def adjust(tat: float | None, now: float, limit: int, window: float, delta: int) -> float:
    """Settle a reservation: consume ``delta`` more units (> 0, no limit check, may go into
    debt) or refund ``-delta`` (< 0, the TAT moves back but never before ``now``).

    Returns the new TAT; a value equal to ``now`` means the bucket is full (the key
    can be dropped).
    """
    interval = window / limit
    base = now if tat is None or tat < now else tat
    new_tat = base + delta * interval
    return now if new_tat < now else new_tat


def fixed_left(spec: LimitSpec) -> float:
    """The seconds a calendar-period counter still lives, as the stores use it: at least
    1 ms (a request at the very end of its period is still counted in it)."""
    left = spec.period_left or 0.0
    return left if left > 0.001 else 0.001


def acquire_fixed(
    used: float | None, limit: int, cost: int, left: float, *, source: str = "local"
) -> tuple[LimitResult, float | None]:
    """Try to take ``cost`` units from a period counter holding ``used`` (None: nothing
    used yet) that resets in ``left`` seconds; the result and the new count (None:
    unchanged)."""
    base = 0.0 if used is None else used
    if cost > limit:
        return LimitResult(False, limit, _units_left(limit, base), left, None, source), None
    after = base + cost
    if after > limit:
        return LimitResult(False, limit, _units_left(limit, base), left, left, source), None
    result = LimitResult(True, limit, _units_left(limit, after), left, 0.0, source)
    return result, (after if cost > 0 else None)


def adjust_fixed(used: float | None, delta: int) -> float:
    """Settle on a period counter: the new count (past the limit is allowed, below zero
    is not); 0 means nothing is used (the key can be dropped)."""
    after = (0.0 if used is None else used) + delta
    return after if after > 0 else 0.0


def _units_left(limit: int, used: float) -> int:
    return int(limit - used) if used < limit else 0


def acquire_all(
    state: Mapping[str, float],
    now: float,
    specs: Sequence[LimitSpec],
    *,
    blocked: bool = False,
    source: str = "local",
) -> tuple[tuple[LimitResult, ...], dict[str, float] | None]:
    """All-or-nothing over several limits: the results and the TATs to store (None when
    nothing may be consumed: a limit denied, or ``blocked`` by an active cooldown).

    ``state`` maps key -> TAT (missing = full bucket), or for a calendar-period spec key
    -> units used in the period (missing = none). A key listed twice is charged twice
    (the second check sees the first one's pending charge).
    """
    pending: dict[str, float] = {}
    ok = not blocked
    attempts: list[tuple[LimitResult, float | None]] = []
    for spec in specs:
        key = spec.key
        tat = pending[key] if key in pending else state.get(key)
        if spec.period_left is None:
            result, new_tat = acquire(tat, now, spec.limit, spec.window, spec.cost, source=source)
        else:  # ``tat`` is the period's count here
            result, new_tat = acquire_fixed(
                tat, spec.limit, spec.cost, fixed_left(spec), source=source
            )
        if not result.allowed:
            ok = False
        elif new_tat is not None:
            pending[key] = new_tat
        attempts.append((result, tat))
    if ok:
        return tuple(result for result, _ in attempts), pending
    # Nothing is consumed: report the untouched state, keeping who would have denied.
    results = []
    for spec, (result, tat) in zip(specs, attempts, strict=True):
        if result.allowed:
            if spec.period_left is None:
                result = peek(tat, now, spec.limit, spec.window, source=source)
            else:
                result = acquire_fixed(tat, spec.limit, 0, fixed_left(spec), source=source)[0]
        results.append(result)
    return tuple(results), None
