"""Envoy's usage log: where plain (non-streamed, untranslated) requests end.

Envoy writes one JSON line per finished request to a file (``LOG_FIELDS``, rendered by
``ext_proc.envoy_config``) and this server tails it (``ext_proc.usage.tail``), so
finishing a plain request costs no ext_proc message, and a line written while the
server was down or restarting is read when it is back: no request goes unrecorded.
A line carries what the request side decided (``gw`` metadata), the usage Envoy's
``json_to_metadata`` read from a JSON answer (``gw_usage``), or, when it could not read
one, the answer's body (``gw_body``, kept by the capture Lua filter), the status,
timings, bytes and response flags.

Lines the gateway recorded elsewhere (its own immediate answers, details ``gw_*``;
answers the response processor finished, ``gw_response``; streams on an observed route,
``ob``, whose record may land up to Envoy's deferred close of the observer's stream
later: waited for) are skipped when this process
recorded them. Otherwise (another replica did, or this one crashed before its row was
written) they are recorded here as fallback rows, which never replace the precise row
(see ``ext_proc.usage.record.RECORDER_RANK``). Requests Envoy refused before the gateway
saw them (an oversized body, the processor unreachable) are recorded here too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson

from ext_proc.envoy_contract import (
    ATTEMPTS_NAMESPACE,
    BODY_BYTES_FIELD,
    BODY_NAMESPACE,
    DENIAL_FIELD,
    DETAILS_PREFIX,
    FACTS_FIELD,
    MODEL_NAMESPACE,
    NAMESPACE,
    OBSERVED_FIELD,
    OBSERVER_CLOSE_MS,
    RECORDED_FIELD,
    RESPONSE_NAMESPACE,
    TARGET_KEY,
    TARGET_NAMESPACE,
    TRAIL_FIELD,
    USAGE_NAMESPACE,
)
from ext_proc.server.completion import (
    CLIENT_CLOSED_REQUEST,
    FALLBACK_RECORDER,
    Ending,
    finish,
)
from ext_proc.server.context import Gateway
from ext_proc.server.facts import Facts
from ext_proc.tokens.bodies import summarize
from ext_proc.tokens.parsers import FORMATS
from ext_proc.tokens.types import ResponseSummary, Usage
from ext_proc.usage.record import Decision

log = logging.getLogger(__name__)

# Bodies up to this many bytes are kept for counting; longer ones only their length.
BODY_CAPTURE_LIMIT = 4 * 1024 * 1024

# The usage log line: short key -> Envoy command. Missing values are omitted.
LOG_FIELDS: dict[str, str] = {
    "id": "%REQ(X-REQUEST-ID)%",
    "t0": "%START_TIME(%s.%6f)%",
    # Without the query string: an app may put its key there by mistake.
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "st": "%RESPONSE_CODE%",
    "det": "%RESPONSE_CODE_DETAILS%",
    "fl": "%RESPONSE_FLAGS%",
    "dur": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
    "ttfb": "%COMMON_DURATION(DS_RX_BEG:US_RX_BEG:us)%",
    "ms": "%DURATION%",
    "rqb": "%BYTES_RECEIVED%",
    "rsb": "%BYTES_SENT%",
    "att": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "uh": "%UPSTREAM_HOST%",
    # A model with fallbacks: the index of the target that answered (endpoint metadata).
    "tgt": f"%UPSTREAM_METADATA({TARGET_NAMESPACE}:{TARGET_KEY})%",
    # ... and every attempt's target and status.
    "trl": f"%DYNAMIC_METADATA({ATTEMPTS_NAMESPACE}:{TRAIL_FIELD})%",
    "route": "%ROUTE_NAME%",
    "ct": "%RESP(CONTENT-TYPE)%",
    "ce": "%RESP(CONTENT-ENCODING)%",
    "gw": f"%DYNAMIC_METADATA({NAMESPACE}:{FACTS_FIELD})%",
    "dn": f"%DYNAMIC_METADATA({NAMESPACE}:{DENIAL_FIELD})%",
    "u": f"%DYNAMIC_METADATA({USAGE_NAMESPACE})%",
    "mdl": f"%DYNAMIC_METADATA({MODEL_NAMESPACE})%",
    "rp": f"%DYNAMIC_METADATA({RESPONSE_NAMESPACE}:{RECORDED_FIELD})%",
    # A stream the observe-only response filter counted: its route says so (the filter
    # sends no answer, so it cannot set "rp").
    "ob": f"%METADATA(ROUTE:{RESPONSE_NAMESPACE}:{OBSERVED_FIELD})%",
    "bd": f"%DYNAMIC_METADATA({BODY_NAMESPACE})%",
}

# Envoy response flags (short form) that say how a request ended.
_APP_GONE = frozenset({"DC", "DR"})  # downstream connection terminated / remote reset
_CUT = frozenset({"UR", "UC", "UT", "UPE", "UMSDR"})  # upstream reset / closed / timeout
# The request never reached a provider: no connection, no healthy host, overflow, no route.
_NEVER_SENT = frozenset({"UF", "UH", "UO", "NR", "URX", "NC"})
# Routes whose traffic is not the gateway's (the benchmark's Envoy-alone floor).
UNACCOUNTED_ROUTES = frozenset({"direct_without_ext_proc"})
_DECISIONS: frozenset[Any] = frozenset({"allowed", "denied", "error"})
# The gateway's own answers that are policy denials (the others are errors).
_DENIAL_STATUSES = frozenset({401, 403, 404, 413, 429})
# A stream the observer counts: how much longer than Envoy's deferred close of its gRPC
# stream the usage log waits for its record.
_OBSERVER_GRACE = 0.5
# Bodies at least this large are decoded and parsed in a worker thread.
_THREAD_BODY_BYTES = 64 * 1024
# Usage-log lines started per pass of the event loop (see ``UsageLog.consume``).
_LINES_PER_PASS = 8


def usage_from_log(
    response_format: str, entry: dict[str, Any], *, embeddings: bool = False
) -> tuple[Usage | None, str | None]:
    """The usage and served model Envoy's json_to_metadata read from a JSON answer, as the
    provider's response format understands them (each format names its fields)."""
    fmt = FORMATS.get(response_format)
    if fmt is None:
        return None, None
    usage = fmt.usage_from_fields(entry.get("u"))
    if (
        usage is not None
        and embeddings
        and usage.prompt_tokens is not None
        and usage.completion_tokens is None
    ):
        usage.completion_tokens = 0  # an embeddings answer reports no completion: it is 0
        usage.total_tokens = usage.prompt_tokens
    models = entry.get("mdl")
    model = models.get(fmt.model_field) if type(models) is dict and fmt.model_field else None
    return usage, model if type(model) is str and model else None


