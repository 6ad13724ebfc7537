"""The usage recorder: gets every usage record into Postgres without making requests wait.

The request path calls ``UsageRecorder.submit`` (synchronous, O(1), never raises). A
writer task drains the in-memory queue in batches: COPY into a per-connection temporary
staging table, then ``INSERT ... SELECT ... ON CONFLICT`` on the primary key into
``usage_records``, in one transaction, so a batch written twice (retry after a lost
commit acknowledgement, replay of a spooled copy) never duplicates a row. The key is
(request_id, created_at) since the table is partitioned by day (request_id alone
before migration 0007; the statement names the constraint and fits both): every record
of a request carries the request's start time as created_at, so they meet on it. The
same transaction queues the rows for the rollups (triggers on the table).

Nothing is dropped silently:

- a full queue sends the record to the disk spool (``Spool``);
- a failed batch (connection refused, timeout, server restarting) is retried with capped
  exponential backoff, then spooled, and the recorder treats Postgres as down: further
  batches go straight to the spool instead of piling up in memory, and a replay task
  probes Postgres with backoff, replays the spool when it answers (and at start), and
  deletes a spool segment only after its rows are committed;
- a record Postgres refuses for its content (a data error, e.g. a value out of range or a
  CHECK violation) sends that batch row by row, inside one transaction with a savepoint
  per row: the good rows are written, the bad ones go to the spool's rejected file with
  Postgres's error, and are counted and logged;
- only when the spool itself fails (disk full, unwritable folder) is a record dropped:
  counted in ``ext_proc_usage_records_dropped_total`` and logged with its request id.

A third task keeps the data in shape (``ext_proc.usage.maintenance``): every few seconds
it folds the changes the triggers queued into the hourly and daily rollups; at start and
every hour it creates the partitions of the days ahead and, with a retention set, drops
old days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import asyncpg

from ext_proc import telemetry
from ext_proc.metrics import Metrics
from ext_proc.usage.maintenance import MaintenancePolicy, fold, maintain
from ext_proc.usage.record import COLUMNS, UsageRecord, rank, rank_sql, record_row
from ext_proc.usage.spool import Spool

log = logging.getLogger(__name__)

_STAGING = "usage_records_staging"
_COLUMN_LIST = ", ".join(COLUMNS)
# Created once per connection (asyncpg's pool reset keeps temporary tables); emptied by
# every commit. LIKE copies the NOT NULL constraints, the INSERT checks the rest.
_CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} "
    "(LIKE usage_records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
# A replayed batch never duplicates a row; a second record of one request replaces the
# first only when it ranks higher (see record.RECORDER_RANK). The constraint is named,
# not its columns: (request_id) before migration 0007, (request_id, created_at) after.
_ON_CONFLICT = (
    "ON CONFLICT ON CONSTRAINT usage_records_pkey DO UPDATE SET "
    f"({_COLUMN_LIST}) = ({', '.join('EXCLUDED.' + c for c in COLUMNS)}) "
    f"WHERE {rank_sql('EXCLUDED.recorded_by')} > {rank_sql('usage_records.recorded_by')}"
)
_INSERT_FROM_STAGING = (
    f"INSERT INTO usage_records ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGING} "
    + _ON_CONFLICT
)
_INSERT_ONE = (
    f"INSERT INTO usage_records ({_COLUMN_LIST}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) " + _ON_CONFLICT
)


def _one_per_request(records: Sequence[UsageRecord]) -> Sequence[UsageRecord]:
    """One record per request id within a batch (an upsert cannot touch a row twice):
    the highest ranked, else the first."""
    seen: dict[str, UsageRecord] = {}
    for record in records:
        kept = seen.get(record.request_id)
        if kept is None or rank(record) > rank(kept):
            seen[record.request_id] = record
    return records if len(seen) == len(records) else list(seen.values())


async def _rows(records: Sequence[UsageRecord]) -> AsyncIterator[tuple[object, ...]]:
    """The batch's rows for COPY, letting the event loop go every ``_ROWS_PER_PASS``:
    a batch (up to 500 rows, ~10 µs each to build and encode) made in one go held the
    requests arriving meanwhile for milliseconds."""
    for index, record in enumerate(records):
        if index and not index % _ROWS_PER_PASS:
            await asyncio.sleep(0)
        yield record_row(record)


_ROWS_PER_PASS = 32
_SPILL_LINGER = 1.0  # seconds the replayer lets fresh spool data accumulate
_MAINTENANCE_RETRY = 60.0  # seconds before a failed partition maintenance runs again

# Errors caused by a record's content rather than by the connection: SQLSTATE classes 22
# (data exception) and 23 (integrity constraint), and asyncpg's client-side encoding
# errors (a str where an int goes, an int beyond the column's range: TypeError,
# ValueError incl. asyncpg's own DataError, OverflowError).
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    TypeError,
    ValueError,
    ArithmeticError,
)


@dataclass
class RecorderStats:
    """Counts for tests and debugging (the Prometheus metrics are the operational view)."""

    batches: int = 0  # COPY batches committed (fresh and replayed)
    inserted: int = 0  # rows added to usage_records (duplicates of existing ids excluded)
    row_by_row: int = 0  # batches re-sent row by row after a data error
    rejected: int = 0  # records refused by Postgres, kept in the rejected file
    replayed_segments: int = 0
    replayed_records: int = 0


def _inserted(status: str) -> int:
    """Row count of an ``INSERT 0 n`` command status."""
    return int(status.rsplit(" ", 1)[-1])


class UsageRecorder:
    """Queue, batch writer and spool replayer for usage records.

    ``submit`` is called on the event loop thread. ``pool`` may be ``None`` when
    Postgres is not available at start-up: records are spooled until ``attach_pool``.
    ``maintenance``: partitions ahead, retention, rollup folds (None: none of them).
    """

    def __init__(
        self,
        pool: asyncpg.Pool | None,
        metrics: Metrics,
        spool: Spool,
        *,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        write_timeout: float = 10.0,
        max_attempts: int = 3,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        replay_interval: float = 30.0,
        maintenance: MaintenancePolicy | None = MaintenancePolicy(),  # noqa: B008 (frozen)
    ) -> None:
        if max_queue < 1 or batch_size < 1 or max_attempts < 1:
            raise ValueError("max_queue, batch_size and max_attempts must be at least 1")
        self._pool = pool
        self._metrics = metrics
        self._spool = spool
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._write_timeout = write_timeout
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        # How often a healthy replayer looks for segments nobody told it about (left by a
        # crashed process sharing the spool folder).
        self._replay_interval = replay_interval
        self._maintenance = maintenance

        self._queue: deque[UsageRecord] = deque()
        # Request id -> span context of its record span, while the record waits in the
        # queue (tracing on only; popped when its batch is handled).
        self._traces: dict[str, object] = {}
        self._inflight: list[UsageRecord] = []  # taken from the queue, not finished yet
        self._enqueued = 0  # records ever queued
        self._finished = 0  # queued records written, spooled, rejected or dropped
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._urgent = False  # a flush is waiting: write without waiting for a full batch
        self._wakeup = asyncio.Event()  # writer: records arrived / flush / close
        self._spooled = asyncio.Event()  # replayer: something was spooled
        self._kick = asyncio.Event()  # replayer: pool attached or closing
        self._closing = False
        self._closed = False
        self._close_done = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._pool_attached = asyncio.Event()  # maintainer: a pool to work with
        if pool is not None:
            self._pool_attached.set()
        self._postgres_up = pool is not None
        self.stats = RecorderStats()

        metrics.usage_queue_depth.set_function(lambda: len(self._queue))
        if pool is None:
            self._set_dependency(False)

    # --- the request path ---

    def submit(self, record: UsageRecord, trace: object | None = None) -> None:
        """Hand a record over; returns at once and never raises. ``trace``: the span
        context of the request's record span (tracing on), linked from the write's span."""
        if self._closed or len(self._queue) >= self._max_queue:
            self._spool_now(record)
            return
        if trace is not None:
            self._traces[record.request_id] = trace
        self._queue.append(record)
        self._enqueued += 1
        depth = len(self._queue)
        if depth == 1 or depth >= self._batch_size:
            self._wakeup.set()

    def _spool_now(self, record: UsageRecord) -> None:
        try:
            self._spool.append_now([record])
        except Exception as exc:
            # submit must not raise; the record is lost, which the metric and log say.
            self._metrics.usage_dropped.inc()
            log.error(
                "usage record %s dropped: the queue is full and the spool failed: %s: %s",
                record.request_id,
                type(exc).__name__,
                exc,
            )
            return
        self._metrics.usage_spooled.inc()
        self._spooled.set()

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the writer and the replayer (which replays leftovers at once)."""
        if self._closing:
            raise RuntimeError("the usage recorder is closed")
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="usage-writer")
        if self._replayer is None:
            self._replayer = asyncio.create_task(self._replay_loop(), name="usage-replayer")
        if self._maintainer is None and self._maintenance is not None:
            self._maintainer = asyncio.create_task(
                self._maintain_loop(self._maintenance), name="usage-maintenance"
            )

    def attach_pool(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` from now on (Postgres became reachable); replay the spool."""
        self._pool = pool
        self._kick.set()
        self._pool_attached.set()

    async def flush(self) -> None:
        """Return once every record submitted before the call is written or spooled."""
        target = self._enqueued
        if self._finished >= target:
            return
        writer = self._writer
        if writer is None or writer.done():
            raise RuntimeError("the usage recorder is not running: start() it first")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._urgent = True
        self._wakeup.set()
        await asyncio.wait({future, writer}, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            raise RuntimeError("the usage writer stopped before the flush completed")

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued; spool whatever could not be written within ``timeout``.

        Records submitted after close go straight to the spool.
        """
        if self._closing:
            await self._close_done.wait()  # a concurrent close() does the work
            return
        self._closing = True
        self._wakeup.set()
        self._spooled.set()
        self._kick.set()
        if self._writer is None and self._queue:
            self._writer = asyncio.create_task(self._write_loop(), name="usage-writer")
        if self._writer is not None:
            done, _ = await asyncio.wait({self._writer}, timeout=timeout)
            if not done:
                log.warning(
                    "usage writer did not finish within %.1fs; spooling %d records",
                    timeout,
                    len(self._queue) + len(self._inflight),
                )
                await self._cancel(self._writer)
        if self._replayer is not None:
            # Between a commit and its segment's removal a cancel only means the segment
            # is replayed again next time, which inserts nothing.
            await self._cancel(self._replayer)
        if self._maintainer is not None:
            # Each partition change is its own transaction: a cancel rolls back at most one.
            await self._cancel(self._maintainer)
        # From here on submit() spools directly, so nothing can land in a queue that no
        # one drains any more.
        self._closed = True
        leftover = self._inflight + list(self._queue)
        self._queue.clear()
        self._inflight = []
        self._traces.clear()  # their spans are not linked; the records are kept
        if leftover:
            await self._spool_batch(leftover)
        self._finished = self._enqueued
        self._notify_waiters()
        self._spool.seal()
        self._close_done.set()

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # --- the writer ---

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < self._batch_size and not (self._urgent or self._closing):
                # Let a batch fill up (one COPY per many records), at most flush_interval.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval)
            count = min(self._batch_size, len(self._queue))
            self._inflight = [self._queue.popleft() for _ in range(count)]
            await self._handle_batch(self._inflight)
            self._inflight = []
            self._finished += count
            self._notify_waiters()

    def _notify_waiters(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._waiters:
            if future.done():
                continue
            if self._finished >= target:
                future.set_result(None)
            else:
                still.append((target, future))
        self._waiters = still
        self._urgent = bool(still)

    async def _handle_batch(self, batch: list[UsageRecord]) -> None:
        """Write ``batch`` to Postgres (with retries) or, failing that, to the spool."""
        if not self._traces:  # tracing off, or none of these requests was traced
            await self._write_or_spool(batch)
            return
        traces = self._traces
        contexts = [traces.pop(r.request_id) for r in batch if r.request_id in traces]
        span = telemetry.write_span(len(batch), contexts)
        if span is None:
            await self._write_or_spool(batch)
            return
        inserted = self.stats.inserted
        spooled = True
        try:
            spooled = not await self._write_or_spool(batch)
        finally:
            telemetry.end_write_span(
                span, inserted=None if spooled else self.stats.inserted - inserted, spooled=spooled
            )

    async def _write_or_spool(self, batch: list[UsageRecord]) -> bool:
        """True when Postgres took the batch, False when it went to the spool."""
        if self._pool is not None and self._postgres_up:
            delay = self._backoff_base
            for attempt in range(1, self._max_attempts + 1):
                try:
                    await self._write(batch)
                    return True
                except Exception as exc:  # connection-level; data errors are handled inside
                    self._metrics.usage_write_errors.inc()
                    last_try = attempt == self._max_attempts or self._closing
                    log.warning(
                        "usage batch of %d failed (attempt %d/%d%s): %s: %s",
                        len(batch),
                        attempt,
                        self._max_attempts,
                        ", spooling" if last_try else f", retrying in {delay:.2f}s",
                        type(exc).__name__,
                        exc,
                    )
                    if last_try:
                        self._mark_down()
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
        await self._spool_batch(batch)
        return False

    async def _spool_batch(self, batch: Sequence[UsageRecord]) -> None:
        try:
            await self._spool.append(batch)
        except Exception as exc:
            self._metrics.usage_dropped.inc(len(batch))
            log.error(
                "%d usage records dropped: Postgres did not take them and the spool failed "
                "(%s: %s); request ids: %s",
                len(batch),
                type(exc).__name__,
                exc,
                ", ".join(r.request_id for r in batch),
            )
            return
        self._metrics.usage_spooled.inc(len(batch))
        self._spooled.set()

    async def _write(self, records: Sequence[UsageRecord]) -> None:
        """One batch into Postgres, bounded by write_timeout; raises on connection errors."""
        started = time.perf_counter()
        inserted = await asyncio.wait_for(self._write_unbounded(records), self._write_timeout)
        self._metrics.usage_batch_duration.observe(time.perf_counter() - started)
        self._metrics.usage_written.inc(inserted)
        self.stats.batches += 1
        self.stats.inserted += inserted
        self._mark_up()

    async def _write_unbounded(self, records: Sequence[UsageRecord]) -> int:
        pool = self._pool
        if pool is None:
            raise ConnectionError("no Postgres pool")
        async with pool.acquire() as conn:
            try:
                return await self._copy(conn, records)
            except _DATA_ERRORS as exc:
                log.warning(
                    "usage batch of %d refused for its content (%s: %s); writing it row by row",
                    len(records),
                    type(exc).__name__,
                    exc,
                )
            self.stats.row_by_row += 1
            self._metrics.usage_write_errors.inc()
            inserted, rejected = await self._insert_rows(conn, records)
        if rejected:
            await self._reject(rejected)
        return inserted

    @staticmethod
    async def _copy(conn: asyncpg.Connection, records: Sequence[UsageRecord]) -> int:
        async with conn.transaction():
            await conn.execute(_CREATE_STAGING)
            await conn.copy_records_to_table(
                _STAGING, records=_rows(_one_per_request(records)), columns=COLUMNS
            )
            return _inserted(await conn.execute(_INSERT_FROM_STAGING))

    @staticmethod
    async def _insert_rows(
        conn: asyncpg.Connection, records: Sequence[UsageRecord]
    ) -> tuple[int, list[tuple[UsageRecord, str]]]:
        inserted = 0
        rejected: list[tuple[UsageRecord, str]] = []
        async with conn.transaction():
            for record in records:
                try:
                    async with conn.transaction():  # a savepoint: a bad row undoes only itself
                        inserted += _inserted(await conn.execute(_INSERT_ONE, *record_row(record)))
                except _DATA_ERRORS as exc:
                    rejected.append((record, f"{type(exc).__name__}: {exc}"))
        return inserted, rejected

    async def _reject(self, rejected: list[tuple[UsageRecord, str]]) -> None:
        self.stats.rejected += len(rejected)
        self._metrics.usage_rejected.inc(len(rejected))
        for record, error in rejected:
            log.error("usage record %s refused by Postgres: %s", record.request_id, error)
        try:
            await self._spool.reject(rejected)
        except Exception as exc:
            self._metrics.usage_dropped.inc(len(rejected))
            log.error(
                "%d refused usage records dropped: the rejected file could not be written "
                "(%s: %s); request ids: %s",
                len(rejected),
                type(exc).__name__,
                exc,
                ", ".join(r.request_id for r, _ in rejected),
            )

    # --- Postgres health ---

    def _set_dependency(self, up: bool) -> None:
        self._metrics.dependency_up.labels(dependency="postgres").set(1 if up else 0)

    def _mark_up(self) -> None:
        if not self._postgres_up:
            log.info("Postgres answers again: writing usage records to it")
        self._postgres_up = True
        self._set_dependency(True)

    def _mark_down(self) -> None:
        if self._postgres_up:
            log.error("Postgres unavailable: spooling usage records until it answers")
        self._postgres_up = False
        self._set_dependency(False)

    # --- the replayer ---

    async def _replay_loop(self) -> None:
        delay = self._backoff_base
        while not self._closing:
            self._spooled.clear()
            self._kick.clear()
            if self._pool is None:
                await self._kick.wait()
                continue
            if await self._replay_once():
                delay = self._backoff_base
                await self._wait(self._spooled, self._replay_interval)
                if self._spooled.is_set():
                    # Queue-full spills come one record at a time: gather them into one
                    # segment rather than replaying a file per record.
                    await self._wait(self._kick, _SPILL_LINGER)
            else:
                # Backing off: new spool data does not shorten the wait, a new pool does.
                await self._wait(self._kick, delay)
                delay = min(delay * 2, self._backoff_max)

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    async def _replay_once(self) -> bool:
        """Replay every replayable segment; False when it should be tried again later."""
        try:
            segments = await self._spool.segments()
        except OSError as exc:
            log.error("cannot list the usage spool %s: %s", self._spool.directory, exc)
            return False
        if not segments:
            if not self._postgres_up:
                return await self._postgres_call(self._probe(), "probing Postgres")
            return True
        for path in segments:
            if self._closing:
                return True
            try:
                segment = await self._spool.load(path)
            except OSError as exc:
                log.error("cannot read usage spool segment %s: %s", path, exc)
                continue  # the others may still replay; this one is kept for later
            for start in range(0, len(segment.records), self._batch_size):
                chunk = segment.records[start : start + self._batch_size]
                if not await self._postgres_call(self._write(chunk), "replaying the spool"):
                    return False
            try:
                if segment.bad_lines:
                    await self._spool.reject_lines(path, segment.bad_lines)
                await self._spool.remove(path)
            except OSError as exc:
                # Its rows are committed; replaying it again later inserts nothing.
                log.error("cannot remove replayed usage spool segment %s: %s", path, exc)
                return False
            self.stats.replayed_segments += 1
            self.stats.replayed_records += len(segment.records)
            log.info("replayed %d spooled usage records from %s", len(segment.records), path.name)
        return True

    async def _postgres_call(self, call: Awaitable[None], what: str) -> bool:
        try:
            await call
        except Exception as exc:  # connection-level; data errors are handled inside _write
            self._metrics.usage_write_errors.inc()
            self._mark_down()
            log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
            return False
        return True

    async def _probe(self) -> None:
        pool = self._pool
        if pool is None:
            raise ConnectionError("no Postgres pool")
        await asyncio.wait_for(pool.fetchval("SELECT 1"), self._write_timeout)
        self._mark_up()

    # --- maintenance ---

    async def _maintain_loop(self, policy: MaintenancePolicy) -> None:
        """Fold the rollups every ``policy.fold_interval``; partitions ahead (and
        retention) at start, then every ``policy.interval``. Idle while Postgres is down."""
        await self._pool_attached.wait()
        next_partitions = 0.0
        while not self._closing:
            pool = self._pool
            if pool is not None and self._postgres_up:
                if time.monotonic() >= next_partitions:
                    ok = await self._maintenance_step(maintain(pool, policy), "partitions")
                    wait = policy.interval if ok else min(policy.interval, _MAINTENANCE_RETRY)
                    next_partitions = time.monotonic() + wait
                await self._maintenance_step(fold(pool), "rollup fold")
            await asyncio.sleep(policy.fold_interval)

    async def _maintenance_step(self, step: Awaitable[object], what: str) -> bool:
        try:
            await step
        except Exception as exc:  # a lock timeout, Postgres gone: the next run retries
            log.warning("usage %s failed: %s: %s", what, type(exc).__name__, exc)
            return False
        return True
