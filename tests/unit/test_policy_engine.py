"""The policy engine with the real limiter (in-process store): binding, order, answers."""

from __future__ import annotations

import pytest

from ext_proc.config.loader import parse_config
from ext_proc.metrics import Metrics
from ext_proc.policies.base import Outcome, RequestFacts
from ext_proc.policies.engine import LimitState, PolicyEngine, format_reset
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.stores.circuit import CircuitBreaker

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
models:
  gpt-4o-mini: {provider: mock, aliases: [mini]}
  gpt-4o: {provider: mock}
  text-embedding-3-small: {provider: mock}
policies:
  three-per-minute: {type: rate_limit, requests: 3, window: 60s}
  per-key: {type: rate_limit, requests: 100, window: 1h, scope: key}
  small-budget: {type: token_limit, tokens: 1000, window: 1h, default_max_tokens: 100}
  mini-only: {type: model_allowlist, models: [gpt-4o-mini, "text-*"]}
  tiny: {type: request_size, max_bytes: 500, max_messages: 2}
  short: {type: custom_cel, pre_check_expression: "estimated_tokens < 50 && !stream",
          post_check_expression: "total_tokens < 100", message: "too long", status: 400,
          cooldown: 30s}
  off: {type: rate_limit, requests: 1, window: 1h, enabled: false}
applications:
  limited: {org: acme, policies: [three-per-minute, per-key, small-budget, off]}
  checked: {org: acme, policies: [mini-only, tiny, short],
            environments: {prod: {policies: [three-per-minute]}}}
  free: {org: other}
