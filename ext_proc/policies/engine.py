"""The policy engine: which policies bind to a request, and running them phase by phase.

Built once per config version (enforcers and per-(app, environment) bindings are made
here, never per request). Per request it does at most one Redis call in the headers
phase (request limits + cooldowns) and one in the body phase (token and budget
reservations), and after the response at most one per reservation to settle, off the
response path.

Order (see ``base.py``): within a phase, plain checks run first in bound order (first
denial wins); limits are then taken together, all-or-nothing, so a refused request
never consumes a limit. Request-rate limits and cooldowns run in the headers phase.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client import Histogram

from ext_proc.config.model import GatewayConfig
from ext_proc.metrics import Metrics
from ext_proc.policies import POLICY_TYPES
from ext_proc.policies.base import Denial, Enforcer, Outcome, RequestFacts
from ext_proc.policies.custom_cel import CelEvaluationError
from ext_proc.policies.limiter import ON_ERROR_DENY, AcquireResult, LimitResult, LimitSpec
from ext_proc.policies.limits import KIND_COOLDOWN, SOURCE_UNAVAILABLE, Limits

log = logging.getLogger(__name__)

RATE_LIMITED = "rate_limit_exceeded"
COOLDOWN = "policy_cooldown"
UNAVAILABLE = "policy_unavailable"


@dataclass(frozen=True, slots=True)
class BoundPolicies:
    """The enabled policies of one (application, environment), sorted by phase."""

    header_limits: tuple[Enforcer, ...] = ()
    body_checks: tuple[Enforcer, ...] = ()
    body_limits: tuple[Enforcer, ...] = ()
    post_checks: tuple[Enforcer, ...] = ()
    cooldowns: tuple[Enforcer, ...] = ()
    model_filters: tuple[Enforcer, ...] = ()
    needs_estimate: bool = False

    @property
    def limited(self) -> bool:
        """The app has limits: its responses carry x-ratelimit-* headers."""
        return bool(self.header_limits or self.body_limits)

    @property
    def empty(self) -> bool:
        return not (
            self.header_limits
            or self.body_checks
            or self.body_limits
            or self.post_checks
            or self.cooldowns
        )

    def allows_model(self, model: str) -> bool:
        return all(f.allows_model(model) for f in self.model_filters)


NO_POLICIES = BoundPolicies()


@dataclass(slots=True)
class LimitState:
    """One request's limit results: for the x-ratelimit-* headers and the settlement."""

    requests: list[tuple[LimitSpec, LimitResult]] = field(default_factory=list)
    tokens: list[tuple[Enforcer, LimitSpec, LimitResult]] = field(default_factory=list)
    reserved: bool = False  # token reservations were taken (so they must be settled)

    @property
    def reservations(self) -> dict[str, int]:
        """Token limit -> units reserved (what ``settle`` gives back or tops up)."""
        if not self.reserved:
            return {}
        return {
            spec.policy: spec.cost
            for _, spec, result in self.tokens
            if result.source != SOURCE_UNAVAILABLE
        }


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _tightest(results: list[LimitResult]) -> LimitResult:
    return min(results, key=lambda r: (r.remaining, -r.reset_after))


