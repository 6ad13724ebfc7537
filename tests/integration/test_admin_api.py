"""The admin API of a real ``ext-proc serve`` process (in this test's loop), against the
real Postgres and Redis: objects created, changed and deleted through it land in the
catalog and the audit log, every body is checked with the declared schema (the file's
messages, the field named), deletes that break references answer 409 naming who holds
them, keys and tokens are shown once and stored hashed, roles and organizations scope
what a token may do, and the process reloads what it changed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ext_proc.server.app import ServeOptions, Service
from ext_proc.settings import Settings
from tests.conftest import poll_async

pytestmark = pytest.mark.integration

ADMIN = "admin-secret"


@pytest.fixture
async def service(
    pool: asyncpg.Pool, migrated_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[Service]:
    settings = Settings(
        database_url=migrated_url,
        redis_url=redis_url,
        grpc_port=0,
        admin_port=0,
        metrics_port=0,
        admin_token=ADMIN,
        spool_dir=tmp_path / "spool",
        usage_log=tmp_path / "usage-log" / "envoy.jsonl",
        redis_prefix=redis_prefix,
    )
    service = Service(settings, ServeOptions(config_path=None))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def api(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.admin_port}",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    ) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert "Traceback" not in error["message"]
    return error


async def build_catalog(api: httpx.AsyncClient) -> None:
    for path, body in (
        ("/v1/organizations", {"name": "acme", "description": "Acme Corp"}),
        ("/v1/providers", {"name": "mock", "type": "openai", "base_url": "http://127.0.0.1:9"}),
        ("/v1/models", {"name": "gpt-4o-mini", "provider": "mock", "aliases": ["mini"]}),
        (
            "/v1/policies",
            {"name": "two-per-minute", "type": "rate_limit", "requests": 2, "window": "1m"},
        ),
        ("/v1/applications", {"name": "bot", "org": "acme", "policies": ["two-per-minute"]}),
    ):
        response = await api.post(path, json=body)
        assert response.status_code == 201, response.text


async def test_objects_lifecycle_audit_and_reload(
    api: httpx.AsyncClient, service: Service, pool: asyncpg.Pool
) -> None:
    await build_catalog(api)

    provider = (await api.get("/v1/providers/mock")).json()
    assert provider["managed_by"] == "api" and provider["timeout"] == "1m"  # defaults written
    model = await api.post("/v1/models", json={"name": "gpt-4o-mini", "provider": "mock"})
    assert model.status_code == 409 and error_of(model)["code"] == "already_exists"

    listing = (await api.get("/v1/applications")).json()
    assert [app["name"] for app in listing["data"]] == ["bot"]
    app = listing["data"][0]
    assert app["environments"] == {"default": {"policies": []}} and app["org"] == "acme"

    # The process serves the new catalog (NOTIFY / pub/sub reload), well within a second.
    assert await poll_async(
        lambda: (
            service.gateway is not None and "gpt-4o-mini" in service.gateway.runtime.config.models
        ),
        timeout=5,
    )

    # A patch is a merge patch; the policy's version goes up.
    patched = await api.patch("/v1/policies/two-per-minute", json={"requests": 5})
    assert patched.status_code == 200, patched.text
    assert patched.json()["requests"] == 5 and patched.json()["version"] == 2

    # Every change is audited: who, what, before, after.
    audit = (await api.get("/v1/audit", params={"kind": "policy", "name": "two-per-minute"})).json()
    first = audit["data"][0]
    assert (first["actor"], first["action"]) == ("admin", "update")
    assert first["before"]["requests"] == 2 and first["after"]["requests"] == 5

    # Deleting what others use: 409 naming them.
    refused = await api.delete("/v1/providers/mock")
    error = error_of(refused)
    assert refused.status_code == 409 and error["code"] == "in_use"
    assert error["used_by"] == ["models.gpt-4o-mini"]
    refused = await api.delete("/v1/policies/two-per-minute")
    assert refused.status_code == 409 and error_of(refused)["used_by"] == ["applications.bot"]
    refused = await api.delete("/v1/organizations/acme")
    assert refused.status_code == 409 and "applications.bot" in error_of(refused)["used_by"]

    # An application with an active key cannot go; once revoked it can.
    key = (await api.post("/v1/keys", json={"app": "bot", "name": "ci"})).json()
    assert key["key"].startswith("gwk_") and key["prefix"] == key["key"][:12]
    stored = await pool.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key["id"])
    assert key["key"] not in stored
    refused = await api.delete("/v1/applications/bot")
    assert refused.status_code == 409 and "active API key" in error_of(refused)["message"]
    revoked = await api.post(f"/v1/keys/{key['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert "key" not in revoked.json()
    deleted = await api.delete("/v1/applications/bot")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert (await api.get("/v1/applications/bot")).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        (
            "/v1/policies",
            {"name": "p", "type": "rate_limit", "requests": 1, "window": "60x"},
            "window",
            "ms, s, m, h or d",
        ),
        (
            "/v1/policies",
            {"name": "p", "type": "rate_limt", "requests": 1},
            "type",
            "did you mean 'rate_limit'",
        ),
        (
            "/v1/policies",
            {"name": "p", "type": "rate_limit", "requests": 1, "windw": "1s"},
            "windw",
            "did you mean 'window'",
        ),
        (
            "/v1/policies",
            {"name": "p", "type": "custom_cel", "pre_check_expression": "estimated_tokens < "},
            "pre_check_expression",
            "CEL syntax error",
        ),
        ("/v1/models", {"name": "m", "provider": "opnai"}, "provider", "unknown provider 'opnai'"),
        (
            "/v1/models",
            {"name": "m", "provider": "mock", "fallbacks": []},
            "fallbacks",
            "at least one fallback",
        ),
        (
            "/v1/models",
            {"name": "m", "provider": "mock", "weight": 2},
            "weight",
            "no effect without fallbacks",
        ),
        (
            "/v1/providers",
            {"name": "p", "type": "azure_openai", "base_url": "https://x.openai.azure.com"},
            "api_version",
            "missing required field",
        ),
        (
            "/v1/providers",
            {"name": "BAD", "type": "openai", "base_url": "https://a.b"},
            "name",
            "invalid provider name",
        ),
        ("/v1/applications", {"name": "a", "org": "nowhere"}, "org", "unknown organization"),
        (
            "/v1/applications",
            {"name": "a", "org": "acme", "policies": ["limt"]},
            "policies[0]",
            "unknown policy 'limt'",
        ),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    api: httpx.AsyncClient, path: str, body: dict[str, Any], param: str, says: str
) -> None:
    await build_catalog(api)
    response = await api.post(path, json=body)
    error = error_of(response)
    assert response.status_code == 400, response.text
    problems = error.get("errors") or [{"field": error["param"], "message": error["message"]}]
    assert error["param"] == problems[0]["field"]
    assert any(p["field"] == param and says in p["message"] for p in problems), error


async def test_policy_validate_and_types(api: httpx.AsyncClient) -> None:
    await build_catalog(api)
    good = await api.post(
        "/v1/policies/validate", json={"type": "model_allowlist", "models": ["mini"]}
    )
    assert good.json() == {"valid": True, "errors": []}
    bad = await api.post(
        "/v1/policies/validate",
        json={"type": "custom_cel", "pre_check_expression": "estimated_tokens < limit"},
    )
    answer = bad.json()
    assert answer["valid"] is False
    (error,) = answer["errors"]
    assert error["field"] == "pre_check_expression" and (error["line"], error["column"]) == (1, 20)
    assert error["message"].startswith("unknown variable 'limit'")

    types = {t["type"]: t for t in (await api.get("/v1/policy-types")).json()["data"]}
    assert set(types) == {
        "rate_limit",
        "token_limit",
        "budget",
        "model_allowlist",
        "request_size",
        "custom_cel",
    }
    assert types["rate_limit"]["parameters"]["required"] == ["type", "requests", "window"]
    assert types["custom_cel"]["cel_variables"]["post_check_expression"]["latency_ms"] == "double"


async def test_roles_and_organizations(api: httpx.AsyncClient, service: Service) -> None:
    await build_catalog(api)
    await api.post("/v1/organizations", json={"name": "globex"})
    await api.post("/v1/applications", json={"name": "other", "org": "globex"})

    created = await api.post(
        "/v1/tokens", json={"name": "acme-viewer", "role": "viewer", "org": "acme"}
    )
    assert created.status_code == 201, created.text
    viewer_token = created.json()["token"]
    assert viewer_token.startswith("gwa_") and created.json()["org"] == "acme"
    acme_admin = (
        await api.post("/v1/tokens", json={"name": "acme-admin", "role": "admin", "org": "acme"})
    ).json()["token"]
    base = f"http://127.0.0.1:{service.admin_port}"

    async with httpx.AsyncClient(base_url=base, timeout=10) as anonymous:
        assert error_of(await anonymous.get("/v1/providers"))["code"] == "missing_admin_token"
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/openapi.json")).status_code == 200
        wrong = await anonymous.get(
            "/v1/providers", headers={"authorization": "Bearer gwa_" + "x" * 43}
        )
        assert wrong.status_code == 401

    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {viewer_token}"}, timeout=10
    ) as viewer:
        assert (await viewer.get("/v1/providers")).status_code == 200
        apps = (await viewer.get("/v1/applications")).json()["data"]
        assert [a["name"] for a in apps] == ["bot"]  # only its organization's
        refused = await viewer.post(
            "/v1/policies", json={"name": "x", "type": "request_size", "max_bytes": 1}
        )
        assert refused.status_code == 403 and error_of(refused)["code"] == "forbidden_role"

    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {acme_admin}"}, timeout=10
    ) as scoped:
        assert (await scoped.get("/v1/applications/other")).status_code == 403
        assert (await scoped.post("/v1/keys", json={"app": "other"})).status_code == 403
        assert (await scoped.post("/v1/keys", json={"app": "bot"})).status_code == 201
        moved = await scoped.patch("/v1/applications/bot", json={"org": "globex"})
        assert moved.status_code == 403
        shared = await scoped.post(
            "/v1/policies", json={"name": "x", "type": "request_size", "max_bytes": 1}
        )
        assert shared.status_code == 403 and "shared" in error_of(shared)["message"]
        usage = await scoped.get("/v1/usage", params={"org": "globex"})
        assert usage.status_code == 403
        tokens = (await scoped.get("/v1/tokens")).json()["data"]
        assert {t["name"] for t in tokens} == {"acme-viewer", "acme-admin"}

    # Revoked: refused on the next request.
    assert (await api.post("/v1/tokens/acme-viewer/revoke")).status_code == 200
    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {viewer_token}"}, timeout=10
    ) as viewer:
        assert (await viewer.get("/v1/providers")).status_code == 401


async def test_provider_test_and_credential_rotation(
    api: httpx.AsyncClient, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ext_proc.mock.upstream import MockUpstream

    mock = MockUpstream()
    port = await mock.start("127.0.0.1", 0)
    try:
        monkeypatch.setenv("MOCK_KEY_1", "sk-first-secret")
        monkeypatch.setenv("MOCK_KEY_2", "sk-second-secret")
        created = await api.post(
            "/v1/providers",
            json={
                "name": "up",
                "type": "openai",
                "base_url": f"http://127.0.0.1:{port}",
                "api_key_env": "MOCK_KEY_1",
            },
        )
        assert created.status_code == 201
        assert any("Envoy" in w and "cluster" in w for w in created.json()["warnings"])
        tested = (await api.post("/v1/providers/up/test")).json()
        assert tested["test"]["ok"] is True and tested["test"]["status"] == 200
        assert "sk-first-secret" not in str(tested)

        rotated = await api.post(
            "/v1/providers/up/rotate-credentials", json={"api_key_env": "MOCK_KEY_2"}
        )
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["changed_reference"] is True
        assert (await api.get("/v1/providers/up")).json()["api_key_env"] == "MOCK_KEY_2"
        missing = await api.post(
            "/v1/providers/up/rotate-credentials", json={"api_key_env": "NOT_SET_ANYWHERE"}
        )
        assert missing.status_code == 400 and error_of(missing)["param"] == "api_key_env"
        assert (await api.get("/v1/providers/up")).json()[
            "api_key_env"
        ] == "MOCK_KEY_2"  # unchanged
        again = await api.post("/v1/providers/up/rotate-credentials", json={})
        assert again.status_code == 200 and again.json()["changed_reference"] is False
        down = await api.post(
            "/v1/providers",
            json={"name": "down", "type": "openai", "base_url": "http://127.0.0.1:9"},
        )
        assert down.status_code == 201
        result = (await api.post("/v1/providers/down/test")).json()["test"]
        assert result["ok"] is False and result["error"]
    finally:
        await mock.close()


async def test_activity_stream_receives_a_finished_request(
    api: httpx.AsyncClient, service: Service
) -> None:
    from ext_proc.usage.record import UsageRecord

    async with api.stream("GET", "/v1/activity", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert await anext(lines) == ": connected"
        assert await poll_async(
            lambda: service.activity is not None and service.activity.subscribers == 1, timeout=5
        )
        assert service.activity is not None
        service.activity.submit(
            UsageRecord(request_id="req-1", app_id="bot", org_id="acme", model="m", status_code=200)
        )
        seen = []

        async def read() -> None:
            async for line in lines:
                seen.append(line)
                if line.startswith("data: "):
                    return

        await asyncio.wait_for(read(), 5)
    assert "event: request" in seen
    assert '"request_id":"req-1"' in seen[-1]
