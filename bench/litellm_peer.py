"""LiteLLM proxy as the peer: installed once in its own venv, run on the same mock.

The venv lives in the git-ignored ``bench/.litellm/venv`` and is reused across runs
(``bench/.litellm/.installed`` marks a finished install). LiteLLM gets its config from
``bench/litellm/config.yaml`` (master key, Redis-backed rpm/tpm limits far above the
load), 2 workers, a private redis-server on a free port, and no database (see the
config's header for why). Any failure here skips the peer with a message; it never fails
the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import procstat
from ext_proc.dev import free_port
from ext_proc.procutil import die_with_parent, stop_process
from ext_proc.stores.embedded import EmbeddedError, tcp_redis_command

BENCH_DIR = Path(__file__).resolve().parent
LITELLM_DIR = BENCH_DIR / ".litellm"
VENV = LITELLM_DIR / "venv"
STAMP = LITELLM_DIR / ".installed"
CONFIG_TEMPLATE = BENCH_DIR / "litellm" / "config.yaml"
WORKERS = 2
NO_DATABASE_NOTE = (
    "LiteLLM ran WITHOUT a database: its Postgres layer needs Prisma engine binaries "
    "downloaded at run time, which fails without internet. So no virtual keys, no per-key "
    "limits and no spend/usage rows on its side (the gateway writes a usage row per request)."
)

Say = Callable[[str], None]


class PeerUnavailable(RuntimeError):
    """LiteLLM cannot be installed or started here; the message says why."""


def _version() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_installed(say: Say) -> str:
    """The installed LiteLLM version; installs it on first use (a few minutes)."""
    binary = VENV / "bin" / "litellm"
    if STAMP.exists() and binary.exists():
        version = _version()
        if version:
            return version
    LITELLM_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LITELLM_DIR / "install.log"
    python3 = shutil.which("python3") or sys.executable
    say(f"installing LiteLLM into {VENV} (once; log: {log_path}) ...")
    with open(log_path, "w") as log:
        steps = [
            [python3, "-m", "venv", str(VENV)],
            [str(VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
        ]
        for argv in steps:
            try:
                done = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, timeout=1800, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise PeerUnavailable(f"LiteLLM install failed ({exc}); see {log_path}") from exc
            if done.returncode != 0:
                raise PeerUnavailable(
                    f"LiteLLM install failed: `{' '.join(argv)}` exited with "
                    f"{done.returncode}; see {log_path}"
                )
    version = _version()
    if not version or not binary.exists():
        raise PeerUnavailable(f"LiteLLM installed but not runnable; see {log_path}")
    STAMP.write_text(version + "\n")
    return version


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class LiteLLMPeer:
    """A running LiteLLM proxy (master + workers) and its private redis-server."""

    def __init__(self, work_dir: Path, mock_port: int, say: Say) -> None:
        self.work_dir = work_dir
        self.mock_port = mock_port
        self.say = say
        self.port = free_port()
        self.master_key = "sk-bench-" + secrets.token_hex(12)
        self.version: str | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._proxy: subprocess.Popen[bytes] | None = None
        self._known: set[int] = set()
        self.log_path = work_dir / "litellm.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def start(self) -> None:
        self.version = ensure_installed(self.say)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        redis_port = free_port()
        try:
            command = tcp_redis_command(redis_port, self.work_dir)
        except EmbeddedError as exc:
            raise PeerUnavailable(f"no redis-server for LiteLLM's private Redis: {exc}") from None
        self._redis = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        config = (
            CONFIG_TEMPLATE.read_text()
            .replace("{mock_port}", str(self.mock_port))
            .replace("{redis_port}", str(redis_port))
            .replace("{master_key}", self.master_key)
        )
        config_path = self.work_dir / "litellm-config.yaml"
        config_path.write_text(config)
        env = {
            k: v
            for k, v in os.environ.items()
            # No database (see the config), and none of our settings leak into it.
            if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("EXT_PROC_")
        }
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # offline: no cost-map download
                "LITELLM_LOG": "ERROR",  # LiteLLM's production advice
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.say(
            f"starting LiteLLM {self.version} (port {self.port}, {WORKERS} workers, "
            f"Redis :{redis_port}, no database) ..."
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proxy = subprocess.Popen(
                [
                    str(VENV / "bin" / "litellm"),
                    "--config",
                    str(config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--num_workers",
                    str(WORKERS),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.work_dir,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> None:
        assert self._proxy is not None
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.port}/health/liveliness"
        while True:
            if self._proxy.poll() is not None:
                raise PeerUnavailable(
                    f"LiteLLM exited with {self._proxy.returncode} while starting; "
                    f"see {self.log_path}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _get(health) == 200:
                    break
            if time.monotonic() > deadline:
                raise PeerUnavailable(
                    f"LiteLLM not ready after {timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.5)
        body = (BENCH_DIR / "request.json").read_bytes()
        headers = {"Authorization": f"Bearer {self.master_key}", "Content-Type": "application/json"}
        status = _get(self.url, headers, body)
        if status != 200:
            raise PeerUnavailable(
                f"LiteLLM answered {status} to a chat completion; see {self.log_path}"
            )
        bad = _get(self.url, {**headers, "Authorization": "Bearer sk-wrong"}, body)
        if bad == 200:
            raise PeerUnavailable("LiteLLM accepted a wrong key: not the set-up we compare with")
        self._known.update(self.pids())

    def pids(self) -> list[int]:
        """The proxy's whole process tree (master, workers, multiprocessing helpers)."""
        if self._proxy is None or self._proxy.poll() is not None:
            return []
        found = procstat.descendants(self._proxy.pid)
        self._known.update(found)
        return found

    def stop(self) -> None:
        if self._proxy is not None:
            self.pids()
            stop_process(self._proxy, timeout=20)
            # Workers it did not reap: only the pids we saw in its tree, still ours.
            deadline = time.monotonic() + 10
            for pid in sorted(self._known - {self._proxy.pid}):
                while _is_ours(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _is_ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._proxy = None
        if self._redis is not None:
            stop_process(self._redis, timeout=10)
            self._redis = None


def _is_ours(pid: int) -> bool:
    """Still a process of LiteLLM's venv (a reused pid belongs to someone else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return str(VENV).encode() in cmdline
