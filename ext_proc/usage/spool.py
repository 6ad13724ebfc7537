"""The usage spool: records that could not go to Postgres yet, kept on local disk.

Records are appended as JSON lines (one ``UsageRecord`` per line, datetimes in ISO 8601,
decimals such as ``cost_usd`` as strings, so a line decodes back to an equal record) to
*segment* files ``usage-<time_ns>-<pid>-<token>.jsonl``. A Spool appends to one open
segment, which it holds under an exclusive ``flock``; ``segments()`` seals that segment
and lists every segment nobody holds, oldest first, so a replayer never reads a file
that is still being written, and segments left by a crashed process (lock released by
the kernel) are replayed by whichever process shares the folder. A replayer deletes a
segment only after its rows are committed; replaying a segment twice is harmless
because the writer's insert ignores request ids already present.

Records Postgres refuses for their content, and lines that cannot be decoded, go to
``rejected-*.jsonl`` files with the reason: they are never replayed automatically and
never deleted by the gateway (an operator looks at them).

File I/O runs in a worker thread (``append``, ``segments``, ...) except ``append_now``,
the synchronous path ``UsageRecorder.submit`` takes when its queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, get_args, get_type_hints

import orjson

from ext_proc.usage.record import COLUMNS, UsageRecord, clean_text

log = logging.getLogger(__name__)

SEGMENT_MAX_BYTES = 16 * 1024 * 1024  # ~25k records; a replay reads one segment at once
_SEGMENT_GLOB = "usage-*.jsonl"
_REJECTED_GLOB = "rejected-*.jsonl"
_FIELDS = frozenset(COLUMNS)
_DATETIME_FIELDS = frozenset(
    name for name, hint in get_type_hints(UsageRecord).items() if hint is datetime
)
# Written as strings (exact; JSON numbers would go through a double), read back here.
_DECIMAL_FIELDS = frozenset(
    name
    for name, hint in get_type_hints(UsageRecord).items()
    if hint is Decimal or Decimal in get_args(hint)
)


class SpoolFormatError(ValueError):
    """A spool line is not a usage record."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of a segment that could not be decoded."""

    lineno: int
    raw: bytes
    error: str
    torn: bool  # the unterminated last line: a write cut short by a crash


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    records: list[UsageRecord]
    bad_lines: list[BadLine]


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry of a rejected file: a record Postgres refused, or an undecodable line."""

    rejected_at: datetime
    error: str
    record: UsageRecord | None
    raw: str | None  # the undecodable line, when there was no record


def _default(value: object) -> object:
    # Decimals are written as their exact text (cost_usd). Values of unexpected types are
    # kept as text rather than lost; if the column cannot take them the record ends in
    # the rejected file with Postgres's reason.
    return str(value)


def _readable(value: object) -> object:
    if isinstance(value, str):
        return clean_text(value, len(value))
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value


def encode_record(record: UsageRecord) -> bytes:
    """One JSON line (newline included)."""
    try:
        return orjson.dumps(record, default=_default, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits and lone surrogates; the standard library
        # writes both, but a surrogate escape would not read back (orjson refuses it):
        # text is cleaned as the writer cleans it (U+FFFD), its length kept.
        data = {name: _readable(getattr(record, name)) for name in COLUMNS}
        for name in _DATETIME_FIELDS:
            value = data[name]
            if isinstance(value, datetime):
                data[name] = value.isoformat()
        return (json.dumps(data, default=_default) + "\n").encode()


def decode_record(line: bytes | str) -> UsageRecord:
    """The record a line of ``encode_record`` holds; ``SpoolFormatError`` if it holds none."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise SpoolFormatError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise SpoolFormatError("not a usage record (no request_id)")
    unknown = data.keys() - _FIELDS
    if unknown:
        # Written by a release with more fields than this one: keep what maps.
        log.warning(
            "spooled record %s has fields this version does not know: %s",
            data["request_id"],
            ", ".join(sorted(unknown)),
        )
    values: dict[str, Any] = {k: v for k, v in data.items() if k in _FIELDS}
    for name in _DATETIME_FIELDS:
        raw = values.get(name)
        if isinstance(raw, str):
            try:
                values[name] = datetime.fromisoformat(raw)
            except ValueError:
                raise SpoolFormatError(f"{name}={raw!r} is not an ISO datetime") from None
    for name in _DECIMAL_FIELDS:
        raw = values.get(name)
        if raw is None:
            continue
        try:
            value = Decimal(raw) if isinstance(raw, str | int) else Decimal("NaN")
        except InvalidOperation:
            value = Decimal("NaN")
        if isinstance(raw, bool) or not value.is_finite():
            raise SpoolFormatError(f"{name}={raw!r} is not a decimal number")
        values[name] = value
    return UsageRecord(**values)


