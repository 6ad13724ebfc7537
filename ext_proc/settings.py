"""Process settings: read from the environment once, at start-up, into a typed object.

Nothing else in the package reads ``os.environ`` for configuration; commands build a
``Settings`` and pass it (or the parts they need) down.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

DEFAULT_GRPC_PORT = 50051
DEFAULT_ADMIN_PORT = 8080
DEFAULT_METRICS_PORT = 9464
# The ext_proc service's gRPC server library (README "Performance" says why).
GRPC_SERVERS = ("grpcio", "grpclib", "builtin")
DEFAULT_GRPC_SERVER = "builtin"
# Envoy's usage log (one JSON line per finished request), on a volume both share; the
# Envoy templates rendered by `ext-proc envoy-config` write here too.
DEFAULT_USAGE_LOG = Path("/var/lib/ext-proc/usage-log/envoy.jsonl")


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use; the message names it."""


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        port = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}={port} is outside 0..65535")
    return port


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise SettingsError(f"{name}={raw} must be 0 or more seconds")
    return value


_AGE = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_AGE_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def parse_age(value: str) -> timedelta:
    """``90d``, ``12w``, ``36h`` as a timedelta; ValueError otherwise."""
    match = _AGE.match(value)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{value!r} is not an age like 90d, 12w or 36h")
    return timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


def _age(env: Mapping[str, str], name: str) -> timedelta | None:
    """An age setting; unset, empty or ``forever``: None (keep everything)."""
    raw = (env.get(name) or "").strip()
    if raw in ("", "forever"):
        return None
    try:
        return parse_age(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc} (or 'forever', the default)") from None


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    config_path: Path | None = None
    grpc_port: int = DEFAULT_GRPC_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    admin_token: str | None = None
    # Where usage records that could not be written yet are kept (never dropped).
    spool_dir: Path = field(default_factory=lambda: Path(".data/usage-spool"))
    # Prefix for every Redis key this process touches (tests give each run its own).
    redis_prefix: str = "gw:"
    # The usage log Envoy writes and this process tails (plain requests end there).
    usage_log: Path = DEFAULT_USAGE_LOG
    # Envoy's admin URL, to ask it to reopen the usage log after rotating it (None: the
    # log is not rotated; a warning says when it grows large).
    envoy_admin_url: str | None = None
    # While Postgres cannot answer, API keys loaded this recently keep working (seconds).
    # It is also how long a replica cut off from Redis and Postgres may honour a revoked key.
    key_stale_seconds: float = 3600.0
    # Usage rows older than this are dropped, a whole UTC day at a time (None: never);
    # the hourly and daily rollups older than usage_rollup_retention (None: never).
    usage_retention: timedelta | None = None
    usage_rollup_retention: timedelta | None = None
    # The gRPC server the ext_proc service runs on: builtin (the gateway's own HTTP/2
    # server, ext_proc/server/h2server.py), grpclib or grpcio.
    grpc_server: str = DEFAULT_GRPC_SERVER

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        config = env.get("EXT_PROC_CONFIG")
        retention = _age(env, "EXT_PROC_USAGE_RETENTION")
        rollup_retention = _age(env, "EXT_PROC_USAGE_ROLLUP_RETENTION")
        if rollup_retention is not None and (retention is None or rollup_retention < retention):
            # Queries read whole hours from the rollups: rows kept longer would not count.
            raise SettingsError(
                "EXT_PROC_USAGE_ROLLUP_RETENTION must not be shorter than "
                "EXT_PROC_USAGE_RETENTION (rollups are read for every whole hour of a range)"
            )
        grpc_server = (env.get("EXT_PROC_GRPC_SERVER") or DEFAULT_GRPC_SERVER).strip().lower()
        if grpc_server not in GRPC_SERVERS:
            raise SettingsError(
                f"EXT_PROC_GRPC_SERVER={grpc_server!r}: use one of {', '.join(GRPC_SERVERS)}"
            )
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            config_path=Path(config) if config else None,
            grpc_port=_port(env, "EXT_PROC_GRPC_PORT", DEFAULT_GRPC_PORT),
            admin_port=_port(env, "EXT_PROC_ADMIN_PORT", DEFAULT_ADMIN_PORT),
            metrics_port=_port(env, "EXT_PROC_METRICS_PORT", DEFAULT_METRICS_PORT),
            admin_token=env.get("EXT_PROC_ADMIN_TOKEN") or None,
            spool_dir=Path(env.get("EXT_PROC_SPOOL_DIR") or ".data/usage-spool"),
            redis_prefix=env.get("EXT_PROC_REDIS_PREFIX") or "gw:",
            usage_log=Path(env.get("EXT_PROC_USAGE_LOG") or DEFAULT_USAGE_LOG),
            envoy_admin_url=(env.get("EXT_PROC_ENVOY_ADMIN_URL") or "").rstrip("/") or None,
            key_stale_seconds=_seconds(env, "EXT_PROC_KEY_STALE_SECONDS", 3600.0),
            usage_retention=retention,
            usage_rollup_retention=rollup_retention,
            grpc_server=grpc_server,
        )
