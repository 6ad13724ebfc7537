"""``ext-proc serve --processes N``: N ext_proc server processes on one host.

One Python process serves one core at most (the event loop is single-threaded), so a
host with several cores for the gateway runs several servers. Each child is a plain
``ext-proc serve`` with its own ports: gRPC, metrics and admin API at the configured
port plus the child's index (50051, 50052, ...; 9464, 9465, ...; 8080, 8081, ...).
Envoy gets one endpoint per child (``ext-proc envoy-config --ext-proc-processes N``):
an HTTP/2 connection pins its streams to one process, so a shared port with
SO_REUSEPORT would send all of Envoy's traffic to whichever child accepted its
connection.

The children share everything else: the database, Redis, the spool folder (each segment
is locked by the process writing it; any process replays sealed ones, so nothing is
stranded when N shrinks) and Envoy's usage log, which one child at a time tails (a lock
file; another takes over when it exits). The supervisor forwards SIGTERM and
SIGINT (graceful stop) and SIGHUP (reload) to every child, starts a child again when it
dies (after a backoff that grows while it keeps dying), and exits once all children are
gone after a stop, with the first non-zero exit status if any.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # a child up this long has its backoff reset
POLL = 0.2


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0
    exits: list[int] = field(default_factory=list)


def without_processes_flag(argv: Sequence[str]) -> list[str]:
    """The command line of a child: the supervisor's own, less ``--processes N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def child_env(env: Mapping[str, str], index: int, base: Mapping[str, int]) -> dict[str, str]:
    """The environment of child ``index``: its own ports (the spool folder is shared:
    segments are locked by their writer and replayed by whichever process is free)."""
    out = dict(env)
    out["EXT_PROC_GRPC_PORT"] = str(base["grpc"] + index)
    out["EXT_PROC_METRICS_PORT"] = str(base["metrics"] + index)
    out["EXT_PROC_ADMIN_PORT"] = str(base["admin"] + index)
    return out


class Supervisor:
    def __init__(
        self,
        processes: int,
        serve_argv: Sequence[str],
        base_ports: Mapping[str, int],
        env: Mapping[str, str] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        for name, port in base_ports.items():
            if port == 0:
                raise ValueError(
                    f"--processes needs a fixed {name} port (children take port + index), not 0"
                )
        self._argv = list(serve_argv)
        self._base = dict(base_ports)
        self._env = dict(os.environ if env is None else env)
        self._children = [_Child(i) for i in range(processes)]
        self._stopping = False
        self._pending_signals: list[int] = []

    def _start(self, child: _Child) -> None:
        child.process = subprocess.Popen(
            [sys.executable, "-m", "ext_proc", *self._argv],
            env=child_env(self._env, child.index, self._base),
            preexec_fn=_die_with_parent(os.getpid()),
        )
        child.started = time.monotonic()
        log.info(
            "ext_proc process %d started (pid %d, gRPC :%d)",
            child.index,
            child.process.pid,
            self._base["grpc"] + child.index,
        )

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending_signals.append(signum)

    def _forward(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        for child in self._children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for child in self._children:
            self._start(child)
        while True:
            while self._pending_signals:
                self._forward(self._pending_signals.pop(0))
            now = time.monotonic()
            alive = 0
            for child in self._children:
                process = child.process
                if process is not None:
                    code = process.poll()
                    if code is None:
                        alive += 1
                        if now - child.started > STABLE_AFTER:
                            child.backoff = 0.5
                        continue
                    child.exits.append(code)
                    child.process = None
                    if not self._stopping:
                        child.restart_at = now + child.backoff
                        log.error(
                            "ext_proc process %d exited with %d; starting it again in %.1fs",
                            child.index,
                            code,
                            child.backoff,
                        )
                        child.backoff = min(child.backoff * 2, MAX_BACKOFF)
                if not self._stopping and child.process is None and now >= child.restart_at:
                    self._start(child)
                    alive += 1
            if self._stopping and alive == 0:
                codes = [child.exits[-1] for child in self._children if child.exits]
                return next((code for code in codes if code not in (0, -signal.SIGTERM)), 0)
            time.sleep(POLL)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """What a child runs before exec, on Linux: a SIGTERM when the supervisor dies, even
    by SIGKILL or a crash, so no server is left serving (and holding its ports) without
    one; the child then stops gracefully, as on the supervisor's own SIGTERM."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child
