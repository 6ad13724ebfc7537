"""Text Postgres cannot hold never costs a usage row: NUL (valid in JSON and in a Python
str, refused by Postgres ``text``) and lone surrogates (not UTF-8) anywhere in a record's
text, through each way the writer has of writing (a COPY batch, row by row after a bad
neighbour, a replay of the disk spool), against the real Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ext_proc.dev import free_port
from ext_proc.metrics import Metrics
from ext_proc.stores.postgres import create_pool
from ext_proc.usage.record import COLUMNS, MAX_TEXT, UsageRecord
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.spool import Spool
from tests.conftest import poll_async
from tests.integration.test_usage_recorder import make_record, spool_is_empty, url_with

pytestmark = pytest.mark.integration

# Every text column of the record (and the text[] one).
TEXT_COLUMNS = [
    f.name for f in fields(UsageRecord) if str(f.type).startswith("str") and f.name != "request_id"
]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
async def recorders() -> AsyncIterator[Callable[..., UsageRecorder]]:
    made: list[UsageRecorder] = []

    def make(pool: asyncpg.Pool, metrics: Metrics, spool: Spool, **kwargs: Any) -> UsageRecorder:
        recorder = UsageRecorder(
            pool, metrics, spool, backoff_base=0.02, backoff_max=0.2, write_timeout=5.0, **kwargs
        )
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        await recorder.close(timeout=5)


def hostile(i: int, prefix: str) -> UsageRecord:
    """A record with a NUL in every text field, a lone surrogate in one, and a model
    longer than a text column keeps."""
    values: dict[str, Any] = {name: f"{name}\x00{i}" for name in TEXT_COLUMNS}
    values["request_id"] = f"{prefix}-{i:03d}\x00"
    values["response_model"] = "gpt\ud800-4o"
    values["model"] = "m\x00" + "x" * 2000
    values["policy_violations"] = ["cel\x00post", "ok"]
    return make_record(i, prefix=prefix, **values)


async def stored(url: str, prefix: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM usage_records WHERE request_id LIKE $1", f"{prefix}-%"
        )
    finally:
        await conn.close()
    return {row["request_id"]: dict(row) for row in rows}


def assert_cleaned(row: dict[str, Any], i: int) -> None:
    for name in TEXT_COLUMNS:
        if name not in ("response_model", "model"):
            assert row[name] == f"{name}\ufffd{i}", (name, row[name])
    assert row["response_model"] == "gpt\ufffd-4o"
    assert row["model"] == ("m\ufffd" + "x" * 2000)[:MAX_TEXT]
    assert row["policy_violations"] == ["cel\ufffdpost", "ok"]
    assert set(row) == set(COLUMNS)


async def test_a_batch_with_nul_everywhere_is_written_whole(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=50)
    await recorder.start()
    for i in range(20):
        recorder.submit(hostile(i, "copy") if i % 2 else make_record(i, prefix="copy"))
    await recorder.flush()

    rows = await stored(migrated_url, "copy")
    assert len(rows) == 20, sorted(rows)
    assert recorder.stats.rejected == 0 and recorder.stats.row_by_row == 0  # one COPY
    for i in range(1, 20, 2):
        assert_cleaned(rows[f"copy-{i:03d}\ufffd"], i)


async def test_row_by_row_after_a_bad_neighbour_keeps_the_nul_rows(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=50)
    await recorder.start()
    recorder.submit(make_record(0, prefix="rows", decision="maybe"))  # a CHECK violation
    for i in range(1, 6):
        recorder.submit(hostile(i, "rows"))
    await recorder.flush()

    assert recorder.stats.row_by_row == 1 and recorder.stats.rejected == 1
    rows = await stored(migrated_url, "rows")
    assert sorted(rows) == [f"rows-{i:03d}\ufffd" for i in range(1, 6)]
    for i in range(1, 6):
        assert_cleaned(rows[f"rows-{i:03d}\ufffd"], i)


async def test_spooled_records_with_nul_are_replayed_into_rows(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    dead_pool = await create_pool(url_with(migrated_url, port=free_port()), min_size=0)
    metrics = Metrics()
    recorder = recorders(dead_pool, metrics, spool, batch_size=10, max_attempts=1)
    await recorder.start()
    for i in range(5):
        recorder.submit(hostile(i, "spool"))
    await recorder.flush()  # Postgres unreachable: all five are in the spool
    assert not await stored(migrated_url, "spool")

    recorder.attach_pool(pool)
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    rows = await stored(migrated_url, "spool")
    assert len(rows) == 5 and recorder.stats.rejected == 0
    for i in range(5):
        assert_cleaned(rows[f"spool-{i:03d}\ufffd"], i)
    assert not await spool.rejected()
    await dead_pool.close()
