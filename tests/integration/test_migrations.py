"""Schema migrations against the real Postgres: order, idempotence, checksums, concurrency."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import fields
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from ext_proc.stores.postgres import (
    SCHEMA_DIR,
    MigrationError,
    create_pool,
    migrate,
    pending_migrations,
    run_migrate,
)
from ext_proc.usage.record import COLUMNS, UsageRecord

pytestmark = pytest.mark.integration

# The repository's own migrations, in order (later issues add files here).
REPO = sorted(p.name for p in SCHEMA_DIR.glob("*.sql"))


@pytest.fixture
def schema_copy(tmp_path: Path) -> Path:
    """The repository's migrations plus two later ones that depend on them, in order."""
    folder = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, folder)
    (folder / "9001_add_note.sql").write_text("ALTER TABLE usage_records ADD COLUMN note text;")
    # Depends on 9001: applied in the wrong order it would fail.
    (folder / "9002_note_index.sql").write_text(
        "CREATE INDEX usage_records_note_idx ON usage_records (note);"
    )
    return folder


async def _applied(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(r["version"], r["name"]) for r in rows]
    finally:
        await conn.close()


async def test_repository_schema_matches_the_usage_record(database_url: str) -> None:
    assert REPO[0] == "0001_usage_records.sql"
    assert await pending_migrations(database_url) == REPO
    assert await migrate(database_url) == REPO
    assert await pending_migrations(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        columns = await conn.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'usage_records' ORDER BY ordinal_position"
        )
        types = {c["column_name"]: c["data_type"] for c in columns}
        assert tuple(types) == COLUMNS == tuple(f.name for f in fields(UsageRecord))
        assert types["created_at"] == "timestamp with time zone"
        assert types["stream"] == types["tokens_estimated"] == "boolean"
        assert types["latency_ms"] == types["ttft_ms"] == "double precision"
        assert types["policy_violations"] == "ARRAY"
        assert types["prompt_tokens"] in ("integer", "bigint")
        nullable = {c["column_name"] for c in columns if c["is_nullable"] == "YES"}
        assert {"org_id", "model", "prompt_tokens", "latency_ms", "policy_violations"} <= nullable
        indexes = {
            r["indexdef"].split(" USING btree ")[1]
            for r in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_records'"
            )
        }
        assert {
            "(request_id, created_at)",  # the primary key: created_at is the partition key
            "(created_at)",
            "(org_id, created_at)",
            "(app_id, created_at)",
            "(model, created_at)",
        } <= indexes
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO usage_records (request_id, decision) VALUES ('x', 'maybe')"
            )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO usage_records (request_id) VALUES ('y'), ('y')")
        # cost_usd: exact to 1e-10 (what ext_proc.usage.pricing computes), NULL allowed.
        cost = await conn.fetchrow(
            "SELECT numeric_precision, numeric_scale, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'usage_records' AND column_name = 'cost_usd'"
        )
        assert tuple(cost) == (20, 10, "YES")
        assert types["attempts"] == "integer" and "attempts" in nullable
        await conn.execute(
            "INSERT INTO usage_records (request_id, cost_usd, attempts) "
            "VALUES ('c', 0.0000000001, 2), ('n', NULL, NULL)"
        )
        assert await conn.fetchval(
            "SELECT sum(cost_usd) FROM usage_records WHERE request_id IN ('c', 'n')"
        ) == Decimal("1E-10")
    finally:
        await conn.close()


async def test_migrations_apply_in_order_and_twice_is_a_no_op(
    database_url: str, schema_copy: Path
) -> None:
    applied = await migrate(database_url, schema_copy)
    assert applied == [*REPO, "9001_add_note.sql", "9002_note_index.sql"]
    assert await _applied(database_url) == [
        *((int(name[:4]), name) for name in REPO),
        (9001, "9001_add_note.sql"),
        (9002, "9002_note_index.sql"),
    ]
    assert await migrate(database_url, schema_copy) == []
    assert await pending_migrations(database_url, schema_copy) == []

    # A later file shows up as pending, then applies alone.
    (schema_copy / "9003_more.sql").write_text("ALTER TABLE usage_records ADD COLUMN more int;")
    assert await pending_migrations(database_url, schema_copy) == ["9003_more.sql"]
    assert await migrate(database_url, schema_copy) == ["9003_more.sql"]


async def test_changed_applied_file_is_refused(database_url: str, schema_copy: Path) -> None:
    await migrate(database_url, schema_copy)
    note = schema_copy / "9001_add_note.sql"
    note.write_text(note.read_text() + "\n-- edited afterwards\n")
    (schema_copy / "9003_more.sql").write_text("ALTER TABLE usage_records ADD COLUMN more int;")
    with pytest.raises(MigrationError, match=r"9001_add_note\.sql was changed after it was"):
        await migrate(database_url, schema_copy)
    with pytest.raises(MigrationError, match=r"9001_add_note\.sql"):
        await pending_migrations(database_url, schema_copy)
    # Nothing after the refusal ran.
    assert (9003, "9003_more.sql") not in await _applied(database_url)


async def test_failing_migration_rolls_back_alone(database_url: str, schema_copy: Path) -> None:
    (schema_copy / "9003_broken.sql").write_text(
        "ALTER TABLE usage_records ADD COLUMN half int;\nSELECT no_such_function();"
    )
    with pytest.raises(MigrationError, match=r"9003_broken\.sql failed and was rolled back"):
        await migrate(database_url, schema_copy)
    assert [name for _, name in await _applied(database_url)] == [
        *REPO,
        "9001_add_note.sql",
        "9002_note_index.sql",
    ]
    conn = await asyncpg.connect(database_url)
    try:
        half = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'half'"
        )
    finally:
        await conn.close()
    assert half == 0  # the broken file's first statement was undone with it
    assert await pending_migrations(database_url, schema_copy) == ["9003_broken.sql"]


async def test_concurrent_migrate_calls_apply_each_file_once(
    database_url: str, schema_copy: Path
) -> None:
    results = await asyncio.gather(*(migrate(database_url, schema_copy) for _ in range(4)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == [*REPO, "9001_add_note.sql", "9002_note_index.sql"]
    assert sum(1 for result in results if result) == 1  # one runner did it all
    assert len(await _applied(database_url)) == len(REPO) + 2


async def test_badly_named_or_duplicate_files_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "add_things.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_description\.sql"):
        await migrate(database_url, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "0001_one.sql").write_text("SELECT 1;")
    (tmp_path / "b" / "001_other.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share version 1"):
        await migrate(database_url, tmp_path / "b")


async def test_run_migrate_reports_and_exits(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # run_migrate owns its event loop (it is the CLI's entry point): run it off this one.
    assert await asyncio.to_thread(run_migrate, database_url) == 0
    assert capsys.readouterr().out == "".join(f"applied {name}\n" for name in REPO)
    assert await asyncio.to_thread(run_migrate, database_url) == 0
    assert capsys.readouterr().out == "schema up to date\n"

    closed = "postgresql://postgres:secret@127.0.0.1:1/postgres"
    assert await asyncio.to_thread(run_migrate, closed) == 2
    err = capsys.readouterr().err
    assert "cannot use the database at postgresql://postgres:***@127.0.0.1:1/postgres" in err
    assert "secret" not in err


async def test_create_pool_names_its_connections(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        name = await pool.fetchval("SELECT current_setting('application_name')")
    finally:
        await pool.close()
    assert name == "ext-proc"
