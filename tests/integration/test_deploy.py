"""The deployment files (``docker-compose.yaml``, ``deploy/``) agree with the code.

What a user of those files would trip over, checked without Docker or a cluster, in a
few seconds: every container command is a real ``ext-proc`` invocation, the published
and declared ports are the contract's, every mounted file exists, every compose service
has CPU and memory limits and the file passes the compose-spec schema (and ``docker
compose config`` where a compose CLI is installed), the Envoy configs pass ``envoy
--mode validate`` and equal what ``ext_proc.envoy_config`` renders for their gateway
configs, and every metric the dashboard and the alerts query is one the service exports
or a real Envoy shows on /stats/prometheus (``promtool`` checks and unit-tests the rules
where it is installed). The Helm chart has its own module, ``test_helm_chart.py``.

The rendered Envoy configs are generated files. After changing a gateway config under
``deploy/`` or the renderer, regenerate them (from the repository root)::

    .venv/bin/python -m tests.integration.test_deploy --write
"""

from __future__ import annotations

import argparse
import fnmatch
import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import envoy_validate

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "deploy/Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_DIR = REPO / "deploy/kubernetes"
COMPOSE_GATEWAY = REPO / "deploy/compose/gateway.yaml"
COMPOSE_ENVOY = REPO / "deploy/compose/envoy.yaml"
K8S_GATEWAY = K8S_DIR / "gateway-config.yaml"
K8S_ENVOY = K8S_DIR / "envoy-config.yaml"
PROMETHEUS = REPO / "deploy/prometheus/prometheus.yml"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
ALERTS_TEST = REPO / "deploy/prometheus/alerts_test.yml"
DASHBOARD = REPO / "deploy/grafana/dashboard.json"
DATASOURCES = REPO / "deploy/grafana/provisioning/datasources/prometheus.yaml"
POSTGRES_DATASOURCE = "grafana-postgresql-datasource"  # Grafana's PostgreSQL plugin id

# The contract (DESIGN.md) plus the Envoy stats listener the deploy configs add.
LISTENER_PORT, GRPC_PORT, METRICS_PORT, ADMIN_PORT = 10000, 50051, 9464, 8080
ENVOY_STATS_PORT = 9902
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
SPOOL_DIR = "/var/lib/ext-proc/spool"
GATEWAY_PATH = "/etc/gateway/gateway.yaml"

# How each deploy Envoy config is rendered (the sidecar talks over loopback; compose
# reaches the ext-proc service by its name).
COMPOSE_ENVOY_OPTIONS: dict[str, Any] = {
    "listener_host": "0.0.0.0",
    "listener_port": LISTENER_PORT,
    "ext_proc_host": "ext-proc",
    "ext_proc_port": GRPC_PORT,
    "stats_port": ENVOY_STATS_PORT,
}
K8S_ENVOY_OPTIONS: dict[str, Any] = {**COMPOSE_ENVOY_OPTIONS, "ext_proc_host": "127.0.0.1"}

_K8S_ENVOY_HEADER = """\
# Generated: the Envoy bootstrap for the sidecar pod, rendered by ext_proc.envoy_config
# from gateway-config.yaml (ext_proc at 127.0.0.1:50051 in the same pod, listener
# 0.0.0.0:10000, /stats/prometheus and /ready on 0.0.0.0:9902). Do not edit by hand:
#   .venv/bin/python -m tests.integration.test_deploy --write
"""


# --------------------------------------------------------------------------------------
# Rendering (shared by the tests and `--write`)
# --------------------------------------------------------------------------------------


def _envoy_options(values: dict[str, Any]) -> Any:
    from ext_proc.envoy_config import EnvoyOptions

    known = {f.name for f in fields(EnvoyOptions)}
    missing = set(values) - known
    if missing:
        pytest.xfail(
            f"ext_proc.envoy_config.EnvoyOptions has no {sorted(missing)}: the deploy configs "
            "need the renderer's stats listener (--stats-port) and a STRICT_DNS ext_proc "
            "cluster for a host name (deploy/README.md, 'Envoy config')"
        )
    return EnvoyOptions(**values)


