"""The disk spool: exact round trips, torn lines, segment hand-over between processes."""

from __future__ import annotations

import fcntl
import logging
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from ext_proc.usage.record import UsageRecord
from ext_proc.usage.spool import Spool, SpoolFormatError, decode_record, encode_record


def full_record(request_id: str = "req-full") -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        created_at=datetime(2025, 3, 9, 23, 59, 58, 123456, tzinfo=UTC),
        org_id="acme",
        app_id="support-bot",
        key_id="key_01",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        provider="azure-eastus",
        deployment="gpt-4o-mini-prod",
        stream=True,
        status_code=200,
        decision="allowed",
        policy=None,
        prompt_tokens=12,
        completion_tokens=34,
        total_tokens=46,
        tokens_estimated=True,
        latency_ms=123.456789,
        ttft_ms=0.1,
        environment="prod",
        estimated_prompt_tokens=11,
        cached_tokens=0,
        cache_creation_tokens=None,
        reasoning_tokens=7,
        request_bytes=2048,
        response_bytes=10**12,
        partial=True,
        error_code=None,
        error_message='ünïcødé "quoted"\nnew line',
        policy_violations=["short-prompts", "tokens-per-minute"],
        recorded_by="response",
        cost_usd=Decimal("0.0123456789"),
        attempts=2,
    )


