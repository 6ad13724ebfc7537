"""``RecentIds``: the bounded set of request ids a process recorded (the usage-log reader
skips their lines, and waits for the ids of observed streams)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ext_proc.server.context import RecentIds


def test_keeps_the_last_ids_and_drops_the_oldest_first() -> None:
    recent = RecentIds(3)
    for request_id in ("a", "b", "c", "d"):
        recent.add(request_id)
    assert "a" not in recent
    assert all(i in recent for i in ("b", "c", "d"))
    assert len(recent) == 3


def test_adding_an_id_again_keeps_one_entry_and_its_place() -> None:
    recent = RecentIds(3)
    for request_id in ("a", "b", "a", "c", "d"):
        recent.add(request_id)
    assert len(recent) == 3
    assert "a" not in recent  # still the oldest: a repeat does not refresh it
    assert all(i in recent for i in ("b", "c", "d"))


def test_stays_bounded_when_full_for_long() -> None:
    recent = RecentIds(1000)
    for n in range(50_000):
        recent.add(f"req-{n}")
    assert len(recent) == 1000
    assert "req-48999" not in recent and "req-49000" in recent and "req-49999" in recent


# ------------------------------------------------------------- waiting for an id


async def turns(task: asyncio.Task[Any], most: int = 20) -> bool:
    """Let the loop run a few turns (no time passes): whether ``task`` finished."""
    for _ in range(most):
        if task.done():
            return True
        await asyncio.sleep(0)
    return task.done()


async def test_a_waiter_wakes_when_its_id_is_added_not_at_its_timeout() -> None:
    recent = RecentIds(3)
    waiter = asyncio.create_task(recent.wait("a", timeout=3600))
    assert not await turns(waiter)  # an hour to go: it waits
    recent.add("b")  # another id wakes nobody
    assert not await turns(waiter)
    recent.add("a")
    assert await turns(waiter)  # woken by the add itself, within a few loop turns
    assert waiter.result() is True
    assert recent._waiters == {}


async def test_every_waiter_of_an_id_wakes() -> None:
    recent = RecentIds(3)
    waiters = [asyncio.create_task(recent.wait("a", timeout=3600)) for _ in range(2)]
    await asyncio.sleep(0)
    recent.add("a")
    assert [await turns(w) for w in waiters] == [True, True]
    assert [w.result() for w in waiters] == [True, True]


async def test_an_id_already_added_needs_no_wait() -> None:
    recent = RecentIds(3)
    recent.add("a")
    assert await recent.wait("a", timeout=0) is True
    assert await recent.wait("b", timeout=0) is False  # a deadline already past
    assert recent._waiters == {}


async def test_a_waiter_gives_up_at_its_timeout_and_leaves_nothing_behind() -> None:
    recent = RecentIds(3)
    assert await recent.wait("a", timeout=0.01) is False
    assert recent._waiters == {}
    recent.add("a")  # a late add finds nobody to wake
    assert "a" in recent


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    recent = RecentIds(3)
    waiter = asyncio.create_task(recent.wait("a", timeout=3600))
    await asyncio.sleep(0)
    assert "a" in recent._waiters
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert recent._waiters == {}