"""


def engine() -> tuple[PolicyEngine, Metrics]:
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "t:")
    return PolicyEngine(parse_config(CONFIG), limits, metrics), metrics


def facts(app: str, **kw: object) -> RequestFacts:
    base = RequestFacts(
        request_id="r",
        key_id="key_1",
        app_id=app,
        org_id="acme",
        environment="default",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        catalog_model="gpt-4o-mini",
        message_count=1,
        request_size_bytes=100,
    )
    for k, v in kw.items():
        setattr(base, k, v)
    return base


async def estimate_10() -> int:
    return 10


def test_binding_sorts_by_phase_and_skips_disabled() -> None:
    eng, _ = engine()
    limited = eng.bound("limited", "default")
    assert [e.name for e in limited.header_limits] == ["three-per-minute", "per-key"]
    assert [e.name for e in limited.body_limits] == ["small-budget"]
    assert limited.needs_estimate and limited.limited
    checked = eng.bound("checked", "prod")
    assert [e.name for e in checked.body_checks] == ["mini-only", "tiny", "short"]
    assert [e.name for e in checked.header_limits] == ["three-per-minute"]
    assert eng.bound("checked", "default").header_limits == ()
    assert eng.bound("free", "default").empty
    assert eng.bound("no-such-app", "default").empty


async def test_rate_limit_counts_down_then_429_with_headers() -> None:
    eng, _ = engine()
    bound = eng.bound("limited", "default")
    remaining = []
    for _ in range(3):
        state = LimitState()
        assert await eng.check_headers(bound, facts("limited"), state) is None
        headers = dict(eng.response_headers(state))
        remaining.append(headers["x-ratelimit-remaining-requests"])
        assert headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    state = LimitState()
    denial = await eng.check_headers(bound, facts("limited"), state)
    assert denial is not None and denial.status == 429 and denial.policy == "three-per-minute"
    assert denial.code == "rate_limit_exceeded"
    assert denial.retry_after is not None and 0 < denial.retry_after <= 20


async def test_token_limit_reserves_settles_and_refunds() -> None:
    eng, _ = engine()
    bound = eng.bound("limited", "default")
    f = facts("limited", max_tokens=0)
    state = LimitState()
    assert await eng.check_body(bound, f, state, estimate_10) is None
    assert f.estimated_tokens == 10
    [(_, spec, result)] = state.tokens
    assert spec.cost == 110  # estimate 10 + default_max_tokens 100
    assert result.remaining == 890
    done = Outcome(200, 10, 5, 15, 5.0, 100, failed=False)
    await eng.settle(bound, f, state.reservations, done)
    state2 = LimitState()
    assert await eng.check_body(bound, facts("limited"), state2, estimate_10) is None
    assert state2.tokens[0][2].remaining == 1000 - 15 - 110  # settled to 15, not 110
    failed = Outcome(500, 0, 0, 0, 5.0, 0, failed=True)
    await eng.settle(bound, facts("limited"), state2.reservations, failed)  # refunded entirely
    state3 = LimitState()
    await eng.check_body(bound, facts("limited", max_tokens=900), state3, estimate_10)
    assert state3.tokens[0][2].remaining == 1000 - 15 - 910


async def test_token_limit_cannot_be_overshot() -> None:
    eng, _ = engine()
    bound = eng.bound("limited", "default")
    state = LimitState()
    assert await eng.check_body(bound, facts("limited", max_tokens=600), state, estimate_10) is None
    denial = await eng.check_body(
        bound, facts("limited", max_tokens=600), LimitState(), estimate_10
    )
    assert denial is not None and denial.status == 429 and denial.policy == "small-budget"
    too_big = await eng.check_body(
        bound, facts("limited", max_tokens=5000), LimitState(), estimate_10
    )
    assert too_big is not None and too_big.retry_after is None
    assert "Request too large" in too_big.message


@pytest.mark.parametrize(
    ("kw", "policy", "status", "code"),
    [
        ({"model": "gpt-4o", "catalog_model": "gpt-4o"}, "mini-only", 403, "model_not_allowed"),
        ({"request_size_bytes": 501}, "tiny", 413, "request_too_large"),
        ({"message_count": 3}, "tiny", 413, "too_many_messages"),
        ({"stream": True}, "short", 400, "policy_violation"),
    ],
)
async def test_first_denial_names_the_policy(
    kw: dict[str, object], policy: str, status: int, code: str
) -> None:
    eng, _ = engine()
    denial = await eng.check_body(
        eng.bound("checked", "default"), facts("checked", **kw), LimitState(), estimate_10
    )
    assert denial is not None
    assert (denial.policy, denial.status, denial.code) == (policy, status, code)


async def test_alias_and_pattern_pass_the_allowlist() -> None:
    eng, _ = engine()
    bound = eng.bound("checked", "default")
    for model, catalog in [
        ("mini", "gpt-4o-mini"),
        ("text-embedding-3-small", "text-embedding-3-small"),
    ]:
        assert (
            await eng.check_body(
                bound,
                facts("checked", model=model, catalog_model=catalog),
                LimitState(),
                estimate_10,
            )
            is None
        )
    assert bound.allows_model("gpt-4o-mini") and not bound.allows_model("gpt-4o")


async def test_post_check_violation_starts_cooldown() -> None:
    eng, metrics = engine()
    bound = eng.bound("checked", "default")
    f = facts("checked")
    violations = await eng.settle(bound, f, {}, Outcome(200, 90, 20, 110, 9.0, 10, False))
    assert violations == ["short"]
    assert metrics.policy_violations.labels("short")._value.get() == 1
    denial = await eng.check_headers(bound, facts("checked"), LimitState())
    assert denial is not None and denial.code == "policy_cooldown" and denial.policy == "short"
    assert denial.status == 429 and denial.retry_after is not None and denial.retry_after > 29


def test_format_reset() -> None:
    assert [format_reset(s) for s in (0, 0.02, 1, 59.2, 360, 3723)] == [
        "0s",
        "20ms",
        "1s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]


async def test_single_call_mode_takes_rates_and_tokens_together() -> None:
    """Without a headers phase, request rates, tokens and cooldowns are one Redis call,
    after the plain checks, all-or-nothing."""
    eng, _ = engine()
    bound = eng.bound("limited", "default")
    for _ in range(3):
        state = LimitState()
        assert (
            await eng.check_body(
                bound, facts("limited", max_tokens=10), state, estimate_10, header_checks_done=False
            )
            is None
        )
        assert {s.policy for s, _ in state.requests} == {"three-per-minute", "per-key"}
        assert state.reservations == {"small-budget": 20}
    state = LimitState()
    denial = await eng.check_body(
        bound, facts("limited", max_tokens=10), state, estimate_10, header_checks_done=False
    )
    assert denial is not None and denial.policy == "three-per-minute"
    assert state.reservations == {}  # refused: nothing reserved
    headers = dict(eng.response_headers(state))
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 * 20)