def test_encode_decode_round_trip_is_exact() -> None:
    for record in (
        full_record(),
        UsageRecord(request_id="minimal"),
        UsageRecord(
            request_id="offset",
            created_at=datetime(2025, 1, 1, 8, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            policy_violations=[],
        ),
        UsageRecord(request_id="naive", created_at=datetime(2025, 1, 1, 8, 0, 0, 1)),
        UsageRecord(request_id="free", cost_usd=Decimal("0E-10"), attempts=1),
        UsageRecord(request_id="big", cost_usd=Decimal("9999999999.9999999999")),
    ):
        line = encode_record(record)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        decoded = decode_record(line)
        assert decoded == record
        assert decoded.created_at.utcoffset() == record.created_at.utcoffset()


def test_cost_is_written_as_exact_text() -> None:
    line = encode_record(UsageRecord(request_id="c", cost_usd=Decimal("0.1000000003")))
    assert b'"cost_usd":"0.1000000003"' in line  # not a double: 0.1 has no exact one
    decoded = decode_record(line)
    assert decoded.cost_usd == Decimal("0.1000000003")
    assert isinstance(decoded.cost_usd, Decimal)
    assert decode_record(b'{"request_id": "old"}').cost_usd is None  # spooled before costs
    for junk in (b'"cheap"', b"true", b'"NaN"', b"[1]"):
        with pytest.raises(SpoolFormatError, match="cost_usd"):
            decode_record(b'{"request_id": "x", "cost_usd": ' + junk + b"}")


def test_integers_beyond_64_bits_are_kept() -> None:
    record = UsageRecord(request_id="huge", response_bytes=2**70)
    assert decode_record(encode_record(record)).response_bytes is not None


async def test_append_segments_read_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert await spool.segments() == []  # the folder does not exist yet
    first = [full_record(f"a-{i}") for i in range(3)]
    second = UsageRecord(request_id="b-0")
    await spool.append(first)
    spool.append_now([second])

    segments = await spool.segments()
    assert len(segments) == 1  # both appends went to the open segment, sealed by listing
    assert await spool.read(segments[0]) == [*first, second]

    await spool.append([UsageRecord(request_id="c-0")])  # a new segment after sealing
    later = await spool.segments()
    assert len(later) == 2 and later[0] == segments[0]  # oldest first

    await spool.remove(segments[0])
    await spool.remove(segments[0])  # already gone: fine
    remaining = await spool.segments()
    assert [r.request_id for r in await spool.read(remaining[0])] == ["c-0"]


async def test_segments_rotate_at_the_size_limit(tmp_path: Path) -> None:
    one_record = len(encode_record(full_record("r-0")))
    spool = Spool(tmp_path, segment_max_bytes=2 * one_record)
    for i in range(10):
        await spool.append([full_record(f"r-{i}")])
    segments = await spool.segments()
    assert len(segments) == 5  # two records per segment
    records = [r for s in segments for r in await spool.read(s)]
    assert [r.request_id for r in records] == [f"r-{i}" for i in range(10)]


async def test_torn_last_line_is_tolerated_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [UsageRecord(request_id=f"ok-{i}", prompt_tokens=i) for i in range(3)]
    torn = encode_record(full_record("torn"))[:57]  # a crash in the middle of a write
    path = tmp_path / "usage-00000000000000000001-1-abcdef.jsonl"
    path.write_bytes(b"".join(encode_record(r) for r in good) + torn)

    spool = Spool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ext_proc.usage.spool"):
        segment = await spool.load(path)
    assert segment.records == good
    assert len(segment.bad_lines) == 1
    bad = segment.bad_lines[0]
    assert bad.torn and bad.lineno == 4 and bad.raw == torn
    assert "partially written" in caplog.text and path.name in caplog.text
    assert await spool.read(path) == good

    await spool.reject_lines(path, segment.bad_lines)
    [entry] = await spool.rejected()
    assert entry.record is None and entry.raw == torn.decode()
    assert entry.error.startswith("torn last line")


async def test_corrupt_middle_line_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage-00000000000000000001-1-abcdef.jsonl"
    path.write_bytes(
        encode_record(UsageRecord(request_id="a"))
        + b'{"no_request_id": 1}\n'
        + b"\x00garbage\n"
        + encode_record(UsageRecord(request_id="b"))
    )
    with caplog.at_level(logging.ERROR, logger="ext_proc.usage.spool"):
        segment = await Spool(tmp_path).load(path)
    assert [r.request_id for r in segment.records] == ["a", "b"]
    assert [(b.lineno, b.torn) for b in segment.bad_lines] == [(2, False), (3, False)]
    assert "line 2" in caplog.text and "line 3" in caplog.text


async def test_a_segment_held_by_another_writer_is_not_listed(tmp_path: Path) -> None:
    writer = Spool(tmp_path)
    await writer.append([UsageRecord(request_id="held")])
    reader = Spool(tmp_path)  # e.g. another process sharing the folder
    assert await reader.segments() == []  # the writer still appends to its segment

    # A crashed process's segment: its lock is gone, so it is replayable.
    crashed = tmp_path / "usage-00000000000000000001-999-abcdef.jsonl"
    crashed.write_bytes(encode_record(UsageRecord(request_id="orphan")))
    assert await reader.segments() == [crashed]

    writer.seal()
    listed = await reader.segments()
    assert len(listed) == 2 and listed[0] == crashed


def test_open_segment_is_locked_until_sealed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append_now([UsageRecord(request_id="x")])
    [path] = list(tmp_path.glob("usage-*.jsonl"))
    with open(path, "rb") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        spool.seal()
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now


async def test_rejected_records_keep_the_record_and_the_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    bad = UsageRecord(request_id="bad", decision="bogus")  # type: ignore[arg-type]
    await spool.reject([(bad, "CheckViolationError: decision")])
    [entry] = await spool.rejected()
    assert entry.record == bad and entry.error == "CheckViolationError: decision"
    assert entry.rejected_at.tzinfo is not None
    assert await spool.segments() == []  # rejected files are never replayed


async def test_unwritable_folder_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    spool = Spool(blocker / "spool")
    with pytest.raises(OSError):
        spool.append_now([UsageRecord(request_id="x")])
    with pytest.raises(OSError):
        await spool.append([UsageRecord(request_id="y")])


async def test_pending_bytes_counts_every_segment_until_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.pending_bytes() == 0  # no folder yet
    await spool.append([full_record("a-0"), full_record("a-1")])
    open_size = spool.pending_bytes()
    assert open_size > 0  # the open segment counts
    (sealed,) = await spool.segments()
    other = Spool(tmp_path / "spool")  # another process sharing the folder
    await other.append([UsageRecord(request_id="b-0")])
    both = spool.pending_bytes()
    assert both > open_size == sealed.stat().st_size
    (tmp_path / "spool" / "notes.txt").write_text("not a segment")
    assert spool.pending_bytes() == both
    await spool.remove(sealed)
    assert 0 < spool.pending_bytes() == both - open_size
