"""Follow a log file another process appends to (Envoy's usage log), losing no line.

``LogTail`` reads complete lines from the file as they are written and hands them, in
batches, to a consumer. Its position is saved in ``<file>.pos`` only after the consumer
has made every line up to it durable (``commit``: for the usage log, every row written
to Postgres or to the disk spool), so a process that stops or crashes resumes where the
saved position says: a line may be read twice (the rows it makes are idempotent by
request id), never skipped.

- One reader per file: ``<file>.lock`` (flock) is held by the process that tails; the
  others wait and take over when it exits. Several ext_proc processes may be started
  with the same file.
- Rotation keeps the file bounded: once the reader has caught up past ``rotate_bytes``
  it renames the file to ``<file>.1`` and asks the writer to reopen its path (Envoy's
  admin ``POST /reopen_logs``); the writer's last lines still go to ``<file>.1``, which
  is read to its end once the new file exists, then removed. Without a ``reopen``
  callable the file is never rotated (a warning says so once it grows past the size).
- The position names the file by device and inode, so a restart mid-rotation finishes
  ``<file>.1`` first, and a file replaced under it is read from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

log = logging.getLogger(__name__)

LineBatch = list[bytes]


@dataclass(frozen=True, slots=True)
class TailOptions:
    poll_interval: float = 0.05  # seconds between looks at an idle file
    commit_interval: float = 1.0  # seconds between checkpoints while lines arrive
    max_batch_bytes: int = 4 * 1024 * 1024  # read at most this much per batch
    max_line_bytes: int = 64 * 1024 * 1024  # a longer "line" is junk: skipped, counted
    rotate_bytes: int = 256 * 1024 * 1024  # rotate once caught up past this size
    lock_retry: float = 1.0  # seconds between attempts to become the reader


@dataclass(frozen=True, slots=True)
class Position:
    dev: int
    ino: int
    offset: int

    def of(self, st: os.stat_result) -> bool:
        return self.dev == st.st_dev and self.ino == st.st_ino


class LogTail:
    """Reads ``path`` line by line for ``consume`` (see the module docstring).

    ``consume(lines)`` must return once every line's work is handed over; ``commit()``
    must return once everything handed over so far is durable. ``reopen()`` asks the
    writer to reopen the path (True when it accepted).
    """

    def __init__(
        self,
        path: Path,
        consume: Callable[[LineBatch], Awaitable[None]],
        commit: Callable[[], Awaitable[None]],
        *,
        reopen: Callable[[], Awaitable[bool]] | None = None,
        options: TailOptions = TailOptions(),
        on_skipped: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self.rotated = path.with_name(path.name + ".1")
        self._pos_path = path.with_name(path.name + ".pos")
        self._lock_path = path.with_name(path.name + ".lock")
        self._consume = consume
        self._commit = commit
        self._reopen = reopen
        self._options = options
        self._on_skipped = on_skipped
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock_file: IO[bytes] | None = None
        self.lines_read = 0  # for tests and metrics
        self.leader = False  # this process holds the lock and reads
        self._warned_size = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"tail:{self.path.name}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Read what is already in the file, commit, and stop."""
        self._stopping.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                log.warning("usage log reader did not stop within %.1fs", timeout)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        self._release_lock()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            while not await self._become_reader():
                if self._stopping.is_set():
                    return
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never silently: the usage of plain requests depends on this loop.
            log.exception("usage log reader failed; restarting it in 1 s")
            await asyncio.sleep(1.0)
            self._task = asyncio.create_task(self._run(), name=f"tail:{self.path.name}")

    async def _become_reader(self) -> bool:
        if self.leader or self._try_lock():
            return True
        await self._sleep(self._options.lock_retry)
        return False

    def _try_lock(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self._lock_path, "ab")  # noqa: SIM115 - held for the process's life
        except OSError as exc:
            log.error("cannot open %s: %s", self._lock_path, exc)
            return False
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock_file = f
        self.leader = True
        log.info("reading the usage log %s", self.path)
        return True

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self._lock_file.close()
            self._lock_file = None
            self.leader = False

    async def _follow(self) -> None:
        position = self._read_position()
        if self.rotated.exists():
            if position is not None and self._is_current(position):
                self._remove_rotated()  # finished before a crash, not yet removed
            else:
                # A rotation a previous reader began: its lines are older, read them first.
                with _open(self.rotated) as old:
                    st = os.fstat(old.fileno())
                    offset = position.offset if position is not None and position.of(st) else 0
                    if not await self._read_file(old, st, min(offset, st.st_size), rotating=True):
                        return
                position = None
        while True:
            f = self._open_current()
            if f is None:
                if self._stopping.is_set():
                    return
                await self._sleep(self._options.poll_interval)
                continue
            with f:
                st = os.fstat(f.fileno())
                offset = position.offset if position is not None and position.of(st) else 0
                if offset > st.st_size:
                    log.warning("usage log %s shrank under the reader; reading it again", self.path)
                    offset = 0
                if not await self._read_file(f, st, offset, rotating=False):
                    return  # stopping
            position = None  # the next file is read from its start

    def _is_current(self, position: Position) -> bool:
        try:
            return position.of(self.path.stat())
        except FileNotFoundError:
            return False

    def _open_current(self) -> IO[bytes] | None:
        try:
            return _open(self.path)
        except FileNotFoundError:
            return None

    async def _read_file(
        self, f: IO[bytes], st: os.stat_result, offset: int, *, rotating: bool
    ) -> bool:
        """Follow one open file from ``offset``. True when it was rotated away and read to
        its end (go on with the new file), False when stopping.

        ``rotating``: the file was renamed to ``<file>.1``; it is final once the writer has
        reopened the path (the path exists again).
        """
        f.seek(offset)
        pending = b""
        last_commit = time.monotonic()
        committed = offset
        reopen_asked = 0.0  # monotonic time of the last reopen request (0: none)
        while True:
            chunk = await asyncio.to_thread(f.read, self._options.max_batch_bytes)
            if chunk:
                data = pending + chunk
                cut = data.rfind(b"\n") + 1
                pending = data[cut:]
                offset += cut
                if len(pending) > self._options.max_line_bytes:
                    self._skip(len(pending))
                    offset += len(pending)
                    pending = b""
                if cut:
                    lines = data[:cut].split(b"\n")
                    lines.pop()  # the empty string after the last newline
                    self.lines_read += len(lines)
                    await self._consume([line for line in lines if line])
                if time.monotonic() - last_commit >= self._options.commit_interval:
                    await self._checkpoint(st, offset)
                    committed, last_commit = offset, time.monotonic()
                continue
            # At the end of what is written so far. The position is saved at most once a
            # commit_interval (each save waits for the writer to flush); lines past it are
            # only read again after a crash, which rewrites nothing.
            if offset != committed and (
                self._stopping.is_set()
                or rotating
                or time.monotonic() - last_commit >= self._options.commit_interval
            ):
                await self._checkpoint(st, offset)
                committed, last_commit = offset, time.monotonic()
            if self._stopping.is_set():
                return False
            if rotating:
                if self.path.exists():
                    # The writer reopened its path: whatever it still wrote here is in the
                    # file now. One more read settles it.
                    if await asyncio.to_thread(os.path.getsize, self.rotated) > offset + len(
                        pending
                    ):
                        continue
                    if pending:
                        self._skip(len(pending))  # a torn last line: never completed
                    self._remove_rotated()
                    return True
                if time.monotonic() - reopen_asked > 10.0:
                    reopen_asked = time.monotonic()
                    await self._ask_reopen()
            elif offset >= self._options.rotate_bytes and await self._rotate():
                rotating = True
                reopen_asked = time.monotonic()
                continue
            await self._sleep(self._options.poll_interval)

    async def _rotate(self) -> bool:
        """Rename the file away and ask the writer to reopen its path."""
        if self._reopen is None:
            if not self._warned_size:
                self._warned_size = True
                log.warning(
                    "usage log %s is past %d bytes and cannot be rotated (no writer reopen "
                    "configured: set EXT_PROC_ENVOY_ADMIN_URL)",
                    self.path,
                    self._options.rotate_bytes,
                )
            return False
        if self.rotated.exists():
            return False
        try:
            os.rename(self.path, self.rotated)
        except OSError as exc:
            log.warning("cannot rotate the usage log %s: %s", self.path, exc)
            return False
        log.info("rotating the usage log to %s", self.rotated)
        await self._ask_reopen()
        return True

    async def _ask_reopen(self) -> None:
        assert self._reopen is not None or not self.rotated.exists()
        if self._reopen is None:
            return
        try:
            accepted = await self._reopen()
        except Exception as exc:  # the writer is down: it opens the path when it starts
            log.warning("usage log reopen request failed: %s: %s", type(exc).__name__, exc)
            return
        if not accepted:
            log.warning("the usage log writer refused to reopen %s", self.path)

    def _remove_rotated(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.rotated)

    def _skip(self, size: int) -> None:
        log.error("usage log %s: skipped %d bytes that are not a complete line", self.path, size)
        if self._on_skipped is not None:
            self._on_skipped(size)

    async def _checkpoint(self, st: os.stat_result, offset: int) -> None:
        """Everything consumed up to ``offset`` is made durable, then the position saved."""
        await self._commit()
        data = orjson.dumps({"dev": st.st_dev, "ino": st.st_ino, "offset": offset})
        await asyncio.to_thread(_write_atomically, self._pos_path, data)

    def _read_position(self) -> Position | None:
        try:
            raw = self._pos_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            d = orjson.loads(raw)
            return Position(int(d["dev"]), int(d["ino"]), int(d["offset"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("usage log position %s is unreadable; reading from the start", self._pos_path)
            return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _open(path: Path) -> IO[bytes]:
    return open(path, "rb")  # the caller closes it


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