def _encode_rejected(rejected_at: datetime, error: str, **entry: object) -> bytes:
    return orjson.dumps(
        {"rejected_at": rejected_at, "error": error, **entry},
        default=_default,
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _unheld(path: Path) -> bool:
    """True when no process holds ``path`` open for appending (its flock is free)."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return True
    except FileNotFoundError:
        return False


class Spool:
    """Append-only JSONL segments of usage records in ``directory`` (created on demand)."""

    def __init__(self, directory: Path, *, segment_max_bytes: int = SEGMENT_MAX_BYTES) -> None:
        self.directory = directory
        self._segment_max_bytes = segment_max_bytes
        self._lock = threading.Lock()  # the open segment; taken by threads and the loop
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._size = 0
        self._rejected_path: Path | None = None

    # --- writing ---

    async def append(self, records: Sequence[UsageRecord]) -> None:
        """Append ``records`` durably (written and fsynced) without blocking the loop."""
        if records:
            await asyncio.to_thread(self._append, records, True)

    def append_now(self, records: Sequence[UsageRecord]) -> None:
        """Append synchronously (page cache, no fsync): for the rare queue-full path."""
        if records:
            self._append(records, False)

    def seal(self) -> None:
        """Close the open segment so that any process may replay it. Idempotent."""
        with self._lock:
            self._seal_locked()

    def _append(self, records: Sequence[UsageRecord], fsync: bool) -> None:
        payload = b"".join(encode_record(r) for r in records)
        with self._lock:
            f = self._file if self._file is not None else self._open_locked()
            try:
                f.write(payload)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            except OSError:
                # The file may end in a partial line now: never append after it.
                self._seal_locked()
                raise
            self._size += len(payload)
            if self._size >= self._segment_max_bytes:
                self._seal_locked()

    def _new_name(self, kind: str) -> Path:
        return self.directory / (
            f"{kind}-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}.jsonl"
        )

    def _open_locked(self) -> IO[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._new_name("usage")
        f = open(path, "ab")  # noqa: SIM115 - held open across appends, closed by seal
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise
        self._file, self._path, self._size = f, path, 0
        return f

    def _seal_locked(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # releases the flock
            except OSError:
                log.exception("closing spool segment %s failed", self._path)
        self._file, self._path, self._size = None, None, 0

    def pending_bytes(self) -> int:
        """Bytes of usage records waiting in the folder (every process's segments, the
        open one included); read when Prometheus scrapes, a directory listing."""
        total = 0
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if fnmatch.fnmatchcase(entry.name, _SEGMENT_GLOB):
                        with contextlib.suppress(FileNotFoundError):  # replayed meanwhile
                            total += entry.stat().st_size
        except FileNotFoundError:
            return 0
        return total

    # --- replaying ---

    async def segments(self) -> list[Path]:
        """Sealed segments of every process sharing the folder, oldest first.

        Seals this spool's open segment first, so everything appended before the call
        is listed.
        """
        return await asyncio.to_thread(self._segments)

    def _segments(self) -> list[Path]:
        self.seal()
        if not self.directory.is_dir():
            return []
        return [p for p in sorted(self.directory.glob(_SEGMENT_GLOB)) if _unheld(p)]

    async def read(self, segment: Path) -> list[UsageRecord]:
        """The records of ``segment``; undecodable lines are logged and skipped."""
        return (await self.load(segment)).records

    async def load(self, segment: Path) -> Segment:
        """The records of ``segment`` and the lines that could not be decoded."""
        return await asyncio.to_thread(self._load, segment)

    def _load(self, segment: Path) -> Segment:
        try:
            data = segment.read_bytes()
        except FileNotFoundError:
            # Replayed and removed by another process sharing the folder.
            return Segment(segment, [], [])
        lines = data.split(b"\n")
        last = len(lines) - 1  # the text after the final newline: b"" unless torn
        records: list[UsageRecord] = []
        bad: list[BadLine] = []
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(decode_record(line))
            except (SpoolFormatError, TypeError) as exc:
                torn = index == last
                bad.append(BadLine(index + 1, line, str(exc), torn))
                if torn:
                    log.warning(
                        "spool segment %s ends in a partially written line (%d bytes, "
                        "a write cut short by a crash); skipped",
                        segment.name,
                        len(line),
                    )
                else:
                    log.error(
                        "spool segment %s line %d is not a usage record (%s); skipped",
                        segment.name,
                        index + 1,
                        exc,
                    )
        return Segment(segment, records, bad)

    async def remove(self, segment: Path) -> None:
        """Delete a segment whose records are committed (absent is fine)."""
        await asyncio.to_thread(segment.unlink, missing_ok=True)

    # --- rejected records ---

    async def reject(self, entries: Sequence[tuple[UsageRecord, str]]) -> None:
        """Keep records Postgres refused, with its error, in a rejected file."""
        now = datetime.now(UTC)
        payload = b"".join(_encode_rejected(now, error, record=record) for record, error in entries)
        await asyncio.to_thread(self._append_rejected, payload)

    async def reject_lines(self, segment: Path, lines: Sequence[BadLine]) -> None:
        """Keep undecodable lines of ``segment`` (before it is removed), with the reason."""
        now = datetime.now(UTC)
        payload = b"".join(
            _encode_rejected(
                now,
                ("torn last line: " if bad.torn else "") + bad.error,
                segment=segment.name,
                line=bad.lineno,
                raw=bad.raw.decode("utf-8", "replace"),
            )
            for bad in lines
        )
        await asyncio.to_thread(self._append_rejected, payload)

    def _append_rejected(self, payload: bytes) -> None:
        if not payload:
            return
        with self._lock:
            if self._rejected_path is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._rejected_path = self._new_name("rejected")
            with open(self._rejected_path, "ab") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

    async def rejected(self) -> list[Rejected]:
        """Every entry of every rejected file in the folder, oldest file first."""
        return await asyncio.to_thread(self._rejected)

    def _rejected(self) -> list[Rejected]:
        if not self.directory.is_dir():
            return []
        entries: list[Rejected] = []
        for path in sorted(self.directory.glob(_REJECTED_GLOB)):
            for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    data = orjson.loads(line)
                    record = data.get("record")
                    entries.append(
                        Rejected(
                            rejected_at=datetime.fromisoformat(data["rejected_at"]),
                            error=data["error"],
                            record=decode_record(orjson.dumps(record)) if record else None,
                            raw=data.get("raw"),
                        )
                    )
                except (orjson.JSONDecodeError, SpoolFormatError, KeyError, TypeError) as exc:
                    log.warning("%s line %d is not a rejected entry: %s", path.name, lineno, exc)
        return entries
