"""Process settings read from the environment: defaults, values, and errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from ext_proc.settings import Settings, SettingsError


def test_defaults_with_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.redis_prefix == "gw:"
    assert settings.key_stale_seconds == 3600.0
    assert settings.envoy_admin_url is None


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://x@h/db",
            "EXT_PROC_GRPC_PORT": "6000",
            "EXT_PROC_KEY_STALE_SECONDS": "120.5",
            "EXT_PROC_ENVOY_ADMIN_URL": "http://envoy:9902/",
            "EXT_PROC_USAGE_LOG": "/var/log/gw/usage.log",
        }
    )
    assert settings.database_url == "postgresql://x@h/db"
    assert settings.grpc_port == 6000
    assert settings.key_stale_seconds == 120.5
    assert settings.envoy_admin_url == "http://envoy:9902"
    assert settings.usage_log == Path("/var/log/gw/usage.log")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("EXT_PROC_KEY_STALE_SECONDS", "an hour", "is not a number of seconds"),
        ("EXT_PROC_KEY_STALE_SECONDS", "-1", "must be 0 or more seconds"),
        ("EXT_PROC_KEY_STALE_SECONDS", "inf", "must be 0 or more seconds"),
        ("EXT_PROC_KEY_STALE_SECONDS", "nan", "must be 0 or more seconds"),
        ("EXT_PROC_GRPC_PORT", "http", "is not a port number"),
        ("EXT_PROC_METRICS_PORT", "70000", "outside 0..65535"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: value})
    assert name in str(error.value)
    assert says in str(error.value)
