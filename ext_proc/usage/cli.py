"""``ext-proc usage``: the usage rollup as a table or JSON.

The main CLI adds these arguments to its ``usage`` sub-command with
``add_usage_arguments`` and calls ``run_usage`` with the database URL from ``Settings``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from ext_proc.stores.postgres import CONNECT_TIMEOUT, redact_url
from ext_proc.usage.rollups import GROUP_KEYS, format_table, rollup, validate_group_by

DEFAULT_GROUP_BY = "app_id,model"
DEFAULT_WINDOW = timedelta(hours=24)
_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
EXIT_UNAVAILABLE = 2


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """An ISO date or date-time (UTC unless it says otherwise), ``now``, or a time ago
    such as ``90m``, ``24h``, ``7d``, ``2w``."""
    now = now if now is not None else datetime.now(UTC)
    text = value.strip()
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use an ISO date (2025-01-31), a date-time "
            "(2025-01-31T12:00, UTC unless an offset is given) or an age like 24h, 7d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_group_by(value: str) -> list[str]:
    keys = [part.strip() for part in value.split(",") if part.strip()]
    try:
        return validate_group_by(keys)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--by",
        type=parse_group_by,
        default=parse_group_by(DEFAULT_GROUP_BY),
        metavar="KEYS",
        help=f"comma-separated group keys among {', '.join(GROUP_KEYS)} "
        f"(default: {DEFAULT_GROUP_BY})",
    )
    parser.add_argument(
        "--since",
        type=parse_time,
        default=None,
        metavar="TIME",
        help="start of the range: ISO date/time (UTC) or an age like 24h, 7d (default: 24h)",
    )
    parser.add_argument(
        "--until",
        type=parse_time,
        default=None,
        metavar="TIME",
        help="end of the range, exclusive (default: now)",
    )
    parser.add_argument("--org", default=None, help="only this org")
    parser.add_argument("--app", default=None, help="only this application")
    parser.add_argument("--model", default=None, help="only this requested model")
    parser.add_argument(
        "--limit", type=int, default=1000, help="at most this many rows (default: 1000)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_usage(ns: argparse.Namespace, database_url: str) -> int:
    """Print the rollup; 0 on success, 2 when the database is unreachable or not migrated."""
    until: datetime = ns.until if ns.until is not None else datetime.now(UTC)
    since: datetime = ns.since if ns.since is not None else until - DEFAULT_WINDOW
    try:
        return asyncio.run(_run(ns, database_url, since, until))
    except ValueError as exc:  # since >= until, limit out of range
        print(f"ext-proc usage: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"ext-proc usage: cannot query the database at {redact_url(database_url)}: "
            f"{type(exc).__name__}: {exc}\n"
            "Check DATABASE_URL, and run `ext-proc migrate` if the schema is missing.",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE


async def _run(ns: argparse.Namespace, database_url: str, since: datetime, until: datetime) -> int:
    conn = await asyncpg.connect(
        database_url,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": "ext-proc usage"},
    )
    try:
        if not await conn.fetchval("SELECT to_regclass('usage_records') IS NOT NULL"):
            print(
                f"ext-proc usage: the database at {redact_url(database_url)} has no "
                "usage_records table; run `ext-proc migrate` first.",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        rows = await rollup(
            conn,
            group_by=ns.by,
            since=since,
            until=until,
            org_id=ns.org,
            app_id=ns.app,
            model=ns.model,
            limit=ns.limit,
        )
    finally:
        await conn.close()
    if ns.json:
        document: dict[str, Any] = {
            "group_by": ns.by,
            "since": since.isoformat(),
            "until": until.isoformat(),
            "filters": {"org_id": ns.org, "app_id": ns.app, "model": ns.model},
            "rows": [row.as_dict() for row in rows],
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        start, end = since.astimezone(UTC), until.astimezone(UTC)
        print(f"usage from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
        print(format_table(rows, ns.by))
    return 0
