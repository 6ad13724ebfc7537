"""``ext-proc usage``: the usage rollup as a table or JSON; ``ext-proc usage prune``:
drop old days of usage rows (retention).

The main CLI adds these arguments to its ``usage`` sub-command with
``add_usage_arguments`` and calls ``run_usage`` with the database URL and the retention
settings from ``Settings``.
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

from ext_proc.settings import parse_age
from ext_proc.stores.postgres import CONNECT_TIMEOUT, redact_url
from ext_proc.usage.maintenance import PruneReport, check_retentions, is_partitioned, prune
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
    commands = parser.add_subparsers(dest="usage_command", metavar="{prune}", title="commands")
    prune_help = (
        "drop the partitions of usage_records whose whole UTC day is older than an age "
        "(the hourly and daily rollups keep their totals), and print what was dropped"
    )
    p = commands.add_parser("prune", help=prune_help, description=prune_help)
    p.add_argument(
        "--older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="e.g. 90d, 12w (default: $EXT_PROC_USAGE_RETENTION; without either, nothing "
        "is dropped: usage is kept forever unless told otherwise)",
    )
    p.add_argument(
        "--rollups-older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="also delete hourly and daily rollup rows older than this, at least as long "
        "as --older-than (default: $EXT_PROC_USAGE_ROLLUP_RETENTION, else kept forever)",
    )
    p.add_argument("--dry-run", action="store_true", help="change nothing, print what would go")


def _age(value: str) -> timedelta:
    try:
        return parse_age(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_usage(
    ns: argparse.Namespace,
    database_url: str,
    *,
    retention: timedelta | None = None,
    rollup_retention: timedelta | None = None,
) -> int:
    """Print the rollup (or prune: ``ext-proc usage prune``, whose defaults are
    ``retention`` and ``rollup_retention``); 0 on success, 2 when the database is
    unreachable or not migrated (or there is nothing to prune by)."""
    if getattr(ns, "usage_command", None) == "prune":
        return run_prune(ns, database_url, retention=retention, rollup_retention=rollup_retention)
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


def run_prune(
    ns: argparse.Namespace,
    database_url: str,
    *,
    retention: timedelta | None = None,
    rollup_retention: timedelta | None = None,
    now: datetime | None = None,
) -> int:
    """``ext-proc usage prune``: 0 done (also when nothing was old enough), 2 no age given,
    a bad combination, or the database unusable."""
    older_than: timedelta | None = ns.older_than or retention
    rollups_older_than: timedelta | None = ns.rollups_older_than or rollup_retention
    if older_than is None:
        print(
            "ext-proc usage prune: no age given: pass --older-than (e.g. 90d) or set "
            "EXT_PROC_USAGE_RETENTION; usage is kept forever otherwise",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    try:
        check_retentions(older_than, rollups_older_than)
    except ValueError as exc:
        print(f"ext-proc usage prune: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    now = now if now is not None else datetime.now(UTC)
    try:
        report = asyncio.run(
            _prune(
                database_url,
                before=now - older_than,
                rollups_before=now - rollups_older_than if rollups_older_than else None,
                dry_run=ns.dry_run,
            )
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"ext-proc usage prune: cannot use the database at {redact_url(database_url)}: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    if report is None:
        print(
            f"ext-proc usage prune: usage_records at {redact_url(database_url)} is not "
            "partitioned; run `ext-proc migrate` first.",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    print(_prune_text(report, older_than, dry_run=ns.dry_run))
    return 0


async def _prune(
    database_url: str, *, before: datetime, rollups_before: datetime | None, dry_run: bool
) -> PruneReport | None:
    conn = await asyncpg.connect(
        database_url,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": "ext-proc usage prune"},
    )
    try:
        if not await is_partitioned(conn):
            return None
        return await prune(conn, before=before, rollups_before=rollups_before, dry_run=dry_run)
    finally:
        await conn.close()


def _age_text(age: timedelta) -> str:
    hours = int(age.total_seconds()) // 3600
    if hours % (24 * 7) == 0:
        return f"{hours // (24 * 7)}w"
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GB"


def _prune_text(report: PruneReport, older_than: timedelta, *, dry_run: bool) -> str:
    verb = "would drop" if dry_run else "dropped"
    lines = [
        f"usage_records: days that ended by {report.before:%Y-%m-%d %H:%M} UTC "
        f"(older than {_age_text(older_than)}):"
    ]
    rows = 0
    size = 0
    for p in report.partitions:
        day = f"{p.since:%Y-%m-%d}" if p.since is not None else "?"
        estimate = f"~{p.rows:,} rows" if p.rows is not None else "rows not counted yet"
        lines.append(f"  {verb} {p.name}  {day}  {estimate}  {_size(p.bytes)}")
        rows += p.rows or 0
        size += p.bytes
    if report.partitions:
        lines.append(
            f"{verb} {len(report.partitions)} partition(s): ~{rows:,} rows, {_size(size)}; "
            "their totals stay in the hourly and daily rollups"
        )
    else:
        lines.append("  nothing to drop")
    if report.default_rows:
        lines.append(
            f"  ({report.default_rows:,} rows of those days were in usage_records_default: "
            f"{'they would be' if dry_run else 'they were'} moved to their day's partition "
            "and dropped with it)"
        )
    if report.rollup_before is not None:
        lines.append(
            f"rollups: {'would delete' if dry_run else 'deleted'} {report.hourly_rows:,} hourly, "
            f"{report.daily_rows:,} daily and {report.weekly_rows:,} weekly rows of periods "
            "that ended by "
            f"{report.rollup_before:%Y-%m-%d %H:%M} UTC"
        )
    return "\n".join(lines)
