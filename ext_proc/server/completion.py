"""Finishing a request: one usage record, limits settled, post-checks run, metrics.

Three places finish requests — the request side for its own denials, the usage-log
reader for plain responses (usage from Envoy's ``json_to_metadata``, or the body when
Envoy could not read one), the response processor for streams and translated answers —
and all of them end here, so a record means the same whoever wrote it: the token rules
are ``_fill_tokens``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from ext_proc import logs, telemetry
from ext_proc.policies.base import Outcome
from ext_proc.server.context import Gateway
from ext_proc.server.facts import Facts
from ext_proc.tokens import estimator
from ext_proc.tokens.types import Usage
from ext_proc.usage.pricing import Price
from ext_proc.usage.record import Decision, UsageRecord

log = logging.getLogger(__name__)

# Status recorded when the app went away before any response reached it (nginx's code).
CLIENT_CLOSED_REQUEST = 499


@dataclass(slots=True)
class Ending:
    """How a request ended, as the finisher observed it."""

    status: int  # what the app received; 0 or 499 when it went away first
    latency_ms: float | None = None
    ttft_ms: float | None = None
    response_bytes: int | None = None
    partial: bool = False  # the answer was cut (client cancel, upstream reset)
    usage: Usage | None = None  # as the provider reported it
    response_model: str | None = None
    delivered_text: list[str] = field(default_factory=list)  # when usage is missing
    # The provider may have worked on the request (and bills it): it answered 2xx, timed
    # out, was cut, or the app went away after the request was sent. Its prompt counts
    # even when no usage came back. False: refused, never sent, or the provider's error.
    billable: bool = False
    attempts: int | None = None  # upstream tries (Envoy's count, retries included)
    # A model with fallbacks: each attempt's target and status (facts.ATTEMPTS_NAMESPACE)
    trail: str | None = None
    decision: Decision | None = None  # None: from the status
    error_code: str | None = None
    error_message: str | None = None
    policy: str | None = None


def new_record(facts: Facts) -> UsageRecord:
    return UsageRecord(
        request_id=facts.request_id,
        created_at=datetime.fromtimestamp(facts.started, UTC)
        if facts.started
        else datetime.now(UTC),
        org_id=facts.org_id or None,
        app_id=facts.app_id or None,
        key_id=facts.key_id or None,
        environment=facts.environment or None,
        endpoint=facts.endpoint or None,
        model=facts.model or None,
        provider=facts.provider or None,
        deployment=facts.deployment or None,
        stream=facts.stream,
        request_bytes=facts.request_bytes or None,
        estimated_prompt_tokens=facts.estimated_tokens,
    )


# Who wrote a record when Envoy's usage log had to stand in for the part of the gateway
# that owned the request (another replica, or this process before a crash): such a
# record never replaces the owner's (see ext_proc.usage.record.RECORDER_RANK).
FALLBACK_RECORDER = "access_log_fallback"


async def finish(
    gw: Gateway, facts: Facts, ending: Ending, recorded_by: str, *, settle: bool = True
) -> UsageRecord:
    """Write the request's record and settle what it reserved. Never raises.

    ``settle=False`` (fallback records): the record only; reservations, post-checks and
    request metrics belong to whoever owned the request.
    """
    gw.recorded.add(facts.request_id)  # before any await: the usage log may be read now
    if logs.ENABLED:
        logs.bind_request(facts.request_id, facts.app_id)
    span = None if telemetry.TRACER is None else telemetry.record_span(facts)
    rec = new_record(facts)
    rec.recorded_by = recorded_by
    rec.status_code = ending.status or CLIENT_CLOSED_REQUEST
    rec.latency_ms = ending.latency_ms
    rec.ttft_ms = ending.ttft_ms
    rec.response_bytes = ending.response_bytes
    rec.partial = ending.partial or rec.status_code == CLIENT_CLOSED_REQUEST
    rec.response_model = ending.response_model
    rec.attempts = ending.attempts
    rec.policy = ending.policy
    rec.error_message = ending.error_message
    status = rec.status_code
    if ending.decision is not None:
        rec.decision = ending.decision
        rec.error_code = ending.error_code
    elif status >= 400:
        rec.decision = "error"
        rec.error_code = ending.error_code or (
            "client_closed_request" if status == CLIENT_CLOSED_REQUEST else "upstream_error"
        )
    try:
        await _fill_tokens(gw, rec, facts, ending)
        rec.cost_usd = _cost(facts, rec)
        if settle and rec.decision != "denied":
            rt = gw.runtime
            bound = rt.engine.bound(facts.app_id, facts.environment) if facts.app_id else None
            if bound is not None and not bound.empty:
                outcome = Outcome(
                    status=status,
                    prompt_tokens=rec.prompt_tokens or 0,
                    completion_tokens=rec.completion_tokens or 0,
                    total_tokens=rec.total_tokens or 0,
                    latency_ms=rec.latency_ms or 0.0,
                    response_size_bytes=rec.response_bytes or 0,
                    failed=not rec.total_tokens or status >= 400,
                    cost_usd=rec.cost_usd,
                )
                violations = await rt.engine.settle(
                    bound, facts.policy_facts(), facts.reservations, outcome
                )
                rec.policy_violations = violations or None
    except Exception:  # accounting must never lose the record
        log.exception("request %s: settling failed; the record is written anyway", facts.request_id)
        gw.metrics.stream_errors.labels(kind="settle").inc()
    gw.record(rec, None if span is None else telemetry.context_of(span))
    if settle:
        observe(gw, facts, rec)
        if ending.trail and facts.targets:
            observe_attempts(gw, facts, ending.trail)
    if span is not None:
        telemetry.end_record_span(span, rec)
    return rec


async def _fill_tokens(gw: Gateway, rec: UsageRecord, facts: Facts, ending: Ending) -> None:
    """The token rules of every record, in one place (README "Usage records"):

    - reported by the provider (prompt and completion) -> exact;
    - otherwise, for a request the provider may have worked on (``Ending.billable``: it
      answered, timed out, was cut or cancelled) -> counted: the provider's prompt count
      if it gave one (Anthropic's ``message_start``), else the gateway's estimate, and
      the completion counted from what was delivered (0 if nothing), marked estimated;
    - refused by the gateway, or never worked on (the provider's own error answer, a
      connection that never opened) -> 0 tokens.
    Never "0 tokens, exact" for work a provider did; a placeholder count is never final.
    """
    usage = ending.usage
    if usage is not None:
        rec.cached_tokens = usage.cached_tokens
        rec.cache_creation_tokens = usage.cache_creation_tokens
        rec.reasoning_tokens = usage.reasoning_tokens
        if usage.prompt_tokens is not None and usage.completion_tokens is not None:
            rec.prompt_tokens = usage.prompt_tokens
            rec.completion_tokens = usage.completion_tokens
            rec.total_tokens = (
                usage.total_tokens
                if usage.total_tokens is not None
                else rec.prompt_tokens + rec.completion_tokens
            )
            return
    delivered = ending.delivered_text
    if rec.decision == "denied" or not (ending.billable or delivered):
        rec.prompt_tokens = rec.completion_tokens = rec.total_tokens = 0
        return
    reported = usage.prompt_tokens if usage is not None else None
    prompt = reported if reported is not None else facts.estimated_tokens or 0
    completion = (
        await estimator.count_texts_async(
            facts.deployment or facts.model, delivered, encoding=_encoding_of(gw, facts)
        )
        if delivered
        else 0
    )
    rec.prompt_tokens = prompt
    rec.completion_tokens = completion
    rec.total_tokens = prompt + completion
    rec.tokens_estimated = True


def _cost(facts: Facts, rec: UsageRecord) -> Decimal | None:
    """The request's cost at the price it started with (carried in its facts, so a
    price change meanwhile does not reprice it); None when its model has no price."""
    price = Price.decode(facts.price) if facts.price else None
    if price is None:
        return None
    return price.cost_usd(
        rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.cache_creation_tokens
    )


def _encoding_of(gw: Gateway, facts: Facts) -> str | None:
    """The catalog route's encoding (what the prompt was estimated in), if the model is
    still in the catalog; else None: the deployment's name decides."""
    route = gw.runtime.catalog.resolve(facts.catalog_model) if facts.catalog_model else None
    return route.encoding_name if route is not None else None