def _k8s_gateway_text() -> str:
    (doc,) = _load_docs(K8S_GATEWAY)
    text: str = doc["data"]["gateway.yaml"]
    return text


def render_compose_envoy() -> str:
    from ext_proc.config.loader import parse_config
    from ext_proc.envoy_config import render_yaml

    config = parse_config(COMPOSE_GATEWAY.read_text(), "deploy/compose/gateway.yaml")
    return render_yaml(config, _envoy_options(COMPOSE_ENVOY_OPTIONS))


def render_k8s_envoy() -> str:
    from ext_proc.config.loader import parse_config
    from ext_proc.envoy_config import render_yaml

    config = parse_config(_k8s_gateway_text(), "deploy/kubernetes/gateway-config.yaml")
    return render_yaml(config, _envoy_options(K8S_ENVOY_OPTIONS))


def k8s_envoy_configmap(envoy_yaml: str) -> str:
    body = "".join(f"    {line}" if line else "\n" for line in envoy_yaml.splitlines(True))
    return (
        _K8S_ENVOY_HEADER
        + "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: llm-gateway-envoy\n"
        + "  labels:\n    app.kubernetes.io/name: llm-gateway\n"
        + "    app.kubernetes.io/component: config\ndata:\n  envoy.yaml: |\n"
        + body
    )


