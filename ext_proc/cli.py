"""The ``ext-proc`` command line: one subcommand per operator task.

Each subcommand parses its flags, builds ``Settings`` from the environment once, and
calls into the package; nothing here holds logic of its own beyond wiring.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ext_proc import logs
from ext_proc.settings import Settings, SettingsError

if TYPE_CHECKING:
    from ext_proc.config.model import GatewayConfig

DEFAULT_CONFIG = Path("examples/gateway.yaml")


def _config_path(ns: argparse.Namespace, settings: Settings) -> Path:
    if getattr(ns, "config", None):
        return Path(ns.config)
    if settings.config_path is not None:
        return settings.config_path
    return DEFAULT_CONFIG


def _need_database(settings: Settings) -> str:
    if not settings.database_url:
        raise SystemExit(
            "error: DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/postgres)"
        )
    return settings.database_url


def cmd_serve(ns: argparse.Namespace, settings: Settings) -> int:
    import uvloop

    from ext_proc.config.errors import ConfigError
    from ext_proc.server.app import ServeOptions, serve

    # Postgres (what `apply` wrote) is the runtime truth; a file given here or in
    # EXT_PROC_CONFIG is served only until something is applied.
    if ns.processes > 1:
        from ext_proc.server.supervisor import Supervisor, without_processes_flag

        ports = {
            "grpc": settings.grpc_port,
            "metrics": settings.metrics_port,
            "admin": settings.admin_port,
        }
        try:
            supervisor = Supervisor(ns.processes, without_processes_flag(ns.argv), ports)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return supervisor.run()
    config_path = Path(ns.config) if ns.config else settings.config_path
    options = ServeOptions(
        config_path=config_path,
        grpc_host=ns.grpc_host,
        metrics_host=ns.metrics_host,
        admin_host=ns.admin_host,
        settle_gc=True,
    )
    try:
        uvloop.run(serve(settings, options))
    except ConfigError as exc:
        print(f"error: invalid gateway config:\n{exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_dev(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.config.errors import ConfigError
    from ext_proc.dev import StackOptions, run_dev

    try:
        options = StackOptions(
            config_path=_config_path(ns, settings),
            data_dir=Path(ns.data_dir),
            listener_port=ns.listener_port,
            envoy_admin_port=ns.envoy_admin_port,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
            admin_port=settings.admin_port,
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
            admin_token=settings.admin_token or _dev_admin_token(Path(ns.data_dir)),
            log_level=ns.log_level,
            key_file=Path(ns.data_dir) / "dev-api-key",
        )
        return run_dev(options)
    except ConfigError as exc:
        print(f"error: invalid gateway config:\n{exc}", file=sys.stderr)
        return 2


def _dev_admin_token(data_dir: Path) -> str:
    """``ext-proc dev`` without EXT_PROC_ADMIN_TOKEN: an admin token made once and kept in
    the data folder (mode 0600), so the console and admin API can be used at once and
    the token stays the same from one ``make run`` to the next."""
    import secrets

    path = data_dir / "dev-admin-token"
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    data_dir.mkdir(parents=True, exist_ok=True)
    token = "gwadm-" + secrets.token_urlsafe(24)
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return token


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def cmd_migrate(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.stores.postgres import run_migrate

    return run_migrate(_need_database(settings))


def cmd_validate(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.config.errors import ConfigError
    from ext_proc.config.loader import load_config

    path = _config_path(ns, settings)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(
        f"{path}: OK ({len(config.providers)} providers, {len(config.models)} models, "
        f"{len(config.policies)} policies, {len(config.applications)} applications)"
    )
    return 0


def cmd_envoy_config(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.config.errors import ConfigError
    from ext_proc.config.loader import load_config
    from ext_proc.envoy_config import (
        EnvoyOptions,
        listener_tls_overrides,
        listener_tls_sds,
        render_yaml,
    )

    try:
        if ns.from_database:
            config = asyncio.run(_catalog_config(_need_database(settings)))
        else:
            config = load_config(_config_path(ns, settings))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    options = (
        EnvoyOptions.dev()
        if ns.dev
        else EnvoyOptions(
            listener_host=ns.listener_host,
            listener_port=ns.listener_port,
            admin_port=ns.admin_port,
            ext_proc_host=ns.ext_proc_host,
            ext_proc_port=ns.ext_proc_port or settings.grpc_port,
            stats_port=ns.stats_port,
        )
    )
    if ns.ext_proc_streams is not None:
        options = dataclasses.replace(options, ext_proc_streams_per_process=ns.ext_proc_streams)
    if ns.ext_proc_processes > 1:
        first = options.ext_proc_port
        ports = tuple(range(first, first + ns.ext_proc_processes))
        options = dataclasses.replace(options, ext_proc_ports=ports)
    if ns.headers_phase:
        options = dataclasses.replace(options, headers_phase=True)
    options = dataclasses.replace(options, **listener_tls_overrides(ns))
    if ns.otlp_endpoint:
        options = dataclasses.replace(options, otlp_endpoint=ns.otlp_endpoint)
    text = render_yaml(config, options)
    if options.tls_sds_file is not None:
        sds = Path(options.tls_sds_file)
        sds.parent.mkdir(parents=True, exist_ok=True)
        sds.write_text(listener_tls_sds(options))
        print(f"wrote the listener certificate's SDS file: {sds}", file=sys.stderr)
    if ns.output and ns.output != "-":
        Path(ns.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


async def _catalog_config(database_url: str) -> GatewayConfig:
    """The config the catalog in Postgres holds (what the replicas serve)."""
    from ext_proc.config.errors import ConfigError, ConfigIssue
    from ext_proc.stores.catalog import load_config as load_catalog
    from ext_proc.stores.postgres import create_pool

    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        config = await load_catalog(pool)
    finally:
        await pool.close()
    if config is None:
        raise ConfigError([ConfigIssue("postgres", 0, 0, "", "the catalog is empty")])
    return config


def cmd_schema(ns: argparse.Namespace, settings: Settings) -> int:
    import json

    if ns.openapi:
        from ext_proc.admin.app import create_app

        text = json.dumps(create_app(_NoBackend(settings)).openapi(), indent=2) + "\n"
    else:
        from ext_proc.config.jsonschema import render_schema

        text = render_schema()
    if ns.output and ns.output != "-":
        Path(ns.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


@dataclasses.dataclass
class _NoBackend:
    """Enough of a process for the admin API to describe itself (``schema --openapi``)."""

    settings: Settings
    pool: None = None
    redis: None = None
    activity: None = None
    config_dir: None = None
    running_config: None = None

    async def readiness(self) -> tuple[int, dict[str, object]]:
        return 503, {}

    async def reload(self) -> str:
        return ""


def cmd_usage(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.usage.cli import run_usage

    return run_usage(
        ns,
        _need_database(settings),
        retention=settings.usage_retention,
        rollup_retention=settings.usage_rollup_retention,
    )


def cmd_apply(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.apply import run_apply

    _need_database(settings)
    return run_apply(ns, settings)


def cmd_keys(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.auth.cli import run_keys

    _need_database(settings)
    return run_keys(ns, settings)


def cmd_mock_upstream(ns: argparse.Namespace, settings: Settings) -> int:
    from ext_proc.mock.upstream import options_from_args, run

    run(ns.host, ns.port, options_from_args(ns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ext-proc",
        description="LLM gateway: Envoy external processor for auth, routing, policies and usage.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EXT_PROC_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def config_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            help=f"gateway.yaml (default: $EXT_PROC_CONFIG, else {DEFAULT_CONFIG})",
        )

    p = add(
        "dev",
        cmd_dev,
        "run the whole gateway on this machine (embedded Postgres/Redis, "
        "mock upstream, ext_proc, Envoy)",
    )
    config_flag(p)
    p.add_argument("--data-dir", default=".data", help="where embedded data and logs go")
    p.add_argument("--listener-port", type=int, default=10000)
    p.add_argument("--envoy-admin-port", type=int, default=9901)

    p = add("serve", cmd_serve, "production mode: gRPC ext_proc + admin API + metrics")
    config_flag(p)
    p.add_argument(
        "--grpc-host",
        default=os.environ.get("EXT_PROC_GRPC_HOST", "127.0.0.1"),
        help="address the gRPC server binds (default 127.0.0.1: Envoy runs beside "
        "it; the stream carries provider credentials, keep it private)",
    )
    p.add_argument("--metrics-host", default=os.environ.get("EXT_PROC_METRICS_HOST", "0.0.0.0"))
    p.add_argument("--admin-host", default=os.environ.get("EXT_PROC_ADMIN_HOST", "127.0.0.1"))
    p.add_argument(
        "--processes",
        type=_positive_int,
        default=os.environ.get("EXT_PROC_PROCESSES") or "1",  # a string: argparse checks it
        metavar="N",
        help="run N server processes (ports: each of gRPC, metrics and admin plus 0..N-1); "
        "render Envoy's config with `envoy-config --ext-proc-processes N` to match "
        "(default 1, or EXT_PROC_PROCESSES)",
    )

    add("migrate", cmd_migrate, "apply pending database migrations (schema/)")

    p = add("validate", cmd_validate, "check a gateway.yaml and report every problem with its line")
    config_flag(p)

    p = add("envoy-config", cmd_envoy_config, "render an Envoy bootstrap from the gateway config")
    config_flag(p)
    p.add_argument(
        "--from-database",
        action="store_true",
        help="render from the catalog in Postgres (DATABASE_URL), i.e. with the admin API's "
        "changes, instead of a file",
    )
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument(
        "--dev",
        action="store_true",
        help="the dev bootstrap (loopback listener, contract ports): envoy/dev.yaml",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export Envoy's spans over OTLP/HTTP here (e.g. http://collector:4318)",
    )
    p.add_argument("--listener-host", default="0.0.0.0")
    p.add_argument("--listener-port", type=int, default=10000)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--ext-proc-host", default="127.0.0.1")
    p.add_argument(
        "--ext-proc-port", type=int, default=None, help="default: $EXT_PROC_GRPC_PORT or 50051"
    )
    p.add_argument(
        "--ext-proc-streams",
        type=_positive_int,
        default=None,
        metavar="N",
        help="request-side ext_proc streams open at once per process before Envoy sheds "
        "the next request with 503 + retry-after (default 256)",
    )
    p.add_argument(
        "--ext-proc-processes",
        type=_positive_int,
        default=os.environ.get("EXT_PROC_PROCESSES") or "1",
        metavar="N",
        help="one endpoint per `serve --processes N` child: the port and the N-1 after it "
        "(default 1, or EXT_PROC_PROCESSES)",
    )
    p.add_argument(
        "--headers-phase",
        action="store_true",
        help="send request headers as their own ext_proc message: refuse bad keys and "
        "rate-limited calls before their bodies are buffered (about 0.1 ms more CPU per "
        "request)",
    )
    p.add_argument(
        "--stats-port",
        type=int,
        default=None,
        help="also serve GET /stats/prometheus and /ready (only) on 0.0.0.0:PORT, for "
        "Prometheus and probes; the admin interface stays on loopback",
    )
    from ext_proc.envoy_config import add_listener_tls_arguments

    add_listener_tls_arguments(p)

    p = add(
        "schema",
        cmd_schema,
        "print the JSON Schema of gateway.yaml (schema/gateway.schema.json), or the admin "
        "API's OpenAPI document",
    )
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--openapi", action="store_true", help="the admin API's /openapi.json")

    from ext_proc.usage.cli import add_usage_arguments

    p = add("usage", cmd_usage, "usage rollup table (tokens, requests, latency) from Postgres")
    add_usage_arguments(p)

    from ext_proc.apply import add_apply_arguments

    p = add("apply", cmd_apply, "make the database catalog match a gateway.yaml (idempotent)")
    add_apply_arguments(p)

    from ext_proc.auth.cli import add_keys_arguments

    p = add("keys", cmd_keys, "create, list, revoke and rotate gateway API keys")
    add_keys_arguments(p)

    from ext_proc.mock.upstream import add_arguments as add_mock_arguments

    p = add("mock-upstream", cmd_mock_upstream, "run the mock OpenAI/Azure/Anthropic upstream")
    add_mock_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    ns.argv = argv  # `serve --processes N` starts its children with these, less that flag
    try:
        logs.configure(ns.log_level, os.environ.get("EXT_PROC_LOG_FORMAT") or "text")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result: int = ns.func(ns, settings)
    return result


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    raise SystemExit(main())