def observe(gw: Gateway, facts: Facts, rec: UsageRecord) -> None:
    m = gw.metrics
    m.requests.labels(rec.decision, rec.policy or "", str(rec.status_code or 0)).inc()
    if not facts.provider:
        return
    op, provider, model = facts.operation, facts.provider, facts.catalog_model or facts.model
    # Tracing on: the latency samples carry the request's trace id as an OpenMetrics
    # exemplar (a dashboard's latency dot links to the trace).
    exemplar = _exemplar(facts.trace_parent) if facts.trace_parent else None
    if rec.latency_ms is not None:
        error_type = "" if rec.decision == "allowed" else (rec.error_code or rec.decision)
        m.request_duration.labels(op, provider, model, error_type).observe(
            rec.latency_ms / 1000.0, exemplar
        )
    if rec.stream and rec.ttft_ms is not None:
        m.time_to_first_token.labels(op, provider, model).observe(rec.ttft_ms / 1000.0, exemplar)
    if rec.cost_usd:
        m.cost.labels(rec.org_id or "", rec.app_id or "", provider, model).inc(float(rec.cost_usd))
    response_model = rec.response_model or model
    if rec.prompt_tokens:
        m.token_usage.labels(op, provider, model, response_model, "input").observe(
            rec.prompt_tokens
        )
    if rec.completion_tokens:
        m.token_usage.labels(op, provider, model, response_model, "output").observe(
            rec.completion_tokens
        )


def _exemplar(traceparent: str) -> dict[str, str] | None:
    """``{"trace_id": ...}`` of a W3C traceparent (``00-<trace id>-<span id>-<flags>``)."""
    parts = traceparent.split("-")
    return {"trace_id": parts[1]} if len(parts) == 4 and len(parts[1]) == 32 else None


# One attempt in a trail: "<target index>:" then, if an answer came, "<status>,".
_ATTEMPT = re.compile(r"(\d+):(?:(\d{3}),)?")


def attempts_of(trail: str) -> list[tuple[str, str | None]]:
    """(target index, status or None when no answer came) of each attempt, in order."""
    return [(index, status or None) for index, status in _ATTEMPT.findall(trail)]


def _outcome(status: str | None) -> str:
    if status is None:
        return "no_response"  # timed out, reset, or the connection failed
    if status.startswith("2"):
        return "ok"
    if status == "429":
        return "429"
    return f"{status[0]}xx"


def observe_attempts(gw: Gateway, facts: Facts, trail: str) -> None:
    """Count a chained request's attempts per target and outcome."""
    targets = {target.index: target for target in facts.targets}
    model = facts.catalog_model or facts.model
    counter = gw.metrics.upstream_attempts
    for index, status in attempts_of(trail):
        target = targets.get(index)
        if target is None:
            continue
        counter.labels(model, target.provider, target.deployment, _outcome(status)).inc()