def write_generated() -> None:
    COMPOSE_ENVOY.write_text(render_compose_envoy())
    K8S_ENVOY.write_text(k8s_envoy_configmap(render_k8s_envoy()))
    print(f"wrote {COMPOSE_ENVOY.relative_to(REPO)} and {K8S_ENVOY.relative_to(REPO)}")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S_DIR.glob("*.yaml")) for d in _load_docs(p)]


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _k8s_objects() if d["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    (obj,) = _k8s(kind)
    return obj


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def _interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with the environment empty: the default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", text)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from ext_proc.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("ext_proc.cli.build_parser() has no subcommands")


def _check_ext_proc_argv(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (starting with ``ext-proc``) parses with the real CLI parser."""
    from ext_proc.cli import build_parser

    assert argv and argv[0] == "ext-proc", f"{where}: {argv} does not run ext-proc"
    assert len(argv) > 1 and argv[1] in _subcommands(), f"{where}: no subcommand {argv[1:2]}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        message = f"{where}: `{shlex.join(argv)}` is not a valid ext-proc command"
        raise AssertionError(message) from None


def _shell_commands(script: str) -> list[list[str]]:
    """``a && b`` as a list of argvs (the only shell syntax our scripts use)."""
    return [shlex.split(part) for part in script.split("&&")]


def _ext_proc_argvs(argv: list[str]) -> list[list[str]]:
    if argv[:2] == ["sh", "-c"]:
        assert len(argv) == 3, f"sh -c takes one script: {argv}"
        return _shell_commands(argv[2])
    return [argv]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _image_entrypoint() -> list[str]:
    entry = [rest for kw, rest in _dockerfile_instructions() if kw == "ENTRYPOINT"][-1]
    value: list[str] = json.loads(entry)
    return value


def _container_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command") or _image_entrypoint()
    return [*command, *container.get("args", [])]


def _envoy_validate(path: Path) -> None:
    result = envoy_validate(path)
    assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"


def _clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def _listeners(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in bootstrap["static_resources"]["listeners"]}


def _address(obj: dict[str, Any]) -> tuple[str, int]:
    sock = obj["socket_address"]
    return sock["address"], int(sock["port_value"])


def _endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    (group,) = cluster["load_assignment"]["endpoints"]
    (lb,) = group["lb_endpoints"]
    return _address(lb["endpoint"]["address"])


# --------------------------------------------------------------------------------------
# docker-compose.yaml
# --------------------------------------------------------------------------------------

OUR_IMAGE_SERVICES = {"migrate", "ext-proc", "mock-upstream"}


def test_compose_has_the_services_and_their_files() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "ext-proc", "envoy", "mock-upstream"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["envoy"]["image"] == ENVOY_IMAGE
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = REPO / _interpolate(build["context"])
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
        for volume in service.get("volumes", []):
            source = _interpolate(volume.split(":")[0])
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in named_volumes, f"{name}: undeclared volume {source}"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    for name in OUR_IMAGE_SERVICES:
        assert "build" in services[name], f"{name} must build our image (deploy/Dockerfile)"


def _compose_argvs() -> Iterator[tuple[str, list[str]]]:
    for name, service in _compose()["services"].items():
        if name not in OUR_IMAGE_SERVICES:
            continue
        entrypoint = _as_list(service.get("entrypoint")) or _image_entrypoint()
        for argv in _ext_proc_argvs([*entrypoint, *_as_list(service.get("command"))]):
            yield name, argv


@pytest.mark.parametrize(
    ("service", "argv"), list(_compose_argvs()), ids=lambda v: v if isinstance(v, str) else v[1]
)
def test_compose_commands_are_real_ext_proc_commands(service: str, argv: list[str]) -> None:
    ns = _check_ext_proc_argv(argv, f"docker-compose service {service}")
    if service == "ext-proc":
        assert ns.command == "serve"
        # Envoy runs in another container: every ext-proc port must be reachable.
        assert ns.grpc_host == ns.metrics_host == ns.admin_host == "0.0.0.0"
    if service == "mock-upstream":
        assert (ns.host, ns.port) == ("0.0.0.0", 8001)


def test_compose_migrate_runs_migrate_then_apply() -> None:
    services = _compose()["services"]
    argvs = list(
        _ext_proc_argvs(
            [
                *_as_list(services["migrate"]["entrypoint"]),
                *_as_list(services["migrate"]["command"]),
            ]
        )
    )
    assert [a[1] for a in argvs] == ["migrate", "apply"]
    assert argvs[1][2:] == ["-f", GATEWAY_PATH]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["ext-proc"]["depends_on"]["migrate"]["condition"]
        == "service_completed_successfully"
    )


def test_compose_published_ports_are_the_contract_on_loopback() -> None:
    published: dict[str, set[int]] = {}
    for name, service in _compose()["services"].items():
        for spec in service.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond loopback"
            assert host_port == container_port, spec
            published.setdefault(name, set()).add(int(container_port))
    assert published.pop("envoy") == {LISTENER_PORT}
    assert published.pop("ext-proc") == {METRICS_PORT, ADMIN_PORT}  # never the gRPC port
    # What remains is the optional observability profile.
    assert set(published) <= {"prometheus", "grafana"}


def test_compose_ext_proc_environment_and_mounts() -> None:
    service = _compose()["services"]["ext-proc"]
    env = service["environment"]
    assert env["EXT_PROC_CONFIG"] == GATEWAY_PATH
    assert env["EXT_PROC_SPOOL_DIR"] == SPOOL_DIR
    assert _interpolate(env["DATABASE_URL"]).startswith("postgresql://")
    assert _interpolate(env["REDIS_URL"]).startswith("redis://")
    # Provider keys pass through from the host: a key without a value.
    from ext_proc.config.loader import parse_config

    for line in COMPOSE_GATEWAY.read_text().splitlines():
        match = re.search(r"api_key_env:\s*(\w+)", line)
        if match:
            assert match.group(1) in env and env[match.group(1)] is None, match.group(1)
    parse_config(COMPOSE_GATEWAY.read_text(), str(COMPOSE_GATEWAY))
    targets = {_interpolate(v).split(":")[1] for v in service["volumes"]}
    assert {GATEWAY_PATH, SPOOL_DIR} <= targets
    assert service["read_only"] is True


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


def test_compose_config_is_valid_for_docker_compose() -> None:
    """``docker compose config`` (or docker-compose 1.29, Debian's `docker-compose`
    package) accepts the file, and keeps every service's resource limits."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (Debian: "
            "apt-get install docker-compose); the compose-spec schema test still runs"
        )
    for profile in ([], ["--profile", "observability"]):
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE_FILE), *profile, "config"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        resolved = yaml.safe_load(result.stdout)["services"]
        for name, service in resolved.items():
            limits = service["deploy"]["resources"]["limits"]
            assert float(limits["cpus"]) > 0 and limits["memory"], name


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([bkmg]?)b?$", re.IGNORECASE)


