"""The ``budget`` policy: its config, the reserve / settle / refund arithmetic through the
policy engine (in-process limits), the answers a client sees, calendar periods and their
rollover, and the fixed-window counter it adds to the limiter.

No services and no real clock: wall time is patched where periods are involved."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ext_proc.config import ConfigError, ConfigIssue, parse_config
from ext_proc.metrics import Metrics
from ext_proc.policies import budget as budget_module
from ext_proc.policies import limiter
from ext_proc.policies.base import Outcome, RequestFacts
from ext_proc.policies.budget import BudgetParams, period_bounds, usd_units
from ext_proc.policies.engine import LimitState, PolicyEngine
from ext_proc.policies.limiter import LimitSpec, acquire_fixed, adjust_fixed
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.stores.catalog import specs_of
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.usage.pricing import Price

D = Decimal
PRICE = Price(input=D("1"), output=D("2"))  # $1 / $2 per million tokens

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
models:
  acme-1: {provider: mock, price: {input: 1, output: 2}}
  acme-free: {provider: mock}
policies:
  cents: {type: budget, usd: 0.01, window: 1h, default_max_tokens: 1000}
  monthly: {type: budget, usd: 0.01, period: month, scope: org}
  daily-strict: {type: budget, usd: 0.01, period: day, unpriced: deny}
  tokens: {type: token_limit, tokens: 100000, window: 1h}
  rpm: {type: rate_limit, requests: 100, window: 1m}
applications:
  spender: {org: acme, policies: [rpm, tokens, cents]}
  monthly-app: {org: acme, policies: [monthly]}
  strict: {org: acme, policies: [daily-strict]}
"""


def engine() -> tuple[PolicyEngine, Metrics]:
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "t:")
    return PolicyEngine(parse_config(CONFIG), limits, metrics), metrics


def facts(app: str, *, price: Price | None = PRICE, **kw: object) -> RequestFacts:
    base = RequestFacts(
        request_id="r",
        key_id="key_1",
        app_id=app,
        org_id="acme",
        environment="default",
        endpoint="/v1/chat/completions",
        model="acme-1",
        catalog_model="acme-1",
        message_count=1,
        max_tokens=1000,
        price=price,
    )
    for k, v in kw.items():
        setattr(base, k, v)
    return base


async def estimate_1000() -> int:
    return 1000


def done(cost: str | None, *, failed: bool = False) -> Outcome:
    return Outcome(
        200 if not failed else 502,
        0,
        0,
        0,
        1.0,
        0,
        failed=failed,
        cost_usd=None if cost is None else D(cost),
    )


def remaining_usd(state: LimitState, policy: str = "cents") -> Decimal:
    [result] = [r for e, _, r in state.tokens if e.name == policy]
    return D(result.remaining) / budget_module.UNITS_PER_USD


# ------------------------------------------------------------------------- config


def test_params_window_or_period() -> None:
    config = parse_config(CONFIG)
    cents = config.policies["cents"].params
    assert cents == BudgetParams(usd=D("0.01"), window=3600.0, default_max_tokens=1000)
    assert cents.units == 10_000_000  # nano-dollars
    monthly = config.policies["monthly"].params
    assert isinstance(monthly, BudgetParams)
    assert (monthly.period, monthly.window, monthly.scope) == ("month", None, "org")
    strict = config.policies["daily-strict"].params
    assert isinstance(strict, BudgetParams) and strict.unpriced == "deny"


def test_budget_round_trips_through_the_catalogs_json_form() -> None:
    config = parse_config(CONFIG)
    specs = specs_of(config)  # raises unless it loads back to the same fingerprint
    assert specs.policies["cents"] == {
        "type": "budget",
        "usd": 0.01,
        "window": "1h",
        "scope": "app",
        "default_max_tokens": 1000,
        "unpriced": "allow",
        "enabled": True,
        "on_error": "allow",
    }
    assert specs.policies["monthly"]["period"] == "month"
    assert "window" not in specs.policies["monthly"]


HEAD = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
models:
  m: {provider: mock}