def _ms(us: Any) -> float | None:
    """Envoy's microsecond durations as milliseconds (None when absent)."""
    if type(us) in (int, float):
        return round(us / 1000.0, 3)
    return None


def _int(value: Any) -> int | None:
    if type(value) is int:
        return value
    if type(value) is float:
        return int(value)
    if type(value) is str and value.isdigit():
        return int(value)
    return None


def _float(value: Any) -> float:
    """A number Envoy wrote as text (``t0``), else now: a line without it waits least."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return time.time()


def _str(value: Any) -> str:
    return value if type(value) is str else ""


def _denial(value: Any, status: int, details: str) -> tuple[Decision, str | None, str | None]:
    """(decision, policy, error code) of an answer the gateway gave itself, as it put
    them in the line (``facts.DENIAL_FIELD``), else as the status and details say."""
    try:
        said = orjson.loads(value) if type(value) is str else None
    except orjson.JSONDecodeError:
        said = None
    if type(said) is not list or len(said) != 3:
        said = [None, None, None]
    decision: Decision
    if said[0] in _DECISIONS:
        decision = said[0]
    elif status < 400:
        decision = "allowed"
    else:
        decision = "denied" if status in _DENIAL_STATUSES else "error"
    policy = said[1] if type(said[1]) is str else None
    code = said[2] if type(said[2]) is str else details[3:67] or None
    return decision, policy, code


def _billable(entry: dict[str, Any], status: int, flags: frozenset[str]) -> bool:
    """Whether the provider may have worked on the request (see ``Ending.billable``): it
    answered 2xx, or the request was sent and then timed out, was cut, or the app left.
    Not for the provider's own error answer or a connection that never opened."""
    if flags & _NEVER_SENT or not entry.get("uh"):
        return False
    return status < 400 or bool(flags & (_CUT | _APP_GONE)) or status == CLIENT_CLOSED_REQUEST


