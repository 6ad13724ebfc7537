"""Which targets of models with fallbacks Envoy has ejected, read from its admin API.

Envoy's outlier detection keeps a failing target out of its chain for a cool-down (see
``ext_proc.envoy_fallback``). Only Envoy knows which are out; this reads its admin
``GET /clusters?format=json`` every few seconds (only while some model has fallbacks and
``EXT_PROC_ENVOY_ADMIN_URL`` is set), sets ``ext_proc_upstream_target_ejected`` and keeps
the list for ``/readyz``. Chain endpoints are named ``<provider>#<target index>`` (their
``hostname``), so each host maps to its target exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc.config.model import GatewayConfig
from ext_proc.metrics import Metrics
from ext_proc.routing.fallback import chain_cluster, distinct_chains

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Ejected:
    model: str
    provider: str
    deployment: str

    def __str__(self) -> str:
        return f"{self.model}: {self.provider}/{self.deployment}"


class TargetMonitor:
    def __init__(self, admin_url: str, metrics: Metrics) -> None:
        self._url = f"{admin_url.rstrip('/')}/clusters?format=json"
        self._metrics = metrics
        self._config: GatewayConfig | None = None
        self._clusters: dict[str, str] = {}  # chain cluster -> model name
        self.ejected: list[Ejected] = []
        self.checked_at: float | None = None  # monotonic time of the last good read
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._shown: set[tuple[str, str, str]] = set()

    @property
    def watching(self) -> bool:
        return bool(self._clusters)

    def configure(self, config: GatewayConfig) -> None:
        """Watch the chains of this config (called at start and on every reload)."""
        self._config = config
        self._clusters = {
            chain_cluster(model.name, indices): model.name
            for model in config.models.values()
            if model.fallbacks
            for indices in distinct_chains(model, config)
        }
        if self._clusters and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if self._clusters:
                try:
                    status = await asyncio.to_thread(self._fetch)
                    self._update(status)
                    self.error = None
                    self.checked_at = time.monotonic()
                except Exception as exc:  # never let the monitor die; say why it is blind
                    if self.error is None:
                        log.warning("cannot read Envoy's /clusters (%s): %s", self._url, exc)
                    self.error = str(exc)[:200]
            await asyncio.sleep(POLL_SECONDS)

    def _fetch(self) -> Any:
        with urllib.request.urlopen(self._url, timeout=_TIMEOUT) as answer:
            return orjson.loads(answer.read())

    def _update(self, status: Any) -> None:
        config = self._config
        if config is None:
            return
        out: set[tuple[str, str, str]] = set()
        seen: set[tuple[str, str, str]] = set()
        for cluster in status.get("cluster_statuses", []):
            model_name = self._clusters.get(cluster.get("name", ""))
            model = config.models.get(model_name) if model_name else None
            if model is None:
                continue
            for host in cluster.get("host_statuses", []):
                _, _, index = str(host.get("hostname", "")).rpartition("#")
                if not index.isdigit() or int(index) >= len(model.targets):
                    continue
                target = model.targets[int(index)]
                key = (model.name, target.provider, target.deployment)
                seen.add(key)
                if host.get("health_status", {}).get("failed_outlier_check"):
                    out.add(key)
        gauge = self._metrics.upstream_target_ejected
        for key in seen | self._shown:
            gauge.labels(*key).set(1 if key in out else 0)
        self._shown = seen
        self.ejected = [Ejected(*key) for key in sorted(out)]

    def check(self) -> dict[str, Any]:
        """The ``/readyz`` entry: ejected targets (the gateway still serves: their traffic
        goes to the next target)."""
        check: dict[str, Any] = {"ok": not self.ejected, "ejected": [str(e) for e in self.ejected]}
        if self.error is not None:
            check["ok"] = None
            check["detail"] = f"cannot read Envoy's /clusters: {self.error}"
        elif self.ejected:
            check["detail"] = "ejected for a cool-down; their traffic goes to the next target"
        else:
            check["detail"] = "every target in"
        return check
