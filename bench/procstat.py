"""CPU time and memory of the processes under test, read from ``/proc`` (Linux only).

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (user + system time the process itself
used, all its threads; not its children's), memory is ``VmRSS`` of ``/proc/<pid>/status``.
A process that has exited reads as absent, never as zero, so a crash cannot pass for an
idle process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_seconds: float  # utime + stime
    rss_bytes: int


def sample(pid: int) -> ProcSample | None:
    """The process's CPU seconds and RSS now, or None when it no longer exists."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        status = (_PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return ProcSample(cpu_seconds=(utime + stime) / _TICKS, rss_bytes=rss)


def parent_of(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        parent = parent_of(int(entry.name))
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass(frozen=True, slots=True)
class GroupSample:
    """Summed over a group of processes (several ext_proc processes, a process tree)."""

    cpu_seconds: float
    rss_bytes: int
    pids: tuple[int, ...]  # those still running (a process gone is left out, not zero)


def sample_group(pids: Iterable[int]) -> GroupSample:
    cpu, rss, seen = 0.0, 0, []
    for pid in pids:
        one = sample(pid)
        if one is None:
            continue
        cpu += one.cpu_seconds
        rss += one.rss_bytes
        seen.append(pid)
    return GroupSample(cpu_seconds=cpu, rss_bytes=rss, pids=tuple(seen))