def _bytes(size: str) -> float:
    match = _SIZE.match(str(size).strip())
    assert match, f"not a compose byte value: {size!r}"
    unit = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return float(match.group(1)) * unit


def test_compose_services_have_cpu_and_memory_limits() -> None:
    """Every service, the observability profile's too: a CPU and a memory limit, and a
    memory reservation below it (deploy/README.md, "Resource limits")."""
    for name, service in _compose()["services"].items():
        resources = service.get("deploy", {}).get("resources", {})
        limits, reservations = resources.get("limits", {}), resources.get("reservations", {})
        assert set(limits) == {"cpus", "memory"}, f"{name}: limits {limits}"
        assert 0 < float(limits["cpus"]) <= 4, name
        assert _bytes(reservations["memory"]) <= _bytes(limits["memory"]), name
        # docker-compose 1.29 ignores (with a warning) reserved CPUs; limits it applies.
        assert "cpus" not in reservations, name
    services = _compose()["services"]
    # Envoy buffers bodies up to 32 MiB per connection; ext-proc holds caches and queues.
    for name in ("envoy", "ext-proc"):
        assert _bytes(services[name]["deploy"]["resources"]["limits"]["memory"]) >= 2**30


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """The compose-spec JSON schema (the one `docker compose` validates with), as
    vendored by check-jsonschema, accepts the file."""
    try:
        import jsonschema
        from check_jsonschema import builtin_schemas  # noqa: F401 - locates the data
    except ImportError:
        pytest.skip("check-jsonschema / jsonschema (pyproject's test extra) not installed")
    import importlib.resources

    schema_file = importlib.resources.files("check_jsonschema") / (
        "builtin_schemas/vendor/compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors)
    # And the validator does catch a mistake (a limit spelled wrong).
    broken = _compose()
    broken["services"]["envoy"]["deploy"]["resources"]["limits"]["mem"] = "1g"
    assert list(validator.iter_errors(broken))


# --------------------------------------------------------------------------------------
# deploy/Dockerfile
# --------------------------------------------------------------------------------------


def test_dockerfile_is_the_production_image() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    assert args.get("PYTHON_IMAGE", "").startswith("python:3.11-slim")
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert "python -m ext_proc.tokens.fetch" in runs
    installs = re.findall(r"pip install[^&;]*", runs)
    assert any(re.search(r"\s\.(\s|$)", i) for i in installs), "pip install . (not -e)"
    assert not any("-e " in i or "[dev" in i for i in installs), installs
    assert _image_entrypoint() == ["ext-proc"]
    assert json.loads([rest for kw, rest in instructions if kw == "CMD"][-1]) == ["serve"]
    exposed = {int(p) for kw, rest in instructions if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT, ADMIN_PORT}
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules, for the simple patterns we use (last match wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, "**/" + pattern) for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_docker_build_context_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for kw, rest in _dockerfile_instructions()
        if kw == "COPY" and "--from=" not in rest
        for src in rest.split()[:-1]
        if not src.startswith("--")
    ]
    assert copied, "the Dockerfile copies nothing from the context"
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: missing"
        assert not _ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by .dockerignore"
    for local_only in (".venv", ".data", ".git", "ext_proc/tokens/_tiktoken_cache"):
        assert _ignored(local_only, patterns), f"{local_only} should not reach the build"


# --------------------------------------------------------------------------------------
# deploy/kubernetes
# --------------------------------------------------------------------------------------


def test_kubernetes_manifests_parse_and_are_namespace_agnostic() -> None:
    objects = _k8s_objects()
    kinds = sorted(d["kind"] for _, d in objects)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"]
    )
    for path, doc in objects:
        assert doc["apiVersion"] and doc["metadata"]["name"], path
        assert "namespace" not in doc["metadata"], f"{path.name}: hard-coded namespace"


