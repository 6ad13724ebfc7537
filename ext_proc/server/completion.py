"""Finishing a request: one usage record, limits settled, post-checks run, metrics.

Three places finish requests — the request side for its own denials, the access-log
handler for plain responses (usage from Envoy's ``json_to_metadata``), the response
processor for streams and translated answers — and all of them end here, so a record
means the same whoever wrote it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ext_proc.policies.base import Outcome
from ext_proc.server.context import Gateway
from ext_proc.server.facts import Facts
from ext_proc.tokens import estimator
from ext_proc.tokens.types import Usage
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


async def finish(gw: Gateway, facts: Facts, ending: Ending, recorded_by: str) -> UsageRecord:
    """Write the request's record and settle what it reserved. Never raises."""
    rec = new_record(facts)
    rec.recorded_by = recorded_by
    rec.status_code = ending.status or CLIENT_CLOSED_REQUEST
    rec.latency_ms = ending.latency_ms
    rec.ttft_ms = ending.ttft_ms
    rec.response_bytes = ending.response_bytes
    rec.partial = ending.partial or rec.status_code == CLIENT_CLOSED_REQUEST
    rec.response_model = ending.response_model
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
        if rec.decision != "denied":
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
                )
                violations = await rt.engine.settle(
                    bound, facts.policy_facts(), facts.reservations, outcome
                )
                rec.policy_violations = violations or None
    except Exception:  # accounting must never lose the record
        log.exception("request %s: settling failed; the record is written anyway", facts.request_id)
        gw.metrics.stream_errors.labels(kind="settle").inc()
    gw.usage.submit(rec)
    observe(gw, facts, rec)
    return rec


async def _fill_tokens(gw: Gateway, rec: UsageRecord, facts: Facts, ending: Ending) -> None:
    usage = ending.usage
    if usage is not None and usage.prompt_tokens is not None:
        rec.prompt_tokens = usage.prompt_tokens
        rec.completion_tokens = usage.completion_tokens or 0
        rec.total_tokens = (
            usage.total_tokens
            if usage.total_tokens is not None
            else rec.prompt_tokens + rec.completion_tokens
        )
        rec.cached_tokens = usage.cached_tokens
        rec.cache_creation_tokens = usage.cache_creation_tokens
        rec.reasoning_tokens = usage.reasoning_tokens
        return
    delivered = ending.delivered_text
    status = rec.status_code or 0
    if rec.decision == "denied" or (
        status >= 400 and status != CLIENT_CLOSED_REQUEST and not delivered
    ):
        # Refused, or the provider answered an error: nothing was generated or billed.
        rec.prompt_tokens = rec.completion_tokens = rec.total_tokens = 0
        return
    prompt = facts.estimated_tokens or 0
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
    if rec.latency_ms is not None:
        error_type = "" if rec.decision == "allowed" else (rec.error_code or rec.decision)
        m.request_duration.labels(op, provider, model, error_type).observe(rec.latency_ms / 1000.0)
    if rec.stream and rec.ttft_ms is not None:
        m.time_to_first_token.labels(op, provider, model).observe(rec.ttft_ms / 1000.0)
    response_model = rec.response_model or model
    if rec.prompt_tokens:
        m.token_usage.labels(op, provider, model, response_model, "input").observe(
            rec.prompt_tokens
        )
    if rec.completion_tokens:
        m.token_usage.labels(op, provider, model, response_model, "output").observe(
            rec.completion_tokens
        )
