"""The durable log follower: every line once, in order, across restarts and rotations
(files in a temporary folder; a list stands in for the usage writer)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson

from ext_proc.usage.tail import LogTail, TailOptions

FAST = TailOptions(poll_interval=0.005, commit_interval=0.01, lock_retry=0.01)


class Consumer:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.committed: list[int] = []  # len(lines) at each commit

    async def consume(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    async def commit(self) -> None:
        self.committed.append(len(self.lines))


def append(path: Path, *lines: bytes) -> None:
    write(path, b"".join(line + b"\n" for line in lines))


def write(path: Path, data: bytes) -> None:
    """Append raw bytes, as Envoy's flush does (possibly half a line)."""
    with open(path, "ab") as f:
        f.write(data)


async def until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def tail(path: Path, consumer: Consumer, **kwargs: object) -> LogTail:
    return LogTail(path, consumer.consume, consumer.commit, **kwargs)  # type: ignore[arg-type]


async def test_lines_in_order_and_a_torn_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    consumer = Consumer()
    reader = tail(path, consumer, options=FAST)
    reader.start()
    append(path, b"a", b"b")
    write(path, b"c-start")  # Envoy flushed half a line
    await until(lambda: consumer.lines == [b"a", b"b"])
    write(path, b"-end\n")
    await until(lambda: consumer.lines == [b"a", b"b", b"c-start-end"])
    await reader.stop()
    assert consumer.committed and consumer.committed[-1] == 3


async def test_restart_resumes_at_the_saved_position(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    first = Consumer()
    reader = tail(path, first, options=FAST)
    reader.start()
    append(path, b"1", b"2")
    await until(lambda: len(first.lines) == 2)
    await reader.stop()
    append(path, b"3", b"4")  # written while no reader runs (ext_proc down)
    second = Consumer()
    reader = tail(path, second, options=FAST)
    reader.start()
    await until(lambda: second.lines == [b"3", b"4"])
    await reader.stop()
    position = orjson.loads((tmp_path / "usage.jsonl.pos").read_bytes())
    assert position["offset"] == path.stat().st_size


async def test_position_is_saved_only_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    consumer = Consumer()
    failing = True

    async def commit() -> None:
        if failing:
            raise ConnectionError("the writer could not make it durable")
        consumer.committed.append(len(consumer.lines))

    reader = LogTail(path, consumer.consume, commit, options=FAST)
    reader.start()
    append(path, b"x")
    await until(lambda: consumer.lines == [b"x"])
    await asyncio.sleep(0.05)
    assert not (tmp_path / "usage.jsonl.pos").exists()
    failing = False
    # The reader restarts after its failure and reads the line again: seen twice, never lost.
    await until(lambda: consumer.committed != [], timeout=5)
    await reader.stop()
    assert consumer.lines.count(b"x") >= 2


async def test_rotation_reads_every_line_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    rotated = tmp_path / "usage.jsonl.1"
    consumer = Consumer()
    reopened = asyncio.Event()

    async def reopen() -> bool:
        reopened.set()
        return True

    options = TailOptions(
        poll_interval=0.005, commit_interval=0.01, lock_retry=0.01, rotate_bytes=100
    )
    reader = tail(path, consumer, options=options, reopen=reopen)
    reader.start()
    sent = [f"line-{i:03d}".encode() for i in range(20)]
    append(path, *sent[:15])  # 135 bytes: past rotate_bytes
    await asyncio.wait_for(reopened.wait(), 5)
    assert rotated.exists() and not path.exists()
    # The writer still had lines for the old file, then opens the path again.
    append(rotated, *sent[15:18])
    append(path, *sent[18:])
    await until(lambda: len(consumer.lines) == 20)
    await until(lambda: not rotated.exists())
    await reader.stop()
    assert consumer.lines == sent


async def test_a_rotation_left_by_a_crash_is_finished_first(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    rotated = tmp_path / "usage.jsonl.1"
    append(rotated, b"old-1", b"old-2", b"old-3")
    st = os.stat(rotated)
    # The previous reader had read old-1 when it died.
    (tmp_path / "usage.jsonl.pos").write_bytes(
        orjson.dumps({"dev": st.st_dev, "ino": st.st_ino, "offset": 6})
    )
    append(path, b"new-1")
    consumer = Consumer()
    reader = tail(path, consumer, options=FAST)
    reader.start()
    await until(lambda: len(consumer.lines) == 3)
    await reader.stop()
    assert consumer.lines == [b"old-2", b"old-3", b"new-1"]
    assert not rotated.exists()


async def test_one_reader_per_file(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    a, b = Consumer(), Consumer()
    first = tail(path, a, options=FAST)
    first.start()
    await until(lambda: first.leader)
    second = tail(path, b, options=FAST)
    second.start()
    append(path, b"1", b"2")
    await until(lambda: len(a.lines) == 2)
    assert b.lines == [] and not second.leader
    await first.stop()  # the other takes over and goes on from the saved position
    append(path, b"3")
    await until(lambda: b.lines == [b"3"])
    await second.stop()
