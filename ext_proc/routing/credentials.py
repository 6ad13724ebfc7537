"""Provider credentials: read from the env var or file the config names.

Read at start-up and again on SIGHUP / ``apply`` (a new Catalog is built). Values are
never logged or put in metric labels; only whether each provider has one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ext_proc.config.model import GatewayConfig

log = logging.getLogger(__name__)


def load_credentials(
    config: GatewayConfig, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> dict[str, str | None]:
    """Provider name → key (None when the provider declares none or it is missing)."""
    env = os.environ if env is None else env
    out: dict[str, str | None] = {}
    for name, provider in config.providers.items():
        value: str | None = None
        if provider.api_key_env:
            value = env.get(provider.api_key_env) or None
            if value is None:
                log.warning(
                    "provider %s: env var %s is not set; its requests will get 503",
                    name,
                    provider.api_key_env,
                )
        elif provider.api_key_file:
            path = Path(provider.api_key_file)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                value = path.read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                log.warning(
                    "provider %s: cannot read api_key_file %s (%s); its requests will get 503",
                    name,
                    path,
                    exc.strerror,
                )
        out[name] = value.strip() if value else None
    return out