def _flags(value: Any) -> frozenset[str]:
    if type(value) is not str or value in ("", "-"):
        return frozenset()
    return frozenset(value.split(","))


class UsageLog:
    """Turns usage-log lines into finished requests (one record each)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._timer = gateway.metrics.phase_duration.labels("access_log")
        self._errors = gateway.metrics.stream_errors.labels(kind="access_log")
        self._fallbacks = gateway.metrics.usage_fallbacks
        self._lines = gateway.metrics.usage_log_lines

    async def consume(self, lines: list[bytes]) -> None:
        """Hand every line's record to the writer; returns once all are submitted.

        Envoy flushes the log every 100 ms, so lines come in bursts (about 100 at 1,000
        requests/s). Finishing one costs ~40 µs of the event loop; a burst handled in one
        go held every request arriving meanwhile for ~5 ms (the p99 at one connection).
        The loop is let go every ``_LINES_PER_PASS`` lines: each line's work starts as a
        task and runs in the next pass, between the requests that arrived."""
        self._lines.inc(len(lines))
        jobs: list[asyncio.Future[Any]] = []
        for index, line in enumerate(lines):
            if index and not index % _LINES_PER_PASS:
                await asyncio.sleep(0)
            started = time.perf_counter()
            try:
                job = self.handle(orjson.loads(line))
            except Exception:  # one bad line must not stop the others
                log.exception("usage log line not accounted: %.200r", line)
                self._errors.inc()
                job = None
            self._timer.observe(time.perf_counter() - started)
            if job is not None:
                jobs.append(asyncio.ensure_future(job))
        if jobs:
            await asyncio.gather(*jobs)

    def handle(self, entry: Any) -> Awaitable[Any] | None:
        """The work that records one line (None: nothing to record)."""
        if type(entry) is not dict:
            raise ValueError("a usage log line must be a JSON object")
        details = _str(entry.get("det"))
        if entry.get("route") in UNACCOUNTED_ROUTES:
            return None
        status = _int(entry.get("st")) or CLIENT_CLOSED_REQUEST
        facts_text = entry.get("gw")
        facts = Facts.from_json(facts_text) if type(facts_text) is str else None
        if facts is not None and facts.targets:
            facts.select_target(entry.get("tgt"))
        if details.startswith(DETAILS_PREFIX) or entry.get("rp") or entry.get("ob"):
            # The gateway's own answer, or the response processor's: recorded by them.
            if facts is None or facts.request_id in self._gw.recorded:
                return None
            # Not by this process: another replica owns it (its record wins whenever
            # it lands), or this process lost it in a crash. Never left unrecorded.
            if entry.get("ob"):
                return self._observed(entry, facts, status, details)
            return self._fallback(entry, facts, status, details)
        if facts is None:
            return self._unprocessed(entry, status, details)
        return self._plain(entry, facts, status, details)

    async def _observed(
        self, entry: dict[str, Any], facts: Facts, status: int, details: str
    ) -> None:
        """A stream the observe-only filter counts: its record may land after this line
        (a cancelled or cut stream reaches the processor when Envoy closes the observer's
        gRPC stream, up to ``OBSERVER_CLOSE_MS`` after the request ended). Wait for it
        that long (bounded; woken the moment the record is handed to the writer), then
        stand in for it: the observer failed, or belongs to another replica (whose
        record wins whenever it lands)."""
        # A cancelled stream's line has no "dur" (nothing was sent to its end): "ms".
        duration = _int(entry.get("dur"))
        seconds = duration / 1e6 if duration is not None else (_int(entry.get("ms")) or 0) / 1e3
        ended = _float(entry.get("t0")) + seconds
        now = time.time()
        deadline = min(ended, now) + OBSERVER_CLOSE_MS / 1000 + _OBSERVER_GRACE
        if await self._gw.recorded.wait(facts.request_id, deadline - now):
            return
        await self._fallback(entry, facts, status, details)

    async def _fallback(
        self, entry: dict[str, Any], facts: Facts, status: int, details: str
    ) -> None:
        self._fallbacks.inc()
        if details.startswith(DETAILS_PREFIX):
            # A denial or an error the gateway answered itself: nothing reached a provider.
            decision, policy, code = _denial(entry.get("dn"), status, details)
            ending = Ending(
                status=status,
                latency_ms=_ms(entry.get("dur")) or _int(entry.get("ms")),
                decision=decision,
                policy=policy,
                error_code=code,
                response_bytes=_int(entry.get("rsb")) or None,
            )
            await finish(self._gw, facts, ending, FALLBACK_RECORDER, settle=False)
            return
        await self._plain(entry, facts, status, details, recorded_by=FALLBACK_RECORDER)

    async def _plain(
        self,
        entry: dict[str, Any],
        facts: Facts,
        status: int,
        details: str,
        *,
        recorded_by: str = "access_log",
    ) -> None:
        """A plain answer: usage from Envoy's json_to_metadata, else from the body."""
        flags = _flags(entry.get("fl"))
        usage, response_model = usage_from_log(
            facts.response_format, entry, embeddings=facts.operation == "embeddings"
        )
        delivered: list[str] = []
        complete = usage is not None
        body = entry.get("bd")
        if usage is None and type(body) is dict:
            summary = await self._summarize(facts, entry, body)
            if summary is not None:
                usage = summary.usage
                response_model = summary.response_model or response_model
                delivered = summary.delivered_text
                complete = summary.complete
        app_gone = bool(flags & _APP_GONE)
        cut = bool(flags & _CUT)
        ending = Ending(
            status=status,
            latency_ms=_ms(entry.get("dur")) or _int(entry.get("ms")),
            ttft_ms=_ms(entry.get("ttfb")),
            response_bytes=_int(entry.get("rsb")) or None,
            partial=(app_gone or cut) and not complete,
            usage=usage,
            response_model=response_model,
            delivered_text=delivered,
            billable=_billable(entry, status, flags),
            attempts=_int(entry.get("att")),
            trail=_str(entry.get("trl")) or None,
            error_code=details[:64]
            if status >= 400 and not details.startswith("via_upstream")
            else None,
        )
        await finish(self._gw, facts, ending, recorded_by, settle=recorded_by != FALLBACK_RECORDER)

    async def _summarize(
        self, facts: Facts, entry: dict[str, Any], body: dict[str, Any]
    ) -> ResponseSummary | None:
        """The rare path: an answer whose usage Envoy could not read, counted here."""
        encoded = body.get(BODY_BYTES_FIELD)
        if type(encoded) is not str:
            return None  # too large to keep: only its length is known
        try:
            raw = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            log.error("request %s: the kept body is not base64", facts.request_id)
            return None
        content_type, encoding = _str(entry.get("ct")), _str(entry.get("ce"))
        if len(raw) >= _THREAD_BODY_BYTES:
            return await asyncio.to_thread(
                summarize, facts.response_format, raw, content_type, encoding
            )
        return summarize(facts.response_format, raw, content_type, encoding)

    async def _unprocessed(self, entry: dict[str, Any], status: int, details: str) -> None:
        """A request Envoy answered before the gateway decided anything about it (an
        oversized body, the processor unreachable or failing)."""
        started = entry.get("t0")
        try:
            t0 = float(started) if started else time.time()
        except (TypeError, ValueError):
            t0 = time.time()
        path = _str(entry.get("path"))
        facts = Facts(
            request_id=_str(entry.get("id")) or f"envoy-{time.time_ns():x}",
            started=t0,
            endpoint=path.partition("?")[0][:200],
            operation="",
            request_bytes=_int(entry.get("rqb")) or 0,
        )
        code = details or "envoy_local_reply"
        if details == "lua_response":
            code = "invalid_json" if status == 400 else "gateway_not_processed"
        ending = Ending(
            status=status,
            latency_ms=_ms(entry.get("dur")) or _int(entry.get("ms")),
            decision="denied" if status in (413, 429) else "error",
            error_code=code[:64],
            response_bytes=_int(entry.get("rsb")) or None,
        )
        await finish(self._gw, facts, ending, "access_log")
