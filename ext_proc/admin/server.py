"""Serving the admin API with uvicorn in the ext_proc process's own event loop.

The gRPC server, the usage writer and the admin API share one loop: the admin API costs
the request path nothing while idle, and reads the process's state (readiness, the
activity feed) directly. uvicorn's own signal handling is off: the process's handlers
(``ext_proc.server.app.serve``) stop everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5  # seconds open admin requests (an activity stream) get at shutdown


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process's own handlers stay in charge


class AdminServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            proxy_headers=False,
            server_header=False,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind (``port`` 0: any free one) and serve; returns the port bound."""
        sock = self._config.bind_socket()
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the admin API stopped while starting on port {self.port}")
            await asyncio.sleep(0.01)
        return self.port

    async def close(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, SHUTDOWN_GRACE + 2)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
