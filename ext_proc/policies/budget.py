"""``budget``: at most ``usd`` dollars per rolling ``window`` or per calendar ``period``
(UTC day or month), counted per app, key or org.

Like ``token_limit``, a budget reserves before the call and settles after it, in the one
all-or-nothing Redis call of the request's limits:

- before: the estimated cost, i.e. the prompt estimate at the input price plus the
  completion the request may produce (its ``max_tokens``, else ``default_max_tokens``;
  nothing for embeddings) at the output price;
- after: the real cost, which is the usage row's ``cost_usd`` (so the budget spends
  exactly what the ledger says), or the whole reservation back when the call failed
  without a cost (a provider error, nothing generated). A stream cut after delivering
  tokens has a cost, and is charged it: the provider bills it.

The limit counts integer nano-dollars (1e-9 USD): costs are exact to 1e-10, and a
nano-dollar unit keeps even a ten-token embedding from rounding to nothing, while a
budget of up to $1,000,000 (1e15 units) stays exact in the doubles Lua computes with.
Amounts are rounded up to the next unit (a request is never charged less than it costs).

A rolling ``window`` is a GCRA bucket like the other limits. A calendar ``period`` is a
counter per period (its key ends in ``:2026-12`` or ``:2026-12-07``) that expires when
the period ends; a request is counted in the period it arrived in, also when it is
settled after midnight.

A model without a price (not in the file, not in the public table): with
``unpriced: allow`` (the default) the request passes uncharged, counted in
``ext_proc_policy_fallback_total{policy, action="uncharged"}``, and its row has
``cost_usd`` NULL; with ``unpriced: deny`` it is refused (403 ``model_not_priced``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ext_proc.config.fields import IntRange, IsAmount, IsDuration, OneOf, fail_at
from ext_proc.policies.base import (
    SCOPES,
    Denial,
    Enforcer,
    Outcome,
    PolicyParams,
    PolicySpec,
    PolicyType,
    RequestFacts,
    Scope,
)
from ext_proc.policies.limiter import LimitResult, LimitSpec
from ext_proc.usage.pricing import cost_usd

BUDGET_EXCEEDED = "budget_exceeded"
MODEL_NOT_PRICED = "model_not_priced"
DEFAULT_MAX_TOKENS = 4096
UNITS_PER_USD = 1_000_000_000  # the limit's unit: nano-dollars
MAX_USD = Decimal(1_000_000)
USD_PLACES = 6  # a micro-dollar: finer budgets mean nothing

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
Unpriced = Literal["allow", "deny"]
UNPRICED_CHOICES: tuple[Unpriced, ...] = ("allow", "deny")
# A period's nominal length, the limit's `window` (its counter ignores it: it ends with
# the period, whatever its length).
_PERIOD_SECONDS: dict[str, float] = {"day": 86400.0, "month": 31 * 86400.0}


@dataclass(frozen=True, slots=True)
class BudgetParams(PolicyParams):
    usd: Decimal
    window: float | None = None  # seconds of a rolling window, or
    period: Period | None = None  # a calendar period in UTC (exactly one of the two)
    scope: Scope = "app"
    # Completion tokens reserved (at the output price) for a request that sets no max_tokens.
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    unpriced: Unpriced = "allow"  # a model without a price: pass uncharged, or refuse

    @property
    def units(self) -> int:
        return usd_units(self.usd)


def usd_units(amount: Decimal) -> int:
    """Dollars as whole nano-dollars, rounded up."""
    return int((amount * UNITS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def period_bounds(period: Period, moment: float) -> tuple[str, float]:
    """The UTC ``period`` holding the epoch time ``moment``: its label (``2026-12-07`` or
    ``2026-12``) and the epoch time it ends."""
    at = datetime.fromtimestamp(moment, UTC)
    if period == "day":
        start = datetime(at.year, at.month, at.day, tzinfo=UTC)
        return start.strftime("%Y-%m-%d"), (start + timedelta(days=1)).timestamp()
    end = (
        datetime(at.year + 1, 1, 1, tzinfo=UTC)
        if at.month == 12
        else datetime(at.year, at.month + 1, 1, tzinfo=UTC)
    )
    return f"{at.year:04d}-{at.month:02d}", end.timestamp()


class BudgetSpec(PolicySpec):
    """``{type: budget, usd: 50, window: 30d | period: day|month, scope: app}``"""

    type: Literal["budget"]
    usd: Annotated[Decimal, IsAmount(positive=True, maximum=MAX_USD, places=USD_PLACES)] = Field(
        description="dollars per window or period"
    )
    window: Annotated[float, IsDuration()] | None = Field(
        None, description="a rolling window (or period)"
    )
    period: Annotated[str, OneOf(PERIODS)] | None = Field(
        None, description="a calendar period in UTC"
    )
    scope: Annotated[str, OneOf(SCOPES)] = Field(
        "app", description="whose counter: app, key or org"
    )
    default_max_tokens: Annotated[int, IntRange(1)] = Field(
        DEFAULT_MAX_TOKENS,
        description="completion tokens reserved (at the output price) when a request sets "
        "no max_tokens",
    )
    unpriced: Annotated[str, OneOf(UNPRICED_CHOICES)] = Field(
        "allow", description="a model without a price: pass uncharged, or deny"
    )

    @model_validator(mode="after")
    def _window_or_period(self) -> BudgetSpec:
        if self.window is not None and self.period is not None:
            fail_at(
                "period",
                "set either window (a rolling window) or period (day or month), not both",
            )
        if self.window is None and self.period is None:
            fail_at(
                None,
                "missing 'window' (a rolling window such as 30d) or 'period' (day or month, "
                "in UTC)",
            )
        return self

    def params(self, name: str) -> BudgetParams:
        return BudgetParams(
            usd=self.usd,
            window=self.window,
            period=self.period,  # type: ignore[arg-type]
            scope=self.scope,  # type: ignore[arg-type]
            default_max_tokens=self.default_max_tokens,
            unpriced=self.unpriced,  # type: ignore[arg-type]
        )


class BudgetEnforcer(Enforcer):
    """Reserve the estimated cost before the call, settle to the real cost after."""

    phase = "body"
    is_limit = True
    needs_estimate = True
    rate_limit_headers = False  # dollars are not tokens: no x-ratelimit-* from a budget

    def __init__(self, name: str, params: BudgetParams, on_error: str) -> None:
        super().__init__(name, on_error)
        self.params = params
        self._units = params.units
        self._window = (
            params.window
            if params.window is not None
            else _PERIOD_SECONDS[params.period or "month"]
        )

    # --- checks and limit ------------------------------------------------------------

    def check(self, facts: RequestFacts) -> Denial | None:
        if facts.price is None and self.params.unpriced == "deny":
            return Denial(
                self.name,
                403,
                MODEL_NOT_PRICED,
                f"Model {facts.model!r} has no price, and budget {self.name} refuses "
                "models without one (unpriced: deny).",
            )
        return None

    def limit_applies(self, facts: RequestFacts) -> bool:
        return facts.price is not None

    def limit_cost(self, facts: RequestFacts) -> int:
        price = facts.price
        if price is None:
            return 0
        completion = 0
        if facts.generates:
            completion = facts.max_tokens or self.params.default_max_tokens
        return usd_units(cost_usd(price, facts.estimated_tokens, completion))

    def limit_params(self) -> tuple[int, float, Scope, str]:
        return self._units, self._window, self.params.scope, "budget"

    def limit_period(self, facts: RequestFacts) -> tuple[str, float] | None:
        period = self.params.period
        if period is None:
            return None
        now = time.time()
        label, end = period_bounds(period, facts.started or now)
        return label, end - now

    def settle_delta(self, reserved: int, outcome: Outcome) -> int:
        if outcome.cost_usd is None:
            # No cost known (cannot happen for a priced model): give back on failure,
            # else keep the reservation (never charge less than may have been spent).
            return -reserved if outcome.failed else 0
        return usd_units(outcome.cost_usd) - reserved

    # --- the answer ------------------------------------------------------------------

    def limit_denial(self, spec: LimitSpec, result: LimitResult) -> Denial | None:
        span = self._span()
        if result.retry_after is None:
            return Denial(
                self.name,
                429,
                BUDGET_EXCEEDED,
                f"This request's estimated cost (${_usd(spec.cost)}) is more than budget "
                f"{self.name} allows (${self.params.usd} per {span}); lower max_tokens.",
            )
        retry = result.retry_after
        return Denial(
            self.name,
            429,
            BUDGET_EXCEEDED,
            f"Budget {self.name} is spent (${self.params.usd} per {span}; this request "
            f"needs up to ${_usd(spec.cost)}). Retry in {_duration(retry)}.",
            retry_after=retry,
        )

    def _span(self) -> str:
        if self.params.period is not None:
            return f"{self.params.period} (UTC)"
        return _duration(self._window)


def _usd(units: int) -> str:
    return f"{Decimal(units) / UNITS_PER_USD:f}"


def _duration(seconds: float) -> str:
    whole = max(1, math.ceil(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


POLICY_TYPE = PolicyType(
    name="budget",
    params_type=BudgetParams,
    spec=BudgetSpec,
    enforcer=BudgetEnforcer,
)
