"""Listener TLS in the rendered Envoy bootstrap: the options, the CLI flags, and
``envoy --mode validate`` on certificates the suite makes (Envoy loads the files while
validating, so a wrong path or a key that does not match its certificate fails here).
The handshake itself is tested end to end in ``tests/e2e/test_tls.py``."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_proc.config.loader import parse_config
from ext_proc.dev import envoy_binary, free_port
from ext_proc.envoy_config import EnvoyOptions, listener_tls_sds, render, render_yaml
from tests.conftest import poll_until
from tests.integration.conftest import envoy_validate
from tests.tls_certs import PKI, make_pki

CONFIG = """
providers:
  openai: {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
models:
  gpt-4o-mini: {provider: openai}
applications:
  app: {org: acme}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _listener(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listeners = {x["name"]: x for x in bootstrap["static_resources"]["listeners"]}
    listener: dict[str, Any] = listeners["llm_listener"]
    return listener


def _tls_context(bootstrap: dict[str, Any]) -> dict[str, Any] | None:
    (chain,) = _listener(bootstrap)["filter_chains"]
    socket = chain.get("transport_socket")
    if socket is None:
        return None
    assert socket["name"] == "envoy.transport_sockets.tls"
    context: dict[str, Any] = socket["typed_config"]
    return context


def test_no_tls_by_default() -> None:
    assert _tls_context(render(parse_config(CONFIG))) is None


def test_tls_listener_shape(pki: PKI) -> None:
    options = EnvoyOptions(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key))
    context = _tls_context(render(parse_config(CONFIG), options))
    assert context is not None
    assert context["@type"].endswith("DownstreamTlsContext")
    common = context["common_tls_context"]
    (pair,) = common["tls_certificates"]
    assert pair == {
        "certificate_chain": {"filename": str(pki.server.cert)},
        "private_key": {"filename": str(pki.server.key)},
    }
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert "validation_context" not in common
    assert "require_client_certificate" not in context
    # The stats listener (probes, Prometheus) stays plain HTTP.
    stats = render(parse_config(CONFIG), EnvoyOptions(stats_port=9902, **_files(pki)))
    envoy_stats = {x["name"]: x for x in stats["static_resources"]["listeners"]}["envoy_stats"]
    assert "transport_socket" not in envoy_stats["filter_chains"][0]


def _files(pki: PKI, *, client_ca: bool = False) -> dict[str, Any]:
    files = {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.server.key)}
    if client_ca:
        files["tls_client_ca_file"] = str(pki.ca)
    return files


