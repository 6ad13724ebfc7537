"""A redis-server of the tests' own, to kill, freeze and restart (the shared one at
127.0.0.1:6379 must never be touched that way)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis

from ext_proc.dev import free_port
from ext_proc.procutil import die_with_parent, stop_process
from ext_proc.stores.embedded import tcp_redis_command
from tests.conftest import poll_until


class PrivateRedis:
    """A redis-server of our own on a fixed spare port: killed with SIGKILL and started
    again on the same port (with no data: ``--save "" --appendonly no``)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            tcp_redis_command(self.port, self.data_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            assert poll_until(lambda: self._answers(probe), timeout=10.0), "redis did not start"
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            return bool(probe.ping())
        except redis.RedisError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, every client connection is cut at once."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and calls hang (until the client's timeout)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()  # a stopped process would not act on SIGTERM
            stop_process(self.process, timeout=10)
