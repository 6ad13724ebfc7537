"""``RecentIds``: the bounded set of request ids a process recorded (the usage-log reader
skips their lines)."""

from __future__ import annotations

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
