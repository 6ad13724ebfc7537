"""``ext-proc serve --processes N``: N servers on consecutive ports, each restarted when
it dies, all stopped gracefully by one SIGTERM to the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc.server.supervisor import child_env, without_processes_flag
from tests.conftest import DatabaseFactory

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:9"}
models:
  gpt-4o-mini: {provider: mock}
applications:
  app: {org: acme}
"""


def test_children_get_the_command_line_less_the_flag_and_their_own_ports() -> None:
    argv = ["--log-level", "info", "serve", "--processes", "3", "-c", "g.yaml", "--processes=2"]
    assert without_processes_flag(argv) == ["--log-level", "info", "serve", "-c", "g.yaml"]
    env = child_env(
        {"EXT_PROC_SPOOL_DIR": "/var/spool/gw", "KEEP": "1"},
        2,
        {"grpc": 50051, "metrics": 9464, "admin": 8080},
    )
    assert env["EXT_PROC_GRPC_PORT"] == "50053"
    assert env["EXT_PROC_METRICS_PORT"] == "9466"
    assert env["EXT_PROC_ADMIN_PORT"] == "8082"
    assert env["EXT_PROC_SPOOL_DIR"] == "/var/spool/gw"  # shared: segments are locked
    assert env["KEEP"] == "1"


def _free_run(count: int) -> int:
    """A port p such that p .. p+count-1 are all free now."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return sorted(found)


async def _ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"admin API :{port} not ready"
            await asyncio.sleep(0.1)


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await asyncio.wait_for(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()), 10
        )
    return int(answer.status)


async def _start_two(
    databases: DatabaseFactory, redis_url: str, tmp_path: Path, name: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    """``ext-proc serve --processes 2`` on a database and Redis prefix of its own: the
    supervisor, and the first gRPC and admin ports of its children."""
    database_url = await databases.create(name.replace("-", "_"))
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    grpc_base, metrics_base, admin_base = _free_run(2), _free_run(2), _free_run(2)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "EXT_PROC_REDIS_PREFIX": f"gwtest:{name}:{os.getpid()}:",
        "EXT_PROC_GRPC_PORT": str(grpc_base),
        "EXT_PROC_METRICS_PORT": str(metrics_base),
        "EXT_PROC_ADMIN_PORT": str(admin_base),
        "EXT_PROC_SPOOL_DIR": str(tmp_path / "spool"),
        "EXT_PROC_USAGE_LOG": str(tmp_path / "usage-log" / "envoy.jsonl"),
    }
    migrate = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ext_proc", "migrate"], env=env, check=False
    )
    assert migrate.returncode == 0
    supervisor = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "ext_proc", "serve", "--processes", "2", "-c", str(config)],
        env=env,
    )
    return supervisor, grpc_base, admin_base


async def test_two_processes_restart_and_stop_together(
    databases: DatabaseFactory, redis_url: str, tmp_path: Path
) -> None:
    supervisor, grpc_base, admin_base = await _start_two(
        databases, redis_url, tmp_path, "supervisor"
    )
    try:
        for index in range(2):
            await _ready(admin_base + index)
            assert await _health(grpc_base + index) == health_pb2.HealthCheckResponse.SERVING
        first = _children(supervisor.pid)
        assert len(first) == 2
        # A child killed outright is started again, on the same ports.
        os.kill(first[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = _children(supervisor.pid)
            if len(now) == 2 and first[1] not in now:
                break
            assert time.monotonic() < deadline, f"not restarted: {now}"
            await asyncio.sleep(0.1)
        await _ready(admin_base + 1)
        assert await _health(grpc_base + 1) == health_pb2.HealthCheckResponse.SERVING
        # One SIGTERM stops both, gracefully, and the supervisor exits 0.
        children = _children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(supervisor.wait, 60)
        assert code == 0
        gone = await asyncio.to_thread(lambda: [not Path(f"/proc/{p}").exists() for p in children])
        assert all(gone), children
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


async def test_children_stop_when_the_supervisor_is_killed(
    databases: DatabaseFactory, redis_url: str, tmp_path: Path
) -> None:
    """A supervisor killed outright (SIGKILL, OOM) leaves no server behind: each child
    gets SIGTERM from the kernel (parent-death signal) and stops."""
    supervisor, _, admin_base = await _start_two(databases, redis_url, tmp_path, "supervisor-kill")
    children: list[int] = []
    try:
        for index in range(2):
            await _ready(admin_base + index)
        children = _children(supervisor.pid)
        assert len(children) == 2
        supervisor.kill()
        await asyncio.to_thread(supervisor.wait, 10)
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_any_alive, children):
            assert time.monotonic() < deadline, f"children outlived the supervisor: {children}"
            await asyncio.sleep(0.1)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _any_alive(pids: list[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_processes_must_be_at_least_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc", "serve", "--processes", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--processes" in result.stderr and "at least 1" in result.stderr


def test_envoy_config_gets_one_endpoint_per_process(tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "ext_proc", "envoy-config", "-c", str(config)),
            *("--ext-proc-port", "50061", "--ext-proc-processes", "3"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    bootstrap = yaml.safe_load(result.stdout)
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "ext_proc"]
    ports = [
        endpoint["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
    ]
    assert ports == [50061, 50062, 50063]