policies:
"""


def issues(policies: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + policies, "gw.yaml")
    return list(info.value.issues)


def where(policies: str, needle: str) -> tuple[int, int]:
    text = HEAD + policies
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def key_at(policies: str, name: str) -> tuple[int, int]:
    line, column = where(policies, f"  {name}: {{")
    return line, column + 2


def test_budget_param_errors_name_the_field_and_its_position() -> None:
    policies = (
        "  a: {type: budget, window: 30d}\n"
        "  b: {type: budget, usd: 0, window: 30d}\n"
        "  c: {type: budget, usd: 5, window: 30d, period: month}\n"
        "  d: {type: budget, usd: 5}\n"
        "  e: {type: budget, usd: 5, period: week}\n"
        "  f: {type: budget, usd: 5, period: day, unpriced: maybe}\n"
        "  g: {type: budget, usd: 0.0000001, period: day}\n"
        "  h: {type: budget, usd: 2000000, period: day, scope: team}\n"
        "  i: {type: budget, usd: fifty, window: 1x}\n"
    )
    found = {(i.path, i.message): (i.line, i.column) for i in issues(policies)}
    assert found == {
        ("policies.a.usd", "missing required field 'usd'"): key_at(policies, "a"),
        ("policies.b.usd", "must be greater than 0, not 0"): where(policies, "0,"),
        (
            "policies.c.period",
            "set either window (a rolling window) or period (day or month), not both",
        ): where(policies, "month}"),
        (
            "policies.d",
            "missing 'window' (a rolling window such as 30d) or 'period' (day or month, in UTC)",
        ): key_at(policies, "d"),
        ("policies.e.period", "unknown period 'week' (known: day, month)"): where(policies, "week"),
        ("policies.f.unpriced", "unknown unpriced 'maybe' (known: allow, deny)"): where(
            policies, "maybe"
        ),
        ("policies.g.usd", "use at most 6 decimal places, not 0.0000001"): where(
            policies, "0.0000001"
        ),
        ("policies.h.usd", "must be at most 1000000, not 2000000"): where(policies, "2000000"),
        ("policies.h.scope", "unknown scope 'team' (known: app, key, org)"): where(
            policies, "team"
        ),
        ("policies.i.usd", "expected a number, got a string ('fifty')"): where(policies, "fifty"),
        (
            "policies.i.window",
            "invalid duration '1x'; use a number with a unit: ms, s, m, h or d "
            "(e.g. 500ms, 60s, 5m, 1h, 1d)",
        ): where(policies, "1x"),
    }


# ------------------------------------------------------------ reserve and settle


async def test_reserves_the_estimated_cost_then_settles_to_the_real_one() -> None:
    eng, _ = engine()
    bound = eng.bound("spender", "default")
    f = facts("spender")
    state = LimitState()
    assert await eng.check_body(bound, f, state, estimate_1000) is None
    # 1000 prompt tokens at $1/M + 1000 max_tokens at $2/M = $0.003 = 3,000,000 units.
    assert state.reservations["cents"] == 3_000_000
    assert remaining_usd(state) == D("0.007")
    # The call cost $0.0012: the reservation is settled down to it.
    await eng.settle(bound, f, state.reservations, done("0.0012"))
    state2 = LimitState()
    assert await eng.check_body(bound, facts("spender"), state2, estimate_1000) is None
    assert remaining_usd(state2) == D("0.01") - D("0.0012") - D("0.003")


async def test_refunds_everything_when_the_call_failed_without_a_cost() -> None:
    eng, _ = engine()
    bound = eng.bound("spender", "default")
    state = LimitState()
    await eng.check_body(bound, facts("spender"), state, estimate_1000)
    await eng.settle(bound, facts("spender"), state.reservations, done("0", failed=True))
    after = LimitState()
    await eng.check_body(bound, facts("spender"), after, estimate_1000)
    assert remaining_usd(after) == D("0.007")  # only this new reservation is held


async def test_a_cut_stream_is_charged_what_it_cost() -> None:
    # Failed (the provider reset mid-stream) but tokens were delivered and billed.
    eng, _ = engine()
    bound = eng.bound("spender", "default")
    state = LimitState()
    await eng.check_body(bound, facts("spender"), state, estimate_1000)
    await eng.settle(bound, facts("spender"), state.reservations, done("0.0015", failed=True))
    after = LimitState()
    await eng.check_body(bound, facts("spender"), after, estimate_1000)
    assert remaining_usd(after) == D("0.01") - D("0.0015") - D("0.003")


async def test_embeddings_reserve_only_the_prompt() -> None:
    eng, _ = engine()
    state = LimitState()
    f = facts("spender", generates=False, max_tokens=0, endpoint="/v1/embeddings")
    await eng.check_body(eng.bound("spender", "default"), f, state, estimate_1000)
    assert state.reservations["cents"] == 1_000_000  # 1000 tokens at $1/M


async def test_exhausted_budget_is_429_budget_exceeded_with_retry_after() -> None:
    eng, _ = engine()
    bound = eng.bound("spender", "default")
    for _ in range(3):  # $0.003 each: three fit in $0.01
        assert await eng.check_body(bound, facts("spender"), LimitState(), estimate_1000) is None
    state = LimitState()
    denial = await eng.check_body(bound, facts("spender"), state, estimate_1000)
    assert denial is not None
    assert (denial.status, denial.code, denial.policy) == (429, "budget_exceeded", "cents")
    # $0.009 used, $0.003 needed: it fits once $0.002 has refilled, at $0.01 per hour.
    assert denial.retry_after == pytest.approx(720.0, abs=0.01)
    assert "Budget cents is spent ($0.01 per 1h" in denial.message
    # Budgets stay out of OpenAI's x-ratelimit-* headers (they count dollars, not tokens).
    headers = dict(eng.response_headers(state))
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert "10000000" not in headers.values()
    # All or nothing: the refused request took nothing from the token limit either.
    assert headers["x-ratelimit-remaining-tokens"] == str(100000 - 3 * 2000)


async def test_a_request_costing_more_than_the_whole_budget_never_fits() -> None:
    eng, _ = engine()
    denial = await eng.check_body(
        eng.bound("spender", "default"),
        facts("spender", max_tokens=10_000),  # $0.001 + $0.02 > $0.01
        LimitState(),
        estimate_1000,
    )
    assert denial is not None and denial.code == "budget_exceeded"
    assert denial.retry_after is None and "lower max_tokens" in denial.message


async def test_unpriced_model_passes_uncharged_and_is_counted() -> None:
    eng, metrics = engine()
    bound = eng.bound("spender", "default")
    for _ in range(10):  # ten would cost $0.03 if they were priced
        state = LimitState()
        assert (
            await eng.check_body(bound, facts("spender", price=None), state, estimate_1000) is None
        )
        assert "cents" not in state.reservations and "tokens" in state.reservations
    assert metrics.policy_fallbacks.labels("cents", "uncharged")._value.get() == 10
    state = LimitState()
    await eng.check_body(bound, facts("spender"), state, estimate_1000)
    assert remaining_usd(state) == D("0.007")  # the budget is untouched by them


async def test_unpriced_deny_refuses_models_without_a_price() -> None:
    eng, _ = engine()
    denial = await eng.check_body(
        eng.bound("strict", "default"), facts("strict", price=None), LimitState(), estimate_1000
    )
    assert denial is not None
    assert (denial.status, denial.code, denial.policy) == (403, "model_not_priced", "daily-strict")
    ok = await eng.check_body(
        eng.bound("strict", "default"), facts("strict"), LimitState(), estimate_1000
    )
    assert ok is None


# -------------------------------------------------------------- calendar periods


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_period_bounds_are_utc_calendar_periods() -> None:
    assert period_bounds("month", epoch("2026-12-31T23:59:59.999")) == (
        "2026-12",
        epoch("2027-01-01T00:00:00"),
    )
    assert period_bounds("month", epoch("2027-01-01T00:00:00")) == (
        "2027-01",
        epoch("2027-02-01T00:00:00"),
    )
    assert period_bounds("month", epoch("2028-02-29T12:00:00")) == (
        "2028-02",
        epoch("2028-03-01T00:00:00"),
    )
    assert period_bounds("day", epoch("2026-03-07T23:00:00")) == (
        "2026-03-07",
        epoch("2026-03-08T00:00:00"),
    )


async def test_monthly_budget_resets_when_the_month_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    eng, _ = engine()
    bound = eng.bound("monthly-app", "default")
    now = {"t": epoch("2026-01-31T23:59:00")}
    monkeypatch.setattr(budget_module.time, "time", lambda: now["t"])

    def jan(**kw: object) -> RequestFacts:
        return facts("monthly-app", started=now["t"], **kw)

    reservations = []
    for _ in range(3):
        state = LimitState()
        assert await eng.check_body(bound, jan(), state, estimate_1000) is None
        [(_, spec, _)] = state.tokens
        assert spec.key == "t:lim:budget:monthly:org:acme:2026-01"  # scope org, the month
        assert spec.period_left == pytest.approx(60.0)
        reservations.append((jan(), state.reservations))
    denial = await eng.check_body(bound, jan(), LimitState(), estimate_1000)
    assert denial is not None and denial.code == "budget_exceeded"
    assert denial.retry_after == pytest.approx(60.0)  # until February starts
    assert "per month (UTC)" in denial.message

    # One January request settles (a refund) while January still runs: it counts there.
    first_facts, first_res = reservations[0]
    await eng.settle(bound, first_facts, first_res, done("0", failed=True))
    assert await eng.check_body(bound, jan(), LimitState(), estimate_1000) is None

    now["t"] = epoch("2026-02-01T00:00:30")
    feb = facts("monthly-app", started=now["t"])
    state = LimitState()
    assert await eng.check_body(bound, feb, state, estimate_1000) is None
    assert state.tokens[0][1].key.endswith(":2026-02")
    assert remaining_usd(state, "monthly") == D("0.007")  # a fresh month
    # A January request settled after midnight charges nothing to February.
    late_facts, late_res = reservations[1]
    await eng.settle(bound, late_facts, late_res, done("0.0029"))
    state = LimitState()
    await eng.check_body(bound, facts("monthly-app", started=now["t"]), state, estimate_1000)
    assert remaining_usd(state, "monthly") == D("0.004")


# ------------------------------------------------- the fixed-window counter itself


def test_acquire_fixed_counts_up_to_the_limit() -> None:
    ok, used = acquire_fixed(None, 10, 4, 30.0)
    assert (ok.allowed, ok.remaining, ok.reset_after, ok.retry_after, used) == (
        True,
        6,
        30.0,
        0.0,
        4.0,
    )
    ok, used = acquire_fixed(used, 10, 6, 30.0)
    assert ok.allowed and ok.remaining == 0 and used == 10.0
    denied, unchanged = acquire_fixed(used, 10, 1, 30.0)
    assert (denied.allowed, denied.remaining, denied.retry_after, unchanged) == (
        False,
        0,
        30.0,
        None,
    )
    never, _ = acquire_fixed(None, 10, 11, 30.0)
    assert not never.allowed and never.retry_after is None and never.remaining == 10
    peek, nothing = acquire_fixed(3.0, 10, 0, 5.0)
    assert peek.allowed and peek.remaining == 7 and nothing is None


def test_adjust_fixed_goes_into_debt_but_never_below_zero() -> None:
    assert adjust_fixed(10.0, 5) == 15.0  # past the limit: later requests are refused
    assert acquire_fixed(15.0, 10, 0, 1.0)[0].allowed is False
    assert adjust_fixed(10.0, -4) == 6.0
    assert adjust_fixed(3.0, -10) == 0.0
    assert adjust_fixed(None, 2) == 2.0


def test_local_limits_forget_a_period_when_it_ends() -> None:
    clock = {"t": 100.0}
    local = LocalLimits(clock=lambda: clock["t"])
    spec = LimitSpec("k:2026-01", 10, 86400.0, 7, "p", "allow", period_left=60.0)
    assert local.acquire_many_now([spec]).allowed
    assert not local.acquire_many_now([spec]).allowed  # 14 > 10
    local.adjust_now(spec, -3)  # settled: 4 used
    assert local.acquire_many_now(
        [LimitSpec("k:2026-01", 10, 86400.0, 6, "p", "allow", 59.0)]
    ).allowed
    clock["t"] += 61.0  # the period has ended: its counter is gone
    fresh = local.acquire_many_now([LimitSpec("k:2026-01", 10, 86400.0, 10, "p", "allow", 1.0)])
    assert fresh.allowed and fresh.results[0].remaining == 0
    # Settling on a period that is over changes nothing.
    local.adjust_now(LimitSpec("k:2026-01", 10, 86400.0, 0, "p", "allow", -5.0), -10)
    assert not local.acquire_many_now(
        [LimitSpec("k:2026-01", 10, 86400.0, 1, "p", "allow", 1.0)]
    ).allowed


def test_units_are_nano_dollars_rounded_up() -> None:
    assert usd_units(D("50")) == 50_000_000_000
    assert usd_units(D("0.0000000001")) == 1  # a tenth of a unit still costs one
    assert usd_units(D("0")) == 0
    # The largest budget stays exact in Lua's doubles.
    assert usd_units(budget_module.MAX_USD) < 2**53
    assert limiter.fixed_left(LimitSpec("k", 1, 1.0, 0, "p", "allow", period_left=-3.0)) == 0.001