def _pod(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(kind)["spec"]["template"]["spec"]
    return spec


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def test_deployment_runs_envoy_and_ext_proc_side_by_side() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    containers = _containers(pod)
    assert set(containers) == {"envoy", "ext-proc"}
    envoy, ext_proc = containers["envoy"], containers["ext-proc"]
    assert envoy["image"] == ENVOY_IMAGE
    ports = {c: {p["containerPort"]: p["name"] for p in containers[c]["ports"]} for c in containers}
    assert ports["envoy"] == {LISTENER_PORT: "http", ENVOY_STATS_PORT: "envoy-stats"}
    assert ports["ext-proc"] == {GRPC_PORT: "grpc", METRICS_PORT: "metrics", ADMIN_PORT: "admin"}

    ns = _check_ext_proc_argv(_container_argv(ext_proc), "Deployment ext-proc")
    assert ns.command == "serve"
    assert ns.metrics_host == "0.0.0.0"
    # The sidecar pattern: the credential-carrying gRPC stream stays inside the pod.
    assert ns.grpc_host == "127.0.0.1"
    envoy_argv = _container_argv(envoy)
    assert envoy_argv[0] == "envoy" and "/etc/envoy/envoy.yaml" in envoy_argv

    # Volumes: every mount has a volume, every ConfigMap volume exists here.
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmaps = {c["metadata"]["name"] for c in _k8s("ConfigMap")}
    for container in containers.values():
        for name in _mounts(container).values():
            assert name in volumes, f"{container['name']}: no volume {name}"
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in configmaps, volume
    envoy_mounts, ext_mounts = _mounts(envoy), _mounts(ext_proc)
    assert volumes[envoy_mounts["/etc/envoy"]]["configMap"]["name"] == "llm-gateway-envoy"
    assert volumes[ext_mounts["/etc/gateway"]]["configMap"]["name"] == "llm-gateway-config"
    env = _env(ext_proc)
    assert env["EXT_PROC_CONFIG"]["value"] == GATEWAY_PATH
    assert env["EXT_PROC_SPOOL_DIR"]["value"] == SPOOL_DIR
    assert "emptyDir" in volumes[ext_mounts[SPOOL_DIR]]
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]


def test_deployment_security_probes_and_resources() -> None:
    pod = _pod("Deployment")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        name = container["name"]
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name
        assert ctx["runAsUser"] != 0, name
        assert container["resources"]["requests"] and container["resources"]["limits"], name
        assert container["readinessProbe"] and container["livenessProbe"], name
    containers = _containers(pod)
    ports = {p["name"]: p["containerPort"] for c in containers.values() for p in c["ports"]}
    envoy_ready = containers["envoy"]["readinessProbe"]["httpGet"]
    assert (envoy_ready["path"], ports[envoy_ready["port"]]) == ("/ready", ENVOY_STATS_PORT)
    # The admin API stays on loopback, so its probes run inside the container.
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        command = containers["ext-proc"][probe]["exec"]["command"]
        assert command[0] == "python", command
        assert f'("127.0.0.1",{ADMIN_PORT})' in command[-1] and f"GET {path} " in command[-1]
        compile(command[-1], probe, "exec")  # valid Python after YAML unquoting


def test_provider_keys_come_from_the_secret_under_their_api_key_env() -> None:
    from ext_proc.config.loader import parse_config

    config = parse_config(_k8s_gateway_text(), str(K8S_GATEWAY))
    wanted = {p.api_key_env for p in config.providers.values() if p.api_key_env}
    assert wanted, "the example gateway config names no provider key"
    env = _env(_containers(_pod("Deployment"))["ext-proc"])
    for name in wanted:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("llm-gateway-provider-keys", name)


def test_migrate_job_runs_migrate_then_apply() -> None:
    pod = _pod("Job")
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    steps = [
        (c["name"], argv)
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        for argv in _ext_proc_argvs(_container_argv(c))
    ]
    assert [argv[1] for _, argv in steps] == ["migrate", "apply"], steps
    assert steps[1][1][2:] == ["-f", GATEWAY_PATH]
    for name, argv in steps:
        _check_ext_proc_argv(argv, f"Job container {name}")


