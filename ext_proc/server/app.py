"""``ext-proc serve``: the production process.

gRPC ext_proc (+ the standard gRPC health service) on EXT_PROC_GRPC_PORT, Prometheus
metrics on EXT_PROC_METRICS_PORT, the admin API on EXT_PROC_ADMIN_PORT. Envoy and the
databases run elsewhere. SIGTERM/SIGINT: stop taking streams, let open ones finish
(bounded), then flush usage records. SIGHUP: reload the config and the provider
credentials. A catalog change (``ext-proc apply``) is picked up through Redis pub/sub
at once, and by polling its version every few seconds as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.exposition import choose_encoder

from ext_proc import telemetry
from ext_proc.admin.activity import ActivityFeed
from ext_proc.admin.app import create_app
from ext_proc.admin.server import AdminServer
from ext_proc.auth.authenticator import Authenticator
from ext_proc.auth.keys import KeyRecord
from ext_proc.auth.store import (
    DEFAULT_KEY_TTL,
    KEY_KIND,
    KEY_LOAD_TIMEOUT,
    key_cache,
)
from ext_proc.config.document import build_config
from ext_proc.config.loader import load_config
from ext_proc.config.model import GatewayConfig
from ext_proc.http.server import HttpServer, Request, Response
from ext_proc.metrics import Metrics
from ext_proc.policies.engine import PolicyEngine
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.routing.catalog import Catalog
from ext_proc.routing.credentials import load_credentials
from ext_proc.server.context import Gateway, Runtime
from ext_proc.server.envoy_log import UsageLog
from ext_proc.server.servicer import SERVICE, ExternalProcessor, add_to_server
from ext_proc.server.targets import TargetMonitor
from ext_proc.settings import Settings
from ext_proc.stores import catalog as catalog_store
from ext_proc.stores.cache import TieredCache
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.invalidation import InvalidationListener, PostgresInvalidationListener
from ext_proc.stores.postgres import create_pool
from ext_proc.stores.redis import create_redis
from ext_proc.stores.redis_limits import RedisLimits
from ext_proc.stores.resp import RespClient, close_quietly
from ext_proc.usage.maintenance import MaintenancePolicy
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.spool import Spool
from ext_proc.usage.tail import LogTail

if TYPE_CHECKING:
    from ext_proc.server.grpclib_transport import GrpclibServer
    from ext_proc.server.h2server import H2GrpcServer

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0
# How long start-up waits for Postgres before serving from the config file alone.
STARTUP_POSTGRES_WAIT = 10.0
# Safety net beside pub/sub: how often the applied catalog's version is polled.
CONFIG_POLL_SECONDS = 5.0
# Connections of the key-lookup pool (lookups are one indexed query each).
KEY_POOL_SIZE = 2
# /readyz: each dependency probe's bound, and how long its result is reused.
READY_PROBE_TIMEOUT = 0.5
READY_CACHE_SECONDS = 1.0
# Policy types counted in Redis; while it is down their on_error decides.
_REDIS_LIMIT_TYPES = frozenset({"rate_limit", "token_limit", "budget"})


def build_runtime(
    config: GatewayConfig, limits: Limits, metrics: Metrics, base_dir: Path | None = None
) -> Runtime:
    """Everything derived from one config version (credentials are re-read here)."""
    credentials = load_credentials(config, base_dir=base_dir)
    return Runtime(
        config=config,
        catalog=Catalog.build(config, credentials),
        engine=PolicyEngine(config, limits, metrics),
    )


@dataclass
class ServeOptions:
    config_path: Path | None
    grpc_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Tune the garbage collector once serving (``settle_gc``): a process of its own only,
    # never a test runner that hosts the service in-process.
    settle_gc: bool = False


class Service:
    """The running process: owns the servers, the stores and the current runtime.

    Configuration: Postgres (what ``ext-proc apply`` wrote) is the runtime truth. The
    config file is used only while Postgres cannot be read at start-up or holds nothing
    applied yet, and the switch to Postgres happens as soon as it can.
    """

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.settings = settings
        self.options = options
        self.metrics = Metrics()
        self.gateway: Gateway | None = None
        self.recorder: UsageRecorder | None = None
        self.config_source = "none"
        self._pool: asyncpg.Pool | None = None
        self._redis: Any = None
        self._lua: RespClient | None = None
        self._usage_log: LogTail | None = None
        self._limits: Limits | None = None
        self._listener: InvalidationListener | None = None
        self._pg_listener: PostgresInvalidationListener | None = None
        # Ejected fallback targets, from Envoy's admin (needs EXT_PROC_ENVOY_ADMIN_URL).
        self._targets: TargetMonitor | None = (
            TargetMonitor(settings.envoy_admin_url, self.metrics)
            if settings.envoy_admin_url
            else None
        )
        self._key_pool: asyncpg.Pool | None = None
        self._keys: TieredCache[KeyRecord] | None = None
        self._redis_breaker: CircuitBreaker | None = None
        self._postgres_breaker: CircuitBreaker | None = None
        self._readiness: tuple[float, int, dict[str, Any]] | None = None
        self._readiness_probe: asyncio.Task[tuple[int, dict[str, Any]]] | None = None
        self._grpc: grpc.aio.Server | None = None
        # The builtin or grpclib server (both asyncio, with start and a graceful stop).
        self._asyncio_grpc: H2GrpcServer | GrpclibServer | None = None
        self._health = health.aio.HealthServicer()
        self._http: list[HttpServer] = []
        self._admin: AdminServer | None = None
        # Finished requests' records go to the usage writer through the activity feed
        # (GET /v1/activity), which costs nothing while nobody listens.
        self.activity: ActivityFeed | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._version: str | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_queued = False  # a scheduled reload has not started reading yet
        self.grpc_port = 0
        self.metrics_port = 0
        self.admin_port = 0

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        settings = self.settings
        telemetry.setup()  # traces, when the OTEL_* variables ask for them
        spool = Spool(settings.spool_dir)
        self.metrics.usage_spool_bytes.set_function(spool.pending_bytes)
        self.recorder = UsageRecorder(
            None,
            self.metrics,
            spool,
            maintenance=MaintenancePolicy(
                retention=settings.usage_retention,
                rollup_retention=settings.usage_rollup_retention,
            ),
        )
        await self.recorder.start()
        if settings.database_url:
            await self._connect_postgres(settings.database_url, STARTUP_POSTGRES_WAIT)
            if self._pool is None:
                self._tasks.append(
                    asyncio.create_task(self._connect_postgres(settings.database_url, None))
                )
        else:
            log.warning(
                "DATABASE_URL is not set: serving from the config file; usage records "
                "are kept in %s",
                settings.spool_dir,
            )

        breaker = self._redis_breaker = CircuitBreaker("redis", self.metrics)
        self._postgres_breaker = CircuitBreaker("postgres", self.metrics)
        if settings.redis_url:
            self._redis = create_redis(settings.redis_url)
        else:
            log.warning(
                "REDIS_URL is not set: limits are per process; key revocations arrive "
                "through Postgres NOTIFY (else within %ss, the key cache's freshness)",
                DEFAULT_KEY_TTL,
            )
        if settings.redis_url:
            # The limits' one Lua call per request goes over a lean pipelined client.
            self._lua = RespClient(settings.redis_url)
        self._limits = Limits(
            RedisLimits(self._lua) if self._lua is not None else None,
            LocalLimits(),
            breaker,
            self.metrics,
            settings.redis_prefix,
        )
        if settings.database_url:
            # Key lookups get a small pool of their own: usage writes and a spool replay
            # cannot delay authentication, and it opens lazily, so it exists (and works
            # once Postgres answers) even when Postgres is down at start-up.
            self._key_pool = await create_pool(
                settings.database_url,
                min_size=0,
                max_size=KEY_POOL_SIZE,
                application_name="ext-proc keys",
                connect_timeout=KEY_LOAD_TIMEOUT,
            )
        self._keys = key_cache(
            self._key_pool,
            redis=self._redis,
            prefix=settings.redis_prefix,
            metrics=self.metrics,
            breaker=breaker,
            postgres_breaker=self._postgres_breaker,
            stale_ttl=settings.key_stale_seconds,
        )
        config = await self._load_config()
        self.activity = ActivityFeed(self.recorder)
        self.gateway = Gateway(
            self._build(config),
            self.activity,
            self.metrics,
            Authenticator(self._keys),
        )
        if settings.redis_url:
            self._listener = InvalidationListener(
                settings.redis_url, settings.redis_prefix, metrics=self.metrics
            )
            self._listener.subscribe(KEY_KIND, self._keys.invalidate)
            self._listener.subscribe(catalog_store.CONFIG_KIND, lambda _id: self.schedule_reload())
            await self._listener.start()
        if settings.database_url:
            # The second channel: revocations committed while Redis is down (or by SQL).
            self._pg_listener = PostgresInvalidationListener(
                settings.database_url, metrics=self.metrics
            )
            self._pg_listener.subscribe(KEY_KIND, self._keys.drop)
            # Catalog changes NOTIFY too (schema/0006): heard while Redis is down.
            self._pg_listener.subscribe(
                catalog_store.CONFIG_KIND, lambda _id: self.schedule_reload()
            )
            await self._pg_listener.start()
        self._tasks.append(asyncio.create_task(self._poll_config()))

        await self._start_grpc(settings)
        self._usage_log = LogTail(
            settings.usage_log,
            UsageLog(self.gateway).consume,
            self.recorder.flush,
            reopen=self._reopen_envoy_logs if settings.envoy_admin_url else None,
            on_skipped=self.metrics.usage_log_skipped_bytes.inc,
        )
        self._usage_log.start()
        for name in ("", SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        metrics_server = HttpServer(self._metrics_handler)
        self.metrics_port = await metrics_server.start(
            self.options.metrics_host, settings.metrics_port
        )
        self._http.append(metrics_server)
        # The admin API (FastAPI under uvicorn) in this process's event loop.
        self._admin = AdminServer(create_app(self), self.options.admin_host, settings.admin_port)
        self.admin_port = await self._admin.start()
        log.info(
            "ext_proc serving: grpc %s:%d, metrics :%d, admin :%d, config from %s",
            self.options.grpc_host,
            self.grpc_port,
            self.metrics_port,
            self.admin_port,
            self.config_source,
        )
        if self.options.settle_gc:
            settle_gc()
        self.options.ready.set()

    async def _start_grpc(self, settings: Settings) -> None:
        """The ext_proc and health services, on the gRPC library the settings name."""
        assert self.gateway is not None  # built by start() before the services
        servicer = ExternalProcessor(self.gateway)
        if settings.grpc_server in ("builtin", "grpclib"):
            if settings.grpc_server == "builtin":
                from ext_proc.server.h2server import H2GrpcServer

                self._asyncio_grpc = H2GrpcServer(servicer)
            else:
                from ext_proc.server.grpclib_transport import GrpclibServer

                self._asyncio_grpc = GrpclibServer(servicer)
            self.grpc_port = await self._asyncio_grpc.start(
                self.options.grpc_host, settings.grpc_port
            )
            return
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        add_to_server(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        bind = f"{self.options.grpc_host}:{settings.grpc_port}"
        self.grpc_port = self._grpc.add_insecure_port(bind)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the gRPC port {bind}")
        await self._grpc.start()

    async def _connect_postgres(self, url: str, budget: float | None) -> None:
        """Connect, retrying with backoff, for ``budget`` seconds (None: until stopped)."""
        deadline = None if budget is None else time.monotonic() + budget
        delay = 0.25
        while not self._stopping.is_set():
            try:
                self._pool = await create_pool(url)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.metrics.dependency_up.labels("postgres").set(0)
                if deadline is not None and time.monotonic() + delay > deadline:
                    log.warning("Postgres unreachable (%s); starting without it, still trying", exc)
                    return
                log.warning("Postgres unreachable (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 30.0)
                continue
            assert self.recorder is not None
            self.recorder.attach_pool(self._pool)
            if budget is None:  # connected late: switch to the applied catalog
                self.schedule_reload()
            return

    async def _load_config(self) -> GatewayConfig:
        """The config to serve: the applied catalog, else the file (with a warning)."""
        pool = self._pool
        empty_catalog = False
        if pool is not None:
            try:
                config = await catalog_store.load_config(pool)
                empty_catalog = config is None
            except catalog_store.CatalogNotMigrated:
                log.error(
                    "the database is not migrated: run `ext-proc migrate`, then "
                    "`ext-proc apply -f gateway.yaml`"
                )
                config = None
            if config is not None:
                self.config_source = "postgres"
                # What config_version reports for this catalog, taken from the snapshot
                # just read: no second read (which parsed the catalog again after SQL
                # edits), and a change landing in between is not taken as loaded.
                self._version = config.fingerprint
                return config
            if self.options.config_path is not None:
                log.warning(
                    "nothing applied to the database yet: run `ext-proc apply -f FILE`; "
                    "until then serving the config file, and no API key can exist"
                )
        path = self.options.config_path
        if path is None and empty_catalog:
            # An empty catalog: serve nothing yet, and let the admin API build it up.
            self.config_source = "postgres"
            empty = build_config({}, catalog_store.POSTGRES_SOURCE, require_providers=False)
            self._version = ""
            return empty
        if path is None:
            raise RuntimeError(
                "no configuration: nothing applied to Postgres and no config file given "
                "(-c or EXT_PROC_CONFIG)"
            )
        self.config_source = str(path)
        return load_config(path)

    def _build(self, config: GatewayConfig) -> Runtime:
        assert self._limits is not None
        if self._targets is not None:
            self._targets.configure(config)
        base_dir = None
        if self.options.config_path is not None:
            base_dir = self.options.config_path.resolve().parent
        return build_runtime(config, self._limits, self.metrics, base_dir)

    # ----------------------------------------------------------------- reload

    def schedule_reload(self) -> None:
        # A change arrives twice (Postgres NOTIFY and Redis pub/sub): one reload that has
        # not started reading yet covers both.
        if self._reload_queued:
            return
        self._reload_queued = True
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _reload_logged(self) -> None:
        try:
            async with self._reload_lock:  # a reload reading now may predate the change
                self._reload_queued = False
            await self.reload()
        except Exception as exc:  # a bad catalog or file: keep serving the running one
            log.error("reload refused, keeping the running configuration: %s", exc)

    async def reload(self) -> str:
        """Re-read the config (Postgres, else the file) and the provider credentials; the
        running runtime stays if the new one cannot be built."""
        async with self._reload_lock:
            assert self.gateway is not None
            config = await self._load_config()
            self.gateway.swap_runtime(self._build(config))
            log.info(
                "configuration loaded from %s (fingerprint %s)",
                self.config_source,
                config.fingerprint[:12],
            )
            return config.fingerprint

    async def _poll_config(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), CONFIG_POLL_SECONDS)
            pool = self._pool
            if pool is None or self._stopping.is_set():
                continue
            try:
                version = await catalog_store.config_version(pool)
            except Exception as exc:  # Postgres trouble: the next poll tries again
                log.debug("config version poll failed: %s", exc)
                continue
            if version != self._version:
                await self._reload_logged()

    async def _reopen_envoy_logs(self) -> bool:
        """Ask Envoy to reopen its log files (after the usage log was rotated)."""
        url = f"{self.settings.envoy_admin_url}/reopen_logs"

        def post() -> bool:
            request = urllib.request.Request(url, method="POST", data=b"")
            with urllib.request.urlopen(request, timeout=5) as response:
                return bool(response.status == 200)

        return await asyncio.to_thread(post)

    @property
    def usage_log(self) -> LogTail | None:
        return self._usage_log

    # ---------------------------------------------------------------- serving

    async def _metrics_handler(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, [("content-type", "text/plain")], b"see /metrics\n")
        # Prometheus' text format, or OpenMetrics (with the latency exemplars) when the
        # scraper asks for it, as Prometheus does with exemplar storage on.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, [("content-type", content_type)], encode(self.metrics.registry))

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._pool

    @property
    def redis(self) -> Any:
        """The Redis client (None without REDIS_URL): the admin API publishes on it."""
        return self._redis

    @property
    def config_dir(self) -> Path | None:
        """Where relative api_key_file paths are read from (the config file's folder)."""
        path = self.options.config_path
        return path.resolve().parent if path is not None else None

    @property
    def running_config(self) -> GatewayConfig | None:
        return self.gateway.runtime.config if self.gateway is not None else None

    @property
    def postgres_ready(self) -> bool:
        return self._pool is not None

    # -------------------------------------------------------------- readiness

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """``/readyz``: (HTTP status, body). 200 ``ok``: every dependency answers; 200
        ``degraded``: one does not, and what is declared lets the gateway serve anyway
        (keys from the cache and usage rows spooled while Postgres is down; limits by
        their ``on_error`` while Redis is down); 503 ``unavailable``: it cannot serve
        (no config or gRPC server, shutting down, no key can be checked, or Redis is
        down and every application has a fail-closed limit).

        Each check probes its dependency now (``READY_PROBE_TIMEOUT``); one probe runs
        at a time and its result answers for ``READY_CACHE_SECONDS``, so a flood of
        probes does not reach the databases.
        """
        cached = self._readiness
        if cached is not None and time.monotonic() - cached[0] < READY_CACHE_SECONDS:
            return cached[1], cached[2]
        probe = self._readiness_probe
        if probe is None or probe.done():
            probe = self._readiness_probe = asyncio.create_task(self._probe_readiness())
        status, body = await asyncio.shield(probe)
        self._readiness = (time.monotonic(), status, body)
        return status, body

    async def _probe_readiness(self) -> tuple[int, dict[str, Any]]:
        postgres, redis = await asyncio.gather(self._check_postgres(), self._check_redis())
        gateway = self.gateway
        config: dict[str, Any] = {
            "ok": gateway is not None and self.grpc_port != 0,
            "source": self.config_source,
            "grpc_port": self.grpc_port,
        }
        if gateway is not None:
            config["fingerprint"] = gateway.runtime.config.fingerprint[:12]
        down: list[str] = []  # why it cannot serve
        if not config["ok"]:
            down.append("no configuration loaded or the gRPC server is not serving")
        if self._stopping.is_set():
            down.append("shutting down")
        if postgres["ok"] is False and redis["ok"] is not True and not postgres["keys_cached"]:
            down.append("Postgres is down and no API key is cached: none can be checked")
        if redis["ok"] is False and gateway is not None:
            closed, blocked, apps = _fail_closed(gateway.runtime.config)
            redis["fail_closed_policies"] = closed
            if closed:
                redis["detail"] += f"; answering 503 policy_unavailable for {', '.join(closed)}"
            if apps and len(blocked) == apps:
                down.append("Redis is down and every application has a fail-closed limit")
        checks: dict[str, Any] = {"postgres": postgres, "redis": redis, "config": config}
        targets = self._targets
        if targets is not None and targets.watching:
            # Fallback targets Envoy ejected: the gateway serves (their traffic goes to
            # the next target), but say so.
            checks["targets"] = targets.check()
        if down:
            status = "unavailable"
        elif (
            postgres["ok"] is False
            or redis["ok"] is False
            or checks.get("targets", {}).get("ok") is False
        ):
            status = "degraded"
        else:
            status = "ok"
        body: dict[str, Any] = {"status": status, "checks": checks}
        if down:
            body["reasons"] = down
        return (503 if down else 200), body

    async def _check_postgres(self) -> dict[str, Any]:
        pool = self._key_pool
        keys = self._keys
        cached = keys.servable_entries() if keys is not None else 0
        if pool is None:
            return {
                "ok": None,
                "detail": "DATABASE_URL is not set: no API key can exist, usage rows spooled",
                "keys_cached": cached,
            }
        ok, latency, error = await _probe(_select_one(pool))
        check: dict[str, Any] = {"ok": ok, "latency_ms": latency, "keys_cached": cached}
        if self._postgres_breaker is not None:
            check["circuit"] = self._postgres_breaker.state_name
        if self._pg_listener is not None:
            check["listening"] = self._pg_listener.connected
        if ok:
            check["detail"] = "answering"
        else:
            check["error"] = error
            check["detail"] = (
                f"down: keys loaded within {self.settings.key_stale_seconds:.0f} s are served "
                "from the cache, new ones get 503 auth_unavailable; usage rows are spooled to disk"
            )
        return check

    async def _check_redis(self) -> dict[str, Any]:
        redis = self._redis
        if redis is None:
            return {"ok": None, "detail": "REDIS_URL is not set: limits are per process"}
        ok, latency, error = await _probe(redis.ping())
        check: dict[str, Any] = {"ok": ok, "latency_ms": latency}
        if self._redis_breaker is not None:
            check["circuit"] = self._redis_breaker.state_name
        if self._listener is not None:
            check["listening"] = self._listener.connected
        if ok:
            check["detail"] = "answering"
        else:
            check["error"] = error
            check["detail"] = (
                "down: on_error allow limits are counted per process, keys come from "
                "memory and Postgres"
            )
        return check

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(GRACE_SECONDS)
        if self._asyncio_grpc is not None:
            await self._asyncio_grpc.stop(GRACE_SECONDS)
        if self.gateway is not None:
            await self.gateway.drain()
        if self._usage_log is not None:
            # Reads what Envoy already wrote and saves the position once it is written.
            await self._usage_log.stop()
        if self.recorder is not None:
            await self.recorder.close()
        if self.activity is not None:
            self.activity.close()  # ends the open activity streams
        if self._admin is not None:
            await self._admin.close()
        for server in self._http:
            await server.close()
        if self._listener is not None:
            await self._listener.close()
        if self._pg_listener is not None:
            await self._pg_listener.close()
        if self._targets is not None:
            await self._targets.close()
        if self._keys is not None:
            await self._keys.close()
        if self._key_pool is not None:
            self._key_pool.terminate()  # lookups only: nothing to flush, never wait on it
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()
        await close_quietly(self._lua)
        if self._pool is not None:
            await self._pool.close()
        telemetry.shutdown()  # flush the last spans


async def _select_one(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=READY_PROBE_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1", timeout=READY_PROBE_TIMEOUT)


async def _probe(call: Awaitable[object]) -> tuple[bool, float | None, str | None]:
    """(answered, milliseconds, error) of one bounded dependency call."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(call, READY_PROBE_TIMEOUT)
    except TimeoutError:
        return False, None, f"no answer within {READY_PROBE_TIMEOUT}s"
    except Exception as exc:  # any failure of the dependency is "down", said as it was
        return False, None, f"{type(exc).__name__}: {exc}"[:300]
    return True, round((time.perf_counter() - started) * 1000, 2), None


def _fail_closed(config: GatewayConfig) -> tuple[list[str], list[str], int]:
    """While Redis is down: the bound policies that answer 503 (Redis-counted limits
    with ``on_error: deny``), the applications they block in every environment, and
    how many applications there are."""
    closed = {
        name
        for name, policy in config.policies.items()
        if policy.enabled and policy.on_error == "deny" and policy.type in _REDIS_LIMIT_TYPES
    }
    bound: set[str] = set()
    blocked: list[str] = []
    for app in config.applications.values():
        blocks_every_env = True
        for environment in app.environments:
            names = {p.name for p in config.application_policies(app.name, environment)}
            bound |= names & closed
            blocks_every_env = blocks_every_env and bool(names & closed)
        if blocks_every_env:
            blocked.append(app.name)
    return sorted(bound), blocked, len(config.applications)


async def serve(settings: Settings, options: ServeOptions) -> None:
    service = Service(settings, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)

    # SIGHUP: re-read the config and the provider credentials (rotated keys).
    loop.add_signal_handler(signal.SIGHUP, service.schedule_reload)
    try:
        await service.start()
        await service.wait()
    finally:
        log.info("shutting down: finishing open streams, flushing usage records")
        await service.stop()
        log.info("stopped")


# Young collections run after this many net allocations (CPython's default is 700): a
# request allocates a few hundred objects, so the default collects every other request.
_GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once serving: move everything built at start (config, catalog, compiled CEL,
    tokenizer tables, imported modules) out of the collector's sight, and collect young
    objects less often. Full collections otherwise walk those hundreds of thousands of
    long-lived objects again and again, each a pause of the event loop that lands on
    whichever requests are in flight (the p99). Nothing is leaked: objects made later
    are collected as before; a config reload's new objects are simply not frozen."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)