class PolicyEngine:
    def __init__(self, config: GatewayConfig, limits: Limits, metrics: Metrics) -> None:
        self._config = config
        self._limits = limits
        self._metrics = metrics
        self._enforcers: dict[str, Enforcer] = {}
        self._check_timer: dict[str, Histogram] = {}
        for name, policy in config.policies.items():
            if not policy.enabled:
                continue
            factory = POLICY_TYPES[policy.type].enforcer
            if factory is None:
                raise ValueError(f"policy type {policy.type!r} has no enforcer")
            enforcer = factory(name, policy.params, policy.on_error)
            self._enforcers[name] = enforcer
            self._check_timer[name] = metrics.policy_check_duration.labels(
                policy.type, enforcer.phase
            )
        self._bound: dict[tuple[str, str], BoundPolicies] = {}
        self._limit_timer_headers = metrics.policy_check_duration.labels("limits", "headers")
        self._limit_timer_body = metrics.policy_check_duration.labels("limits", "body")

    # ------------------------------------------------------------------ binding

    def bound(self, app: str, environment: str) -> BoundPolicies:
        """The policies for an app in an environment (cached for this config version)."""
        key = (app, environment)
        found = self._bound.get(key)
        if found is None:
            found = self._bind(app, environment)
            self._bound[key] = found
        return found

    def _bind(self, app: str, environment: str) -> BoundPolicies:
        application = self._config.applications.get(app)
        if application is None:
            return NO_POLICIES
        env = application.environments.get(environment)
        names = application.policies + (env.policies if env is not None else ())
        enforcers = [self._enforcers[n] for n in names if n in self._enforcers]
        return BoundPolicies(
            header_limits=tuple(e for e in enforcers if e.is_limit and e.phase == "headers"),
            body_checks=tuple(e for e in enforcers if type(e).check is not Enforcer.check),
            body_limits=tuple(e for e in enforcers if e.is_limit and e.phase == "body"),
            post_checks=tuple(e for e in enforcers if e.has_post_check),
            cooldowns=tuple(e for e in enforcers if e.cooldown),
            model_filters=tuple(
                e for e in enforcers if type(e).allows_model is not Enforcer.allows_model
            ),
            needs_estimate=any(e.needs_estimate for e in enforcers),
        )

    def _spec(self, enforcer: Enforcer, facts: RequestFacts) -> LimitSpec:
        limit, window, scope, kind = enforcer.limit_params()
        key = self._limits.key_for(enforcer.name, scope, facts.scope_id(scope), kind)
        left: float | None = None
        period = enforcer.limit_period(facts)
        if period is not None:  # a counter per calendar period: its key names the period
            label, left = period
            key = f"{key}:{label}"
        return LimitSpec(
            key=key,
            limit=limit,
            window=window,
            cost=enforcer.limit_cost(facts),
            policy=enforcer.name,
            on_error=enforcer.on_error,
            period_left=left,
        )

    def _cooldown_key(self, enforcer: Enforcer, facts: RequestFacts) -> str:
        return self._limits.key_for(enforcer.name, "app", facts.app_id, KIND_COOLDOWN)

    # ------------------------------------------------------------------ phases

    def _cooldown_denial(
        self, bound: BoundPolicies, facts: RequestFacts, result: AcquireResult
    ) -> Denial:
        policy = next(
            (
                e.name
                for e in bound.cooldowns
                if self._cooldown_key(e, facts) == result.cooldown_key
            ),
            bound.cooldowns[0].name,
        )
        return Denial(
            policy,
            429,
            COOLDOWN,
            f"Application {facts.app_id} is blocked for "
            f"{math.ceil(result.cooldown_remaining)}s after violating policy {policy}.",
            retry_after=result.cooldown_remaining,
        )

    async def check_headers(
        self, bound: BoundPolicies, facts: RequestFacts, state: LimitState
    ) -> Denial | None:
        """Request-rate limits and cooldowns: no body needed (used when Envoy sends the
        request headers on their own, so a flood is refused before its body is read)."""
        if not bound.header_limits and not bound.cooldowns:
            return None
        specs = [self._spec(e, facts) for e in bound.header_limits]
        cooldown_keys = [self._cooldown_key(e, facts) for e in bound.cooldowns]
        started = time.perf_counter()
        result = await self._limits.acquire_many(specs, cooldown_keys)
        self._limit_timer_headers.observe(time.perf_counter() - started)
        if result.cooldown_remaining > 0:
            return self._cooldown_denial(bound, facts, result)
        state.requests = list(zip(specs, result.results, strict=True))
        if result.allowed:
            return None
        return self._limit_denial(specs, result.results, "requests")

    async def check_body(
        self,
        bound: BoundPolicies,
        facts: RequestFacts,
        state: LimitState,
        estimate: Callable[[], Awaitable[int]],
        *,
        header_checks_done: bool = True,
    ) -> Denial | None:
        """Checks on the parsed request, then the limits in one Redis call: token
        reservations, plus request rates and cooldowns when no headers phase ran them."""
        if bound.needs_estimate:
            facts.estimated_tokens = await estimate()
        for enforcer in bound.body_checks:
            started = time.perf_counter()
            try:
                denial = enforcer.check(facts)
            except CelEvaluationError as exc:
                denial = self._evaluation_failed(enforcer, exc)
            self._check_timer[enforcer.name].observe(time.perf_counter() - started)
            if denial is not None:
                return denial
        request_limits = () if header_checks_done else bound.header_limits
        cooldowns = () if header_checks_done else bound.cooldowns
        body_limits = bound.body_limits
        if body_limits and not all(e.limit_applies(facts) for e in body_limits):
            body_limits = tuple(e for e in body_limits if self._applies(e, facts))
        if not body_limits and not request_limits and not cooldowns:
            return None
        request_specs = [self._spec(e, facts) for e in request_limits]
        token_specs = [self._spec(e, facts) for e in body_limits]
        started = time.perf_counter()
        result = await self._limits.acquire_many(
            request_specs + token_specs, [self._cooldown_key(e, facts) for e in cooldowns]
        )
        self._limit_timer_body.observe(time.perf_counter() - started)
        if result.cooldown_remaining > 0:
            return self._cooldown_denial(bound, facts, result)
        split = len(request_specs)
        if request_specs:
            state.requests = list(zip(request_specs, result.results[:split], strict=True))
        state.tokens = list(zip(body_limits, token_specs, result.results[split:], strict=True))
        if not result.allowed:  # all-or-nothing: nothing was taken
            for specs, results, unit in (
                (request_specs, result.results[:split], "requests"),
                (token_specs, result.results[split:], "tokens"),
            ):
                if not all(r.allowed for r in results):
                    return self._limit_denial(specs, results, unit)
        state.reserved = True
        return None

    async def settle(
        self,
        bound: BoundPolicies,
        facts: RequestFacts,
        reservations: Mapping[str, int],
        outcome: Outcome,
    ) -> list[str]:
        """After the response: settle token reservations (policy -> units taken), run
        post-checks. Never raises (the limits facade absorbs Redis trouble)."""
        for name, reserved in reservations.items():
            enforcer = self._enforcers.get(name)
            if enforcer is None or not enforcer.is_limit:
                continue  # the policy went away with a config change: nothing to settle
            delta = enforcer.settle_delta(reserved, outcome)
            if delta:
                # (A calendar-period spec is rebuilt from the request's start, so it names
                # the period the reservation was taken in.)
                spec = replace(self._spec(enforcer, facts), cost=reserved)
                await self._limits.adjust(spec, delta)
        violations: list[str] = []
        for enforcer in bound.post_checks:
            try:
                violated = enforcer.post_check(facts, outcome)
            except CelEvaluationError as exc:
                log.warning("post-check not evaluated: %s", exc)
                self._metrics.policy_fallbacks.labels(enforcer.name, "post_check_error").inc()
                continue
            if not violated:
                continue
            violations.append(enforcer.name)
            self._metrics.policy_violations.labels(enforcer.name).inc()
            if enforcer.cooldown:
                await self._limits.set_cooldown(
                    self._cooldown_key(enforcer, facts), enforcer.cooldown
                )
        return violations

    def _applies(self, enforcer: Enforcer, facts: RequestFacts) -> bool:
        if enforcer.limit_applies(facts):
            return True
        # Passes uncharged (a budget and a model without a price): counted, so it shows.
        self._metrics.policy_fallbacks.labels(enforcer.name, "uncharged").inc()
        return False

    # ---------------------------------------------------------------- answers

    def _evaluation_failed(self, enforcer: Enforcer, exc: Exception) -> Denial | None:
        if enforcer.on_error == ON_ERROR_DENY:
            self._metrics.policy_fallbacks.labels(enforcer.name, "deny").inc()
            return Denial(
                enforcer.name,
                503,
                UNAVAILABLE,
                f"Policy {enforcer.name} could not be evaluated and fails closed.",
            )
        log.warning("%s; on_error: allow lets the request through", exc)
        self._metrics.policy_fallbacks.labels(enforcer.name, "allow").inc()
        return None

    def _limit_denial(
        self,
        specs: list[LimitSpec],
        results: tuple[LimitResult, ...] | list[LimitResult],
        unit: str,
    ) -> Denial:
        for spec, result in zip(specs, results, strict=True):
            if result.source == SOURCE_UNAVAILABLE:
                return Denial(
                    spec.policy,
                    503,
                    UNAVAILABLE,
                    f"Limits are unavailable (Redis) and policy {spec.policy} fails "
                    "closed (on_error: deny). Retry shortly.",
                )
        for spec, result in zip(specs, results, strict=True):
            if result.allowed:
                continue
            enforcer = self._enforcers.get(spec.policy)
            own = enforcer.limit_denial(spec, result) if enforcer is not None else None
            if own is not None:
                return own
            if result.retry_after is None:
                return Denial(
                    spec.policy,
                    429,
                    RATE_LIMITED,
                    f"Request too large for policy {spec.policy}: it needs {spec.cost} "
                    f"{unit}, the limit is {spec.limit} per {spec.window:g}s.",
                )
            return Denial(
                spec.policy,
                429,
                RATE_LIMITED,
                f"Rate limit reached for {unit} (policy {spec.policy}): limit "
                f"{spec.limit} per {spec.window:g}s. Retry in "
                f"{format_reset(result.retry_after)}.",
                retry_after=result.retry_after,
            )
        raise AssertionError("a denied limit result was expected")

    @staticmethod
    def response_headers(state: LimitState) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers from this request's limit results."""
        headers: list[tuple[str, str]] = []
        if state.requests:
            r = _tightest([res for _, res in state.requests])
            headers += [
                ("x-ratelimit-limit-requests", str(r.limit)),
                ("x-ratelimit-remaining-requests", str(max(0, r.remaining))),
                ("x-ratelimit-reset-requests", format_reset(r.reset_after)),
            ]
        token_results = [res for e, _, res in state.tokens if e.rate_limit_headers]
        if token_results:
            r = _tightest(token_results)
            headers += [
                ("x-ratelimit-limit-tokens", str(r.limit)),
                ("x-ratelimit-remaining-tokens", str(max(0, r.remaining))),
                ("x-ratelimit-reset-tokens", format_reset(r.reset_after)),
            ]
        return headers