def test_service_and_pdb_select_the_gateway_pods() -> None:
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    pod_ports = {
        p["name"]: p["containerPort"] for c in _pod("Deployment")["containers"] for p in c["ports"]
    }
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], pod_ports[p["targetPort"]]) for p in service["spec"]["ports"]}
    assert ports["http"] == (LISTENER_PORT, LISTENER_PORT)
    assert ports["metrics"] == (METRICS_PORT, METRICS_PORT)
    assert ports["envoy-stats"] == (ENVOY_STATS_PORT, ENVOY_STATS_PORT)
    assert set(ports) == {"http", "metrics", "envoy-stats"}  # never gRPC or admin
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------------------
# Envoy configs in deploy/
# --------------------------------------------------------------------------------------


def _k8s_envoy_text() -> str:
    (doc,) = _load_docs(K8S_ENVOY)
    text: str = doc["data"]["envoy.yaml"]
    return text


def test_kubernetes_envoy_config_validates(tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(_k8s_envoy_text())
    _envoy_validate(path)


def test_compose_envoy_config_validates() -> None:
    _envoy_validate(COMPOSE_ENVOY)


def test_deploy_envoy_configs_wire_the_contract_ports() -> None:
    for text, ext_proc_host in (
        (_k8s_envoy_text(), "127.0.0.1"),
        (COMPOSE_ENVOY.read_text(), "ext-proc"),
    ):
        bootstrap = yaml.safe_load(text)
        listeners, clusters = _listeners(bootstrap), _clusters(bootstrap)
        assert _address(listeners["llm_listener"]["address"]) == ("0.0.0.0", LISTENER_PORT)
        assert _address(listeners["envoy_stats"]["address"]) == ("0.0.0.0", ENVOY_STATS_PORT)
        assert _address(bootstrap["admin"]["address"])[0] == "127.0.0.1"
        assert _endpoint(clusters["ext_proc"]) == (ext_proc_host, GRPC_PORT)
        assert clusters["ext_proc"]["type"] == (
            "STATIC" if ext_proc_host[0].isdigit() else "STRICT_DNS"
        )


def test_kubernetes_envoy_config_is_current() -> None:
    assert K8S_ENVOY.read_text() == k8s_envoy_configmap(render_k8s_envoy()), (
        f"{K8S_ENVOY.relative_to(REPO)} is stale: run "
        "`.venv/bin/python -m tests.integration.test_deploy --write`"
    )


def test_compose_envoy_config_is_current() -> None:
    assert COMPOSE_ENVOY.read_text() == render_compose_envoy(), (
        f"{COMPOSE_ENVOY.relative_to(REPO)} is stale: run "
        "`.venv/bin/python -m tests.integration.test_deploy --write`"
    )


# --------------------------------------------------------------------------------------
# Metrics: Grafana dashboard and Prometheus
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Exported:
    names: dict[str, frozenset[str]]  # series name -> its labels

    @classmethod
    def from_registry(cls) -> _Exported:
        from ext_proc.metrics import Metrics

        names: dict[str, frozenset[str]] = {}
        for collector in list(Metrics().registry._collector_to_names):
            name = collector._name  # type: ignore[attr-defined]
            labels = frozenset(collector._labelnames)  # type: ignore[attr-defined]
            kind = collector._type  # type: ignore[attr-defined]
            if kind == "counter":
                names[name + "_total"] = labels
            elif kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
            else:
                names[name] = labels
        return cls(names)


# Labels Prometheus adds at scrape time (prometheus.yml relabels pods to these).
_TARGET_LABELS = {"job", "instance", "pod", "namespace", "service"}
# Names that are not metrics when not followed by "(" (functions always are).
_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "up"}
)


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "1", text)  # Grafana variables ($__rate_interval)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    labels: set[str] = set()
    for group in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", group))
    text = re.sub(r"\{[^}]*\}", "", text)
    for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = {
        tok
        for tok in re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
        if tok not in _PROMQL_KEYWORDS and not re.fullmatch(r"\d+\w*", tok)
    }
    return names, labels