def test_mutual_tls_requires_client_certificates(pki: PKI) -> None:
    options = EnvoyOptions(**_files(pki, client_ca=True), tls_min_version="1.3")
    context = _tls_context(render(parse_config(CONFIG), options))
    assert context is not None
    assert context["require_client_certificate"] is True
    common = context["common_tls_context"]
    assert common["validation_context"] == {"trusted_ca": {"filename": str(pki.ca)}}
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    # The client certificate's details are not forwarded (to providers): Envoy's
    # default, SANITIZE, strips x-forwarded-client-cert; nothing here turns it on.
    hcm = _listener(render(parse_config(CONFIG), options))["filter_chains"][0]["filters"][0]
    assert "forward_client_cert_details" not in hcm["typed_config"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "/c.pem"}, "both a certificate file and a key file"),
        ({"tls_key_file": "/k.pem"}, "both a certificate file and a key file"),
        ({"tls_client_ca_file": "/ca.pem"}, "needs listener TLS"),
        ({"tls_cert_file": "/c", "tls_key_file": "/k", "tls_min_version": "1.1"}, "1.1"),
    ],
)
def test_incomplete_tls_options_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnvoyOptions(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("client_ca", [False, True], ids=["tls", "mtls"])
def test_tls_bootstraps_pass_envoy_validate(pki: PKI, tmp_path: Path, client_ca: bool) -> None:
    options = EnvoyOptions(stats_port=9902, **_files(pki, client_ca=client_ca))
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(parse_config(CONFIG), options))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_validate_catches_a_key_that_is_not_the_certificates(
    pki: PKI, tmp_path: Path
) -> None:
    # The client's key with the server's certificate: Envoy refuses the pair.
    options = EnvoyOptions(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.client.key))
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(parse_config(CONFIG), options))
    result = envoy_validate(path)
    assert result.returncode != 0
    assert "KEY_VALUES_MISMATCH" in result.stdout + result.stderr


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "envoy-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_cli_flags_render_mutual_tls(pki: PKI, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    result = _cli(
        "-c",
        str(config),
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca),
        "--tls-min-version",
        "1.3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = EnvoyOptions(**_files(pki, client_ca=True), tls_min_version="1.3")
    assert yaml.safe_load(result.stdout) == yaml.safe_load(
        render_yaml(parse_config(CONFIG, str(config)), expected)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/c.pem"], "--tls-key"),
        (["--tls-key", "/k.pem"], "--tls-cert"),
        (["--tls-client-ca", "/ca.pem"], "--tls-client-ca (mutual TLS) needs"),
    ],
)
def test_cli_refuses_incomplete_tls_flags(tmp_path: Path, args: list[str], message: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    result = _cli("-c", str(config), *args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


def _served_certificate(port: int) -> bytes:
    """The DER certificate the listener presents in a new handshake."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


def test_reload_serves_a_renewed_certificate_without_a_restart(tmp_path: Path) -> None:
    """``--tls-reload``: a new certificate and key renamed into the certificate's folder
    (as cert-manager or a Kubernetes Secret update do) is served by the same Envoy."""
    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(first.server.cert, cert)
    shutil.copy(first.server.key, key)
    port, admin = free_port(), free_port()
    options = EnvoyOptions(
        listener_port=port,
        admin_port=admin,
        usage_log_path=str(tmp_path / "usage" / "envoy.jsonl"),
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_sds_file=str(tmp_path / "listener-tls.yaml"),
    )
    Path(options.tls_sds_file or "").write_text(listener_tls_sds(options))
    (tmp_path / "usage").mkdir()
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render_yaml(parse_config(CONFIG), options))
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", str(bootstrap), "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def serves(pem: Path) -> bool:
            try:
                return _served_certificate(port) == _der(pem)
            except OSError:
                return False

        if not poll_until(lambda: serves(first.server.cert), timeout=20):
            envoy.terminate()
            raise AssertionError(f"Envoy never served TLS: {envoy.communicate(timeout=10)[1]}")
        # The renewal lands as renames into the folder: the key first, then the chain.
        for source, target in ((second.server.key, key), (second.server.cert, cert)):
            staged = live / f".{target.name}.new"
            shutil.copy(source, staged)
            staged.rename(target)
        assert poll_until(lambda: serves(second.server.cert), timeout=10), (
            "still the old certificate"
        )
        assert envoy.poll() is None  # the same process: no restart
    finally:
        envoy.terminate()
        _, stderr = envoy.communicate(timeout=10)
    assert "critical" not in stderr, stderr[-2000:]


def test_cli_tls_reload_writes_the_sds_file_and_validates(pki: PKI, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    sds = tmp_path / "sds" / "listener-tls.yaml"
    out = tmp_path / "envoy.yaml"
    result = _cli(
        *("-c", str(config), "-o", str(out), "--stats-port", "9902"),
        *("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)),
        *("--tls-reload", str(sds)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [secret] = yaml.safe_load(sds.read_text())["resources"]
    assert secret["tls_certificate"]["watched_directory"] == {"path": str(pki.server.cert.parent)}
    context = _tls_context(yaml.safe_load(out.read_text()))
    assert context is not None
    [config_source] = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
    assert config_source["sds_config"]["path_config_source"]["path"] == str(sds)
    assert "tls_certificates" not in context["common_tls_context"]
    validated = envoy_validate(out)
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_cli_tls_reload_needs_a_certificate(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    result = _cli("-c", str(config), "--tls-reload", str(tmp_path / "x.yaml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "--tls-reload needs --tls-cert and --tls-key" in result.stderr
