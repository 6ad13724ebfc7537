"""Envoy's tracing config (OTLP/HTTP) passes ``envoy --mode validate``, and the CLI
renders it only when asked."""

from __future__ import annotations

from pathlib import Path

import yaml

from ext_proc.cli import main
from tests.integration.conftest import envoy_validate


def test_a_traced_config_validates(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "envoy.yaml"
    code = main(
        [
            "envoy-config",
            "-c",
            str(repo_root / "examples" / "production.yaml"),
            "--stats-port",
            "9902",
            "--otlp-endpoint",
            "https://otel-collector.observability:4318",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    bootstrap = yaml.safe_load(out.read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