def _check_promql(expr: str, exported: _Exported, where: str) -> set[str]:
    names, labels = _promql_names(expr)
    ours = {n for n in names if not n.startswith("envoy_")}
    unknown = sorted(ours - set(exported.names))
    assert not unknown, f"{where}: {unknown} not exported by ext_proc.metrics; expr: {expr}"
    if names and names == ours:  # only our metrics: every label must be one of theirs
        known = set().union(*(exported.names[n] for n in ours)) | _TARGET_LABELS
        strange = sorted(labels - known)
        assert not strange, f"{where}: labels {strange} not on {sorted(ours)}; expr: {expr}"
    return names


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _Exported.from_registry()
    used: set[str] = set()
    ids = []
    for panel in _panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["gridPos"], panel.get("title")
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            source = target.get("datasource") or panel["datasource"]
            if source["type"] == POSTGRES_DATASOURCE:
                # Cost and budgets come from usage_records (tests/integration/
                # test_dashboard_sql.py runs every query against the real schema).
                assert source["uid"] == "${usage_db}", panel["title"]
                assert target["rawSql"].strip() and target["format"] in {"table", "time_series"}
                continue
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            used |= _check_promql(target["expr"], exported, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expr = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
            _check_promql(inner.group(1) if inner else expr, exported, f"${variable['name']}")
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    # The dashboard covers what an SRE needs from the service (DESIGN.md "Metrics").
    for needed in (
        "ext_proc_requests_total",
        "gen_ai_client_token_usage_sum",
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "ext_proc_phase_duration_seconds_bucket",
        "ext_proc_usage_queue_depth",
        "ext_proc_usage_records_written_total",
        "ext_proc_usage_records_spooled_total",
        "ext_proc_usage_records_dropped_total",
        "ext_proc_dependency_up",
        "ext_proc_circuit_state",
        "ext_proc_upstream_attempts_total",
        "ext_proc_upstream_target_ejected",
        "ext_proc_cache_stale_served_total",
        "ext_proc_invalidation_listener_up",
        "ext_proc_usage_log_lines_total",
        "ext_proc_cost_usd_total",
        "envoy_cluster_outlier_detection_ejections_active",
    ):
        assert needed in used, f"the dashboard shows nothing from {needed}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["usage_db"]["type"] == "datasource"
    assert variables["usage_db"]["query"] == POSTGRES_DATASOURCE


def dashboard_sql() -> list[tuple[str, str, str]]:
    """(panel title, format, SQL) of every Postgres query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["format"], target["rawSql"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if (target.get("datasource") or panel["datasource"])["type"] == POSTGRES_DATASOURCE
    ]


def test_grafana_provisions_the_dashboards_data_sources() -> None:
    """Compose's Grafana has a data source for each of the dashboard's variables."""
    folder = DATASOURCES.parent
    provisioned = [
        source
        for path in sorted(folder.glob("*.yaml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    types = {source["type"] for source in provisioned}
    assert {"prometheus", POSTGRES_DATASOURCE} <= types
    (usage,) = [s for s in provisioned if s["type"] == POSTGRES_DATASOURCE]
    service = _compose()["services"]["postgres"]["environment"]
    assert usage["url"] == "postgres:5432"
    assert usage["jsonData"]["database"] == service["POSTGRES_DB"]
    assert usage["user"] == service["POSTGRES_USER"]
    grafana = _compose()["services"]["grafana"]["volumes"]
    assert any(v.startswith("./deploy/grafana/provisioning:") for v in grafana)


def test_prometheus_scrapes_ext_proc_and_envoy() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for name, job in jobs.items()
    }
    assert targets["ext-proc"] == [f"ext-proc:{METRICS_PORT}"]
    assert targets["envoy"] == [f"envoy:{ENVOY_STATS_PORT}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs.get("ext-proc", {}).get("metrics_path", "/metrics") == "/metrics"
    # The compose file mounts this folder where the config says the rules are.
    grafana_and_prom = _compose()["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./deploy/prometheus:") for v in grafana_and_prom)


def test_prometheus_alerts_use_exported_metrics() -> None:
    exported = _Exported.from_registry()
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert rules
    referenced: set[str] = set()
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"], rule["alert"]
        referenced |= _check_promql(rule["expr"], exported, f"alert {rule['alert']}")
    for needed in (
        "ext_proc_usage_records_dropped_total",
        "ext_proc_usage_records_spooled_total",
        "ext_proc_circuit_state",
        "ext_proc_requests_total",
        "gen_ai_server_request_duration_seconds_bucket",
        "ext_proc_upstream_attempts_total",
        "ext_proc_upstream_target_ejected",
        "ext_proc_cache_stale_served_total",
        "ext_proc_invalidation_listener_up",
        "ext_proc_usage_log_skipped_bytes_total",
    ):
        assert needed in referenced, f"no alert on {needed}"


def test_prometheus_files_pass_promtool() -> None:
    """``promtool check`` on the config and rules, and the alert unit tests
    (deploy/prometheus/alerts_test.yml: synthetic series in, the alerts that fire out)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian's `prometheus` package has it); the checks "
            "above cover metric names and structure"
        )
    for args in (
        ["check", "config", str(PROMETHEUS)],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERTS_TEST)],
    ):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_new_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    groups = {g["name"]: g for g in yaml.safe_load(ALERTS.read_text())["groups"]}
    for name in ("llm-gateway-fallback", "llm-gateway-keys-and-usage-log", "llm-gateway-budgets"):
        for rule in groups[name]["rules"]:
            assert rule["alert"] in tested, f"{rule['alert']} has no case in {ALERTS_TEST.name}"


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def _envoy_stat_names(tmp_path: Path) -> set[str]:
    """The series names a real Envoy exports on /stats/prometheus for a deploy-like
    bootstrap (a provider over TLS, a model with fallbacks: its chain cluster), after
    one request reached an upstream (Envoy exports a histogram once it has a value)."""
    from ext_proc.config.loader import parse_config
    from ext_proc.dev import envoy_binary, free_port
    from ext_proc.envoy_config import EnvoyOptions, render_yaml

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = parse_config(
        f"""
providers:
  openai: {{type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}}
  local: {{type: openai, base_url: "http://127.0.0.1:{upstream.server_address[1]}"}}
models:
  gpt-4o: {{provider: openai, fallbacks: [{{provider: local}}]}}
applications:
  app: {{org: acme}}
""",
        "envoy-stats",
    )
    admin, listener = free_port(), free_port()
    options = EnvoyOptions(
        listener_host="127.0.0.1",
        listener_port=listener,
        admin_port=admin,
        ext_proc_port=free_port(),
        stats_port=free_port(),
        usage_log_path=str(tmp_path / "usage.jsonl"),
        # The benchmark's route straight to a provider: one request reaches an upstream.
        direct_prefix="/__direct/",
        direct_provider="local",
    )
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render_yaml(config, options))
    process = subprocess.Popen(
        [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(url: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return str(answer.read().decode())
            except OSError:
                assert process.poll() is None, "Envoy exited"
                assert time.monotonic() < deadline, f"no answer from {url}"
                time.sleep(0.1)

    try:
        assert get(f"http://127.0.0.1:{listener}/__direct/x") == "ok"
        text = get(f"http://127.0.0.1:{admin}/stats/prometheus")
    finally:
        process.terminate()
        process.wait(timeout=10)
        upstream.shutdown()
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_envoy_series_in_dashboard_and_alerts_exist(tmp_path: Path) -> None:
    """Every ``envoy_*`` name the dashboard and the alerts query is one a real Envoy 1.40
    exports for the rendered bootstrap (the name checks above cover ext_proc's)."""
    exported = _Exported.from_registry()
    referenced: set[str] = set()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                referenced |= _check_promql(target["expr"], exported, panel["title"])
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            referenced |= _check_promql(rule["expr"], exported, rule["alert"])
    envoy_names = {n for n in referenced if n.startswith("envoy_")}
    assert envoy_names
    missing = sorted(envoy_names - _envoy_stat_names(tmp_path))
    assert not missing, f"not exported by Envoy: {missing}"


def test_promql_name_extraction() -> None:
    names, labels = _promql_names(
        "histogram_quantile(0.95, sum by (le, gen_ai_request_model) "
        '(rate(gen_ai_server_request_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))'
        " > 0.5 and on (instance) up == 1"
    )
    assert names == {"gen_ai_server_request_duration_seconds_bucket"}
    assert labels == {"le", "gen_ai_request_model", "job", "instance"}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.integration.test_deploy --write")
    write_generated()
