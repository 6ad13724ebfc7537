"""The usage writer's batch cost before and after partitioning and rollups.

Run: ``DATABASE_URL=... .venv/bin/python -m bench.micro_usage_writer`` (``--rounds``,
``--batch``). Makes two throwaway databases on that server, one with the migrations up
to 0006 (unpartitioned table, no rollups) and one with all of them (daily partitions,
hourly and daily rollups kept by triggers), and times the writer's own batch write
(``UsageRecorder._copy``: COPY into the staging table, then the INSERT ... ON CONFLICT
into ``usage_records``, one transaction) for batches of fresh records, alternating
between the two so that a busy machine slows both alike. Two spreads: "wide" (600 keys,
150 apps, 12 models, every status class: most records of a batch fall in a group of
their own, the rollups' worst case) and "narrow" (one app and model: one group). Then
a batch of duplicates (a spool replay) and a batch of higher-ranked records replacing
fallback ones. Prints the median and p90 per batch and per row. After 0007 the batch's
rows also wait in ``usage_rollup_pending`` until the server's fold moves them into the
rollups, off the writer's path: every 5 batches (5 s at 1,000 rps, the server's fold
interval) the bench times that fold too, per 1,000 rows folded. The databases are
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_proc.stores.postgres import SCHEMA_DIR, migrate
from ext_proc.usage.record import UsageRecord
from ext_proc.usage.recorder import UsageRecorder

MODELS = [f"model-{i}" for i in range(12)]


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def records(n: int, *, wide: bool, rng: random.Random, prefix: str) -> list[UsageRecord]:
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        app = int(150 * rng.random() ** 2) if wide else 0
        roll = rng.random()
        status = 200 if roll < 0.93 else (429 if roll < 0.96 else (502 if roll < 0.98 else 499))
        decision = "allowed" if status == 200 else ("denied" if status == 429 else "error")
        out.append(
            UsageRecord(
                request_id=f"{prefix}-{i:06d}",
                created_at=now - timedelta(milliseconds=rng.randrange(2000)),
                org_id=f"org-{app % 25}",
                app_id=f"app-{app}",
                key_id=f"key-{app * 4 + int(4 * rng.random() ** 2)}",
                environment="prod",
                endpoint="/v1/chat/completions",
                model=MODELS[(app * 7 + int(4 * rng.random() ** 3)) % 12] if wide else MODELS[0],
                response_model="model-2025-01-01",
                provider="openai",
                deployment="dep",
                status_code=status,
                decision=decision,  # type: ignore[arg-type]
                prompt_tokens=rng.randrange(50, 4000),
                completion_tokens=rng.randrange(0, 800),
                total_tokens=1000,
                cached_tokens=rng.randrange(0, 50),
                latency_ms=rng.lognormvariate(6.5, 0.8),
                ttft_ms=rng.uniform(50, 400),
                request_bytes=2000,
                response_bytes=3000,
                recorded_by="access_log",
                cost_usd=Decimal(rng.randrange(1, 10**6)) / Decimal(10**10),
                attempts=1,
            )
        )
    return out


async def _timed(conn: asyncpg.Connection, batch: list[UsageRecord]) -> float:
    """Seconds the writer takes to put ``batch`` into ``usage_records``."""
    started = time.perf_counter()
    await UsageRecorder._copy(conn, batch)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="batches per schema and spread")
    parser.add_argument("--batch", type=int, default=1000, help="records per batch")
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL")
    if not server:
        raise SystemExit("set DATABASE_URL to a Postgres server this may create databases on")

    old_schema = Path(tempfile.mkdtemp(prefix="schema-0006-"))
    for path in sorted(SCHEMA_DIR.glob("*.sql")):
        if int(path.name[:4]) <= 6:
            shutil.copy(path, old_schema / path.name)
    suffix = uuid.uuid4().hex[:8]
    names = {
        "before (0006)": f"bench_writer_old_{suffix}",
        "after (0007)": f"bench_writer_new_{suffix}",
    }
    admin = await asyncpg.connect(server)
    for name in names.values():
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conns: dict[str, asyncpg.Connection] = {}
        for label, name in names.items():
            url = _with_database(server, name)
            await migrate(url, old_schema if label.startswith("before") else SCHEMA_DIR)
            conns[label] = await asyncpg.connect(url)
        rng = random.Random(7)
        results: dict[tuple[str, str], list[float]] = {}
        new = conns["after (0007)"]
        for spread in ("wide", "narrow"):
            for r in range(args.rounds + 3):  # the first 3 warm up (plans, caches)
                batch = records(args.batch, wide=spread == "wide", rng=rng, prefix=f"{spread}{r}")
                for label, conn in conns.items():
                    seconds = await _timed(conn, batch)
                    if r >= 3:
                        results.setdefault((label, spread), []).append(seconds)
                if r % 5 == 4:
                    started = time.perf_counter()
                    folded = await new.fetchval("SELECT usage_rollups_fold(1000000)")
                    seconds = (time.perf_counter() - started) / folded * args.batch
                    results.setdefault(("after (0007)", f"fold, {spread} (per batch)"), []).append(
                        seconds
                    )
        # A replayed batch (every id present) and a fallback replaced by the owner's record.
        for r in range(args.rounds):
            batch = records(args.batch, wide=True, rng=rng, prefix=f"fb{r}")
            fallback = [replace(x, recorded_by="access_log_fallback") for x in batch]
            for label, conn in conns.items():
                await UsageRecorder._copy(conn, fallback)
                replay = await _timed(conn, fallback)
                results.setdefault((label, "replay (all duplicates)"), []).append(replay)
                replaced = await _timed(conn, batch)
                results.setdefault((label, "replace fallbacks"), []).append(replaced)
        print(f"usage writer: one batch of {args.batch} records, {args.rounds} batches each")
        print(f"{'batch':<26} {'schema':<14} {'median ms':>10} {'p90 ms':>8} {'µs/row':>8}")
        for (label, spread), times in results.items():
            times.sort()
            median = statistics.median(times)
            p90 = times[int(0.9 * (len(times) - 1))]
            print(
                f"{spread:<26} {label:<14} {median * 1e3:>10.1f} {p90 * 1e3:>8.1f} "
                f"{median / args.batch * 1e6:>8.1f}"
            )
        for conn in conns.values():
            await conn.close()
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(old_schema, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
