"""``ext-proc serve``: the production process.

gRPC ext_proc (+ the standard gRPC health service) on EXT_PROC_GRPC_PORT, Prometheus
metrics on EXT_PROC_METRICS_PORT, the admin API on EXT_PROC_ADMIN_PORT. Envoy and the
databases run elsewhere. SIGTERM/SIGINT: stop taking streams, let open ones finish
(bounded), then flush usage records. SIGHUP: reload gateway.yaml and credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ext_proc.config.loader import load_config
from ext_proc.config.model import GatewayConfig
from ext_proc.http.server import HttpServer, Request, Response
from ext_proc.metrics import Metrics
from ext_proc.routing.catalog import Catalog
from ext_proc.routing.credentials import load_credentials
from ext_proc.server.context import Gateway, Runtime
from ext_proc.server.servicer import ExternalProcessor
from ext_proc.settings import Settings
from ext_proc.stores.postgres import create_pool
from ext_proc.usage.recorder import UsageRecorder
from ext_proc.usage.spool import Spool

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
GRACE_SECONDS = 10.0


def build_runtime(config: GatewayConfig) -> Runtime:
    base_dir = Path(config.source).parent if config.source else None
    credentials = load_credentials(config, base_dir=base_dir)
    return Runtime(config=config, catalog=Catalog.build(config, credentials))


@dataclass
class ServeOptions:
    config_path: Path
    grpc_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Service:
    """The running process: owns the servers, the usage recorder and the pool."""

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.settings = settings
        self.options = options
        self.metrics = Metrics()
        self.gateway: Gateway | None = None
        self.recorder: UsageRecorder | None = None
        self._pool: asyncpg.Pool | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http: list[HttpServer] = []
        self._stopping = asyncio.Event()
        self._pool_task: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        config = load_config(self.options.config_path)
        runtime = build_runtime(config)
        spool = Spool(self.settings.spool_dir)
        self.recorder = UsageRecorder(None, self.metrics, spool)
        await self.recorder.start()
        if self.settings.database_url:
            self._pool_task = asyncio.create_task(
                self._connect_postgres(self.settings.database_url)
            )
        else:
            log.warning(
                "DATABASE_URL is not set: usage records are kept in %s until it is",
                self.settings.spool_dir,
            )
        self.gateway = Gateway(runtime, self.recorder, self.metrics)

        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.gateway), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        bind = f"{self.options.grpc_host}:{self.settings.grpc_port}"
        self.grpc_port = self._grpc.add_insecure_port(bind)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the gRPC port {bind}")
        await self._grpc.start()
        for name in ("", EXT_PROC_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        metrics_server = HttpServer(self._metrics_handler)
        self.metrics_port = await metrics_server.start(
            self.options.metrics_host, self.settings.metrics_port
        )
        self._http.append(metrics_server)
        from ext_proc.admin.api import AdminApi  # local: the admin API imports the stores

        admin = AdminApi(self)
        admin_server = HttpServer(admin.handle)
        self.admin_port = await admin_server.start(
            self.options.admin_host, self.settings.admin_port
        )
        self._http.append(admin_server)
        log.info(
            "ext_proc serving: grpc %s:%d, metrics :%d, admin :%d, config %s",
            self.options.grpc_host,
            self.grpc_port,
            self.metrics_port,
            self.admin_port,
            self.options.config_path,
        )
        self.options.ready.set()

    async def _connect_postgres(self, url: str) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._pool = await create_pool(url)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                self.metrics.dependency_up.labels("postgres").set(0)
                log.warning(
                    "Postgres unreachable (%s); usage records are spooled; retrying in %.1fs",
                    exc,
                    delay,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 30.0)
                continue
            assert self.recorder is not None
            self.recorder.attach_pool(self._pool)
            return

    async def _metrics_handler(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, [("content-type", "text/plain")], b"see /metrics\n")
        return Response(
            200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry)
        )

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._pool

    @property
    def postgres_ready(self) -> bool:
        return self._pool is not None

    def reload(self) -> str:
        """Re-read gateway.yaml and credentials; keep the old runtime if the file is bad."""
        assert self.gateway is not None
        config = load_config(self.options.config_path)
        self.gateway.swap_runtime(build_runtime(config))
        log.info(
            "configuration reloaded from %s (fingerprint %s)",
            self.options.config_path,
            config.fingerprint[:12],
        )
        return config.fingerprint

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(GRACE_SECONDS)
        if self.gateway is not None:
            await self.gateway.drain()
        if self.recorder is not None:
            await self.recorder.close()
        for server in self._http:
            await server.close()
        if self._pool_task is not None:
            self._pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_task
        if self._pool is not None:
            await self._pool.close()


async def serve(settings: Settings, options: ServeOptions) -> None:
    service = Service(settings, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)

    def _reload() -> None:
        try:
            service.reload()
        except Exception as exc:  # a bad file keeps the running config
            log.error("reload refused, keeping the running configuration:\n%s", exc)

    loop.add_signal_handler(signal.SIGHUP, _reload)
    try:
        await service.start()
        await service.wait()
    finally:
        log.info("shutting down: finishing open streams, flushing usage records")
        await service.stop()
        log.info("stopped")
