"""The circuit breaker's states, its single half-open probe and its metrics, on a fake clock."""

from __future__ import annotations

import pytest

from ext_proc.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Metrics
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.redis import Breaker
from tests.metric_samples import circuit_state, dependency_up


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def breaker(clock: FakeClock, metrics: Metrics) -> CircuitBreaker:
    return CircuitBreaker("redis", metrics, failure_threshold=3, open_seconds=2.0, clock=clock)


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == CIRCUIT_OPEN


def test_implements_the_breaker_protocol(breaker: CircuitBreaker) -> None:
    protocol_user: Breaker = breaker
    assert protocol_user.allow()


def test_starts_closed_and_publishes_it(breaker: CircuitBreaker, metrics: Metrics) -> None:
    assert breaker.state == CIRCUIT_CLOSED and breaker.state_name == "closed"
    assert circuit_state(metrics) == 0
    assert dependency_up(metrics) is None  # unknown until a call ends
    assert breaker.allow()


def test_opens_after_threshold_consecutive_failures(
    breaker: CircuitBreaker, metrics: Metrics
) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CIRCUIT_CLOSED and breaker.allow()
    assert dependency_up(metrics) == 0
    breaker.record_failure()
    assert breaker.state == CIRCUIT_OPEN and breaker.state_name == "open"
    assert circuit_state(metrics) == 2
    assert not breaker.allow()
    assert breaker.openings == 1


def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker, metrics: Metrics) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert dependency_up(metrics) == 1
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CIRCUIT_CLOSED
    breaker.record_failure()
    assert breaker.state == CIRCUIT_OPEN


def test_open_refuses_until_open_seconds_then_half_open_single_probe(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    open_it(breaker)
    clock.t += 1.999
    assert not breaker.allow()
    clock.t += 0.001
    assert breaker.allow()  # the probe
    assert breaker.state == CIRCUIT_HALF_OPEN and breaker.state_name == "half-open"
    assert circuit_state(metrics) == 1
    # Exactly one probe at a time.
    assert not breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == CIRCUIT_CLOSED
    assert circuit_state(metrics) == 0 and dependency_up(metrics) == 1
    assert all(breaker.allow() for _ in range(10))


def test_failed_probe_reopens_for_another_period(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    open_it(breaker)
    clock.t += 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == CIRCUIT_OPEN and circuit_state(metrics) == 2
    assert breaker.openings == 2
    clock.t += 1.0
    assert not breaker.allow()
    clock.t += 1.0
    assert breaker.allow()
    assert breaker.state == CIRCUIT_HALF_OPEN


def test_a_lost_probe_does_not_stick_the_breaker(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    clock.t += 2.0
    assert breaker.allow()  # probe granted, its caller never reports (cancelled)
    clock.t += 1.0
    assert not breaker.allow()
    clock.t += 1.0
    assert breaker.allow()  # a new probe after open_seconds
    assert not breaker.allow()


def test_late_results_while_open_change_nothing(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    open_it(breaker)
    # Calls started before the opening finish now: neither closes nor extends it.
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state == CIRCUIT_OPEN and circuit_state(metrics) == 2
    assert breaker.openings == 1
    clock.t += 2.0
    assert breaker.allow()


def test_metrics_are_per_dependency(clock: FakeClock, metrics: Metrics) -> None:
    redis = CircuitBreaker("redis", metrics, clock=clock)
    postgres = CircuitBreaker("postgres", metrics, clock=clock)
    open_it(redis)
    postgres.record_success()
    assert circuit_state(metrics, "redis") == 2 and circuit_state(metrics, "postgres") == 0
    assert dependency_up(metrics, "redis") == 0 and dependency_up(metrics, "postgres") == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"failure_threshold": 0}, "failure_threshold"), ({"open_seconds": 0.0}, "open_seconds")],
)
def test_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("redis", Metrics(), **kwargs)  # type: ignore[arg-type]
