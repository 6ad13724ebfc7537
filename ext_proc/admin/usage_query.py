"""``GET /v1/usage``'s query: every parameter checked, the first bad one named.

``by`` any of the rollup's group keys, ``since``/``until`` (``24h``, ``7d``, ISO times;
since before until), ``org``/``app``/``model`` filters, ``limit`` 1..100000; a
parameter it does not know (a typo'd ``sinse``) is refused, not ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from ext_proc.usage.cli import DEFAULT_GROUP_BY, parse_group_by, parse_time
from ext_proc.usage.rollups import MAX_LIMIT

DEFAULT_USAGE_LIMIT = 1000
USAGE_PARAMS = ("by", "since", "until", "org", "app", "model", "limit")


class BadParameter(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def usage_query(raw: str) -> dict[str, Any]:
    """The usage query's parameters, checked; ``BadParameter`` names the first bad one."""
    try:
        parsed = parse_qs(raw, keep_blank_values=True, max_num_fields=50)
    except ValueError:
        raise BadParameter("query", "too many query parameters") from None
    values: Mapping[str, str] = {name: given[-1] for name, given in parsed.items()}
    for name in values:
        if name not in USAGE_PARAMS:
            raise BadParameter(
                name, f"unknown parameter {name!r}; known: {', '.join(USAGE_PARAMS)}"
            )
    now = datetime.now(UTC)
    query: dict[str, Any] = {
        "by": _parse("by", values.get("by", DEFAULT_GROUP_BY), parse_group_by),
        "until": _parse("until", values["until"], lambda v: parse_time(v, now=now))
        if "until" in values
        else now,
    }
    query["since"] = (
        _parse("since", values["since"], lambda v: parse_time(v, now=now))
        if "since" in values
        else query["until"] - timedelta(days=1)
    )
    if query["since"] >= query["until"]:
        raise BadParameter(
            "since",
            f"since ({query['since'].isoformat()}) must be before until "
            f"({query['until'].isoformat()})",
        )
    limit = values.get("limit", str(DEFAULT_USAGE_LIMIT))
    if not limit.strip().isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise BadParameter(
            "limit", f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    query["limit"] = int(limit)
    for name in ("org", "app", "model"):
        value = values.get(name)
        if value is not None and not value.strip():
            raise BadParameter(name, f"{name} must not be empty")
        query[name] = value
    return query


def _parse(name: str, value: str, parse: Any) -> Any:
    try:
        return parse(value)
    except (ValueError, OverflowError, argparse.ArgumentTypeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise BadParameter(name, f"invalid {name}: {detail}") from None
