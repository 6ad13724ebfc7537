"""Log lines: text for people (the default), or one JSON object per line for machines.

``EXT_PROC_LOG_FORMAT=json`` makes every line a JSON object with ``time``, ``level``,
``logger``, ``message``, and where known the ``request_id``, ``trace_id``/``span_id``
(tracing on), ``app`` and ``decision`` of the request being handled, an exception's
traceback as ``exception``, and whatever a call passes in ``extra``. The standard
library's ``logging`` does the work: a ``Formatter`` and a ``Filter``; the request's
ids come from context variables the request path sets only while JSON logs are on.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from ext_proc import telemetry

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The request being handled, for log lines (set by the request path; JSON logs only).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
APP: contextvars.ContextVar[str | None] = contextvars.ContextVar("app", default=None)
# True while JSON logs are on: the request path sets the context variables only then.
ENABLED = False

# LogRecord attributes that are not a call's ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "app",
    "trace_id",
    "span_id",
}


class RequestContext(logging.Filter):
    """Adds the current request's ids to every record (JSON logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "app", None) is None:
            record.app = APP.get()
        ids = telemetry.ids_of_current()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id", "app"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        out.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str, fmt: str = "text") -> None:
    """Set up the root logger: ``fmt`` is ``text`` or ``json`` (EXT_PROC_LOG_FORMAT)."""
    global ENABLED
    if fmt not in FORMATS:
        raise ValueError(f"EXT_PROC_LOG_FORMAT={fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestContext())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    ENABLED = fmt == "json"


def bind_request(request_id: str, app: str | None = None) -> None:
    """Name the request the current task handles, for its log lines (JSON logs on)."""
    REQUEST_ID.set(request_id)
    if app:
        APP.set(app)
