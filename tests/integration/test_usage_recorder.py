"""The usage recorder against the real Postgres: every record lands exactly once.

Outages are real: a pool aimed at a closed port, a TCP proxy in front of Postgres that is
stopped and restarted, a table lock that holds writes past the close timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from ext_proc.dev import free_port
from ext_proc.metrics import Metrics
from ext_proc.stores.postgres import create_pool
from ext_proc.usage.record import UsageRecord
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.spool import Spool, encode_record
from tests.conftest import poll_async

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


# --- helpers ---


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def written(m: Metrics) -> float:
    return _sample(m, "ext_proc_usage_records_written_total")


def spooled(m: Metrics) -> float:
    return _sample(m, "ext_proc_usage_records_spooled_total")


def dropped(m: Metrics) -> float:
    return _sample(m, "ext_proc_usage_records_dropped_total")


def postgres_up(m: Metrics) -> float | None:
    return m.registry.get_sample_value("ext_proc_dependency_up", {"dependency": "postgres"})


def make_record(i: int, prefix: str = "req", **overrides: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"{prefix}-{i:05d}",
        "created_at": T0 + timedelta(milliseconds=i),
        "org_id": "acme" if i % 2 else None,
        "app_id": f"app-{i % 3}",
        "key_id": f"key-{i % 5}",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "provider": "azure-eastus",
        "stream": i % 2 == 0,
        "status_code": 200,
        "decision": "allowed",
        "prompt_tokens": i,
        "completion_tokens": 2 * i,
        "total_tokens": 3 * i,
        "tokens_estimated": i % 7 == 0,
        "latency_ms": i / 3,
        "ttft_ms": None,
        "response_bytes": 10**10 + i,
        "partial": i % 11 == 0,
        "policy_violations": ["short-prompts", f"p{i}"] if i % 4 == 0 else None,
        # numeric(20,10): exact, NULL when the model has no price
        "cost_usd": None if i % 13 == 0 else Decimal(i) * Decimal("0.0000012345"),
        "attempts": 1 + i % 3,
    }
    values.update(overrides)
    return UsageRecord(**values)


async def count_rows(url: str, where: str = "true") -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM usage_records WHERE {where}"))
    finally:
        await conn.close()


async def fetch_records(url: str, ids: list[str]) -> dict[str, UsageRecord]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM usage_records WHERE request_id = any($1::text[])", ids
        )
    finally:
        await conn.close()
    return {row["request_id"]: UsageRecord(**dict(row)) for row in rows}


def url_with(url: str, *, port: int) -> str:
    """``url`` pointed at ``port`` over TCP: on its host, or on 127.0.0.1 when it names a
    Unix socket (the embedded pgserver's ``?host=/dir``, dropped here)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
    return urlunsplit((parts.scheme, f"{userinfo}{host}:{port}", parts.path, query, ""))


def postgres_address(url: str) -> tuple[str, int] | str:
    """Where ``url``'s server listens: (host, port), or the path of its Unix socket."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    port = parts.port or int(query.get("port", 5432))
    socket_dir = query.get("host", "")
    if socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{port}"
    return (parts.hostname or "127.0.0.1", port)


class TcpProxy:
    """A TCP forwarder to Postgres that can be cut (listener closed, connections reset)
    and restored on the same port: a real network outage for the pool behind it."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target  # (host, port), or a Unix socket's path
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


# --- fixtures ---


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
async def recorders() -> AsyncIterator[Callable[..., UsageRecorder]]:
    """Builds recorders with test-friendly backoff; closes them all afterwards."""
    made: list[UsageRecorder] = []

    def make(
        pool: asyncpg.Pool | None, metrics: Metrics, spool: Spool, **kwargs: Any
    ) -> UsageRecorder:
        kwargs.setdefault("backoff_base", 0.02)
        kwargs.setdefault("backoff_max", 0.2)
        kwargs.setdefault("write_timeout", 5.0)
        recorder = UsageRecorder(pool, metrics, spool, **kwargs)
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        await recorder.close(timeout=5)


async def spooled_records(spool: Spool) -> list[UsageRecord]:
    return [r for segment in await spool.segments() for r in await spool.read(segment)]


async def spool_is_empty(spool: Spool) -> bool:
    return not await spool.segments()


# --- tests ---


async def test_5000_records_land_exactly_once_in_batches(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=500)
    await recorder.start()
    records = [make_record(i) for i in range(5000)]
    for record in records:
        recorder.submit(record)
    await recorder.flush()

    assert await count_rows(migrated_url) == 5000
    assert await count_rows(migrated_url, "request_id LIKE 'req-%'") == 5000
    assert written(metrics) == 5000
    assert spooled(metrics) == dropped(metrics) == 0
    # Batching: 10 COPYs for 5000 records, and the histogram saw each of them.
    assert recorder.stats.batches == 10
    assert _sample(metrics, "ext_proc_usage_batch_write_duration_seconds_count") == 10
    assert _sample(metrics, "ext_proc_usage_queue_depth") == 0
    assert postgres_up(metrics) == 1

    # Values round-trip exactly: None, bools, text[], timestamps, bigints, floats.
    sample = [records[i] for i in (0, 1, 4, 7, 11, 4999)]
    stored = await fetch_records(migrated_url, [r.request_id for r in sample])
    for record in sample:
        assert stored[record.request_id] == record
    assert stored["req-00004"].policy_violations == ["short-prompts", "p4"]
    assert stored["req-00001"].policy_violations is None
    assert stored["req-00001"].org_id == "acme" and stored["req-00000"].org_id is None
    assert stored["req-00007"].tokens_estimated is True
    assert stored["req-00004"].created_at == T0 + timedelta(milliseconds=4)
    assert stored["req-04999"].cost_usd == Decimal("0.0061712655")  # 4999 x 0.0000012345
    assert stored["req-00000"].cost_usd is None
    assert (stored["req-00007"].attempts, stored["req-00011"].attempts) == (2, 3)


async def test_close_flushes_what_is_queued(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    # A batch that never fills and a linger longer than the test: only close() writes.
    recorder = recorders(pool, metrics, spool, batch_size=10_000, flush_interval=3600)
    await recorder.start()
    for i in range(300):
        recorder.submit(make_record(i))
    assert await count_rows(migrated_url) == 0
    assert _sample(metrics, "ext_proc_usage_queue_depth") == 300

    await recorder.close()
    assert await count_rows(migrated_url) == 300
    assert written(metrics) == 300 and spooled(metrics) == 0
    assert await spool_is_empty(spool)

    # After close nothing is lost either: the record waits in the spool.
    recorder.submit(make_record(0, prefix="late"))
    assert spooled(metrics) == 1
    assert [r.request_id for r in await spooled_records(spool)] == ["late-00000"]


async def test_duplicate_request_ids_are_written_once(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=20)
    await recorder.start()
    originals = [make_record(i) for i in range(50)]
    for record in originals:
        recorder.submit(record)
    await recorder.flush()
    # The same ids again (a retried batch, a replayed spool): first write wins.
    for i in range(50):
        recorder.submit(make_record(i, prompt_tokens=999_999))
    await recorder.flush()
    assert await count_rows(migrated_url) == 50
    assert await count_rows(migrated_url, "prompt_tokens = 999999") == 0
    assert written(metrics) == 50 and recorder.stats.inserted == 50

    # A spool segment overlapping what is stored, replayed by a fresh recorder at start.
    await spool.append(originals[:30] + [make_record(i, prefix="new") for i in range(10)])
    spool.seal()
    metrics2 = Metrics()
    replayer = recorders(pool, metrics2, Spool(spool.directory))
    await replayer.start()
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    assert await count_rows(migrated_url) == 60
    assert written(metrics2) == 10
    assert replayer.stats.replayed_records == 40


async def test_a_higher_ranked_record_replaces_a_fallback_never_the_reverse(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    recorder = recorders(pool, Metrics(), spool, batch_size=20)
    await recorder.start()
    # A fallback rebuilt from the usage log lands first (another replica owns the
    # request); the owner's record then replaces it. And the other way round, a late
    # fallback changes nothing. Within one batch too.
    recorder.submit(make_record(1, prompt_tokens=5, recorded_by="access_log_fallback"))
    recorder.submit(make_record(2, prompt_tokens=7, recorded_by="response"))
    await recorder.flush()
    recorder.submit(make_record(1, prompt_tokens=50, recorded_by="response"))
    recorder.submit(make_record(2, prompt_tokens=70, recorded_by="access_log_fallback"))
    recorder.submit(make_record(3, prompt_tokens=9, recorded_by="access_log_fallback"))
    recorder.submit(make_record(3, prompt_tokens=90, recorded_by="request"))
    await recorder.flush()
    rows = await fetch_records(migrated_url, ["req-00001", "req-00002", "req-00003"])
    assert {rid: (r.prompt_tokens, r.recorded_by) for rid, r in rows.items()} == {
        "req-00001": (50, "response"),
        "req-00002": (7, "response"),
        "req-00003": (90, "request"),
    }


async def test_unreachable_postgres_spools_then_replays_when_a_pool_is_given(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    closed_port = free_port()
    dead_pool = await create_pool(url_with(migrated_url, port=closed_port), min_size=0)
    metrics = Metrics()
    recorder = recorders(dead_pool, metrics, spool, batch_size=100, max_attempts=2)
    await recorder.start()
    for i in range(1000):
        recorder.submit(make_record(i))
    await recorder.flush()  # returns: everything is in the spool

    assert spooled(metrics) == 1000 and written(metrics) == 0 and dropped(metrics) == 0
    assert _sample(metrics, "ext_proc_usage_write_errors_total") >= 2  # the retried batch
    assert postgres_up(metrics) == 0
    assert await count_rows(migrated_url) == 0
    assert len(await spooled_records(spool)) == 1000

    recorder.attach_pool(pool)  # Postgres is reachable now
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    assert await count_rows(migrated_url) == 1000
    assert written(metrics) == 1000
    assert postgres_up(metrics) == 1
    await dead_pool.close()


async def test_outage_and_recovery_behind_a_real_network_cut(
    migrated_url: str, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    proxy = TcpProxy(postgres_address(migrated_url))
    await proxy.start()
    via_proxy = await create_pool(url_with(migrated_url, port=proxy.port), max_size=2)
    metrics = Metrics()
    recorder = recorders(via_proxy, metrics, spool, batch_size=50, max_attempts=2)
    await recorder.start()
    try:
        for i in range(100):
            recorder.submit(make_record(i, prefix="before"))
        await recorder.flush()
        assert await count_rows(migrated_url) == 100

        await proxy.stop()  # Postgres is gone for the gateway
        for i in range(200):
            recorder.submit(make_record(i, prefix="during"))
        await recorder.flush()
        assert await count_rows(migrated_url) == 100
        assert spooled(metrics) == 200 and dropped(metrics) == 0
        assert postgres_up(metrics) == 0

        await proxy.start()  # back, same address; the same pool reconnects
        for i in range(100):
            recorder.submit(make_record(i, prefix="after"))

        async def all_landed() -> bool:
            return await count_rows(migrated_url) == 400

        assert await poll_async(all_landed, timeout=15.0, interval=0.02)
        await recorder.flush()
        assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
        assert written(metrics) == 400
        assert postgres_up(metrics) == 1
    finally:
        await recorder.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(via_proxy.close(), 5)
        with contextlib.suppress(Exception):
            await proxy.stop()


async def test_full_queue_spills_to_the_spool_and_nothing_is_lost(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, max_queue=10)
    # Not started yet: nothing drains the queue, so it fills.
    for i in range(25):
        recorder.submit(make_record(i))
    assert _sample(metrics, "ext_proc_usage_queue_depth") == 10
    assert spooled(metrics) == 15 and dropped(metrics) == 0

    await recorder.start()  # writes the queue, replays the spill
    await recorder.flush()
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    assert await count_rows(migrated_url) == 25
    assert written(metrics) == 25


async def test_queue_full_and_spool_broken_drops_with_a_count_and_a_log(
    migrated_url: str,
    pool: asyncpg.Pool,
    tmp_path: Path,
    recorders: Callable[..., UsageRecorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    metrics = Metrics()
    recorder = recorders(pool, metrics, Spool(blocker / "spool"), max_queue=2)
    with caplog.at_level(logging.ERROR, logger="ext_proc.usage.recorder"):
        for i in range(5):
            recorder.submit(make_record(i))  # never raises
    assert dropped(metrics) == 3 and spooled(metrics) == 0
    for i in (2, 3, 4):
        assert f"req-{i:05d} dropped" in caplog.text
    await recorder.close()  # the two queued ones still reach Postgres
    assert await count_rows(migrated_url) == 2


async def test_a_bad_record_does_not_poison_its_batch(
    migrated_url: str,
    pool: asyncpg.Pool,
    spool: Spool,
    recorders: Callable[..., UsageRecorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=100)
    await recorder.start()
    bad = {
        "req-00010": make_record(10, decision="maybe"),  # CHECK violation (server)
        "req-00020": make_record(20, prompt_tokens="many"),  # not an integer (client)
        "req-00030": make_record(30, prompt_tokens=2**40),  # out of the column's range
        "req-00040": make_record(40, stream=None),  # NOT NULL violation
    }
    # A NUL in text is no longer a bad record: the writer stores U+FFFD instead
    # (tests/integration/test_usage_text.py).
    with caplog.at_level(logging.WARNING, logger="ext_proc.usage.recorder"):
        for i in range(100):
            recorder.submit(bad.get(f"req-{i:05d}") or make_record(i))
        await recorder.flush()

    assert await count_rows(migrated_url) == 96
    assert await count_rows(migrated_url, f"request_id IN ({', '.join(map(repr, bad))})") == 0
    assert written(metrics) == 96 and dropped(metrics) == 0
    assert recorder.stats.rejected == 4 and recorder.stats.row_by_row == 1
    rejected = await spool.rejected()
    assert {r.record.request_id for r in rejected if r.record} == set(bad)
    by_id = {r.record.request_id: r for r in rejected if r.record}
    assert "CheckViolation" in by_id["req-00010"].error
    assert "NotNullViolation" in by_id["req-00040"].error
    assert by_id["req-00020"].record == bad["req-00020"]  # kept as submitted
    for request_id in bad:
        assert f"usage record {request_id} refused by Postgres" in caplog.text
    assert await spool_is_empty(spool)  # rejected records are not replayed

    # The writer is healthy afterwards.
    recorder.submit(make_record(0, prefix="next"))
    await recorder.flush()
    assert await count_rows(migrated_url) == 97
    assert postgres_up(metrics) == 1


async def test_close_spools_what_cannot_be_written_in_time(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    metrics = Metrics()
    recorder = recorders(pool, metrics, spool, batch_size=50)
    await recorder.start()
    blocker = await asyncpg.connect(migrated_url)
    try:
        # Another session holds the table: every write waits behind it.
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
        for i in range(120):
            recorder.submit(make_record(i))
        await recorder.close(timeout=0.5)
        assert spooled(metrics) == 120  # the in-flight batch and the queue
        await lock.rollback()
    finally:
        await blocker.close()
    assert await count_rows(migrated_url) == 0

    replayer = recorders(pool, Metrics(), Spool(spool.directory))
    await replayer.start()
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    assert await count_rows(migrated_url) == 120
    assert replayer.stats.replayed_records == 120


async def test_flush_before_start_is_an_error(
    pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    recorder = recorders(pool, Metrics(), spool)
    recorder.submit(make_record(1))
    with pytest.raises(RuntimeError, match="start"):
        await recorder.flush()


async def test_replay_survives_a_torn_segment_left_by_a_crash(
    migrated_url: str, pool: asyncpg.Pool, spool: Spool, recorders: Callable[..., UsageRecorder]
) -> None:
    good = [make_record(i, prefix="crash") for i in range(20)]
    spool.directory.mkdir(parents=True)
    torn = encode_record(make_record(20, prefix="crash"))[:40]
    segment = spool.directory / "usage-00000000000000000001-4242-abcdef.jsonl"
    segment.write_bytes(b"".join(encode_record(r) for r in good) + torn)

    recorder = recorders(pool, Metrics(), spool)
    await recorder.start()
    assert await poll_async(lambda: spool_is_empty(spool), timeout=15.0, interval=0.02)
    assert await count_rows(migrated_url) == 20
    stored = await fetch_records(migrated_url, [good[3].request_id])
    assert stored[good[3].request_id] == good[3]
    [kept] = await spool.rejected()  # the torn line is kept for a human, not lost
    assert kept.raw == torn.decode() and kept.error.startswith("torn last line")
