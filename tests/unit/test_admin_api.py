"""The admin API's answers to bad input, missing tokens and a database that cannot answer:
400 in the gateway's error shape naming the parameter, 401 without a token, 503
``service_unavailable`` with a message; never a 500 nor a traceback. The process behind
it is a stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ext_proc.admin.app import create_app
from ext_proc.settings import Settings


class DownPool:
    """An asyncpg pool whose server is gone."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.queries = 0

    async def fetch(self, *_: Any, **__: Any) -> list[Any]:
        self.queries += 1
        raise self.error

    async def fetchval(self, *_: Any, **__: Any) -> Any:
        self.queries += 1
        raise self.error

    def acquire(self, *_: Any, **__: Any) -> Any:
        self.queries += 1
        raise self.error


class EmptyPool:
    async def fetch(self, *_: Any, **__: Any) -> list[Any]:
        return []

    async def fetchval(self, *_: Any, **__: Any) -> Any:
        return None


class Backend:
    def __init__(self, pool: Any = None) -> None:
        self.settings = Settings(admin_token="secret")
        self.pool = pool
        self.redis = None
        self.activity = None
        self.config_dir = None
        self.running_config = None
        self.reload_error: Exception | None = None

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        return 503, {"status": "unavailable", "checks": {}}

    async def reload(self) -> str:
        if self.reload_error is not None:
            raise self.reload_error
        return "f" * 64


async def client_for(backend: Backend, token: str | None = "secret") -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(backend)),  # type: ignore[arg-type]
        base_url="http://admin",
        headers=headers,
    )


@pytest.fixture
async def down() -> AsyncIterator[tuple[DownPool, httpx.AsyncClient]]:
    pool = DownPool(ConnectionRefusedError())
    async with await client_for(Backend(pool)) as client:
        yield pool, client


def assert_error(response: httpx.Response, code: str, param: str | None) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    assert error["code"] == code and error["param"] == param, error
    assert error["message"] and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=garbage", "since"),
        ("until=yesterday-ish", "until"),
        ("since=99999999999d", "since"),  # overflows a date
        ("since=2025-13-45", "since"),
        ("by=colour", "by"),
        ("by=app_id,app_id", "by"),
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=-5", "limit"),
        ("limit=100001", "limit"),
        ("limit=1e3", "limit"),
        ("since=1h&until=2h", "since"),  # since after until
        ("sinse=24h", "sinse"),  # a typo is not silently ignored
        ("app=", "app"),
    ],
)
async def test_bad_usage_parameters_are_400_naming_the_parameter(
    down: tuple[DownPool, httpx.AsyncClient], query: str, param: str
) -> None:
    pool, client = down
    response = await client.get(f"/v1/usage?{query}")
    assert response.status_code == 400, response.text
    assert_error(response, "invalid_parameter", param)
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert pool.queries == 0  # refused before touching the database


async def test_good_usage_parameters_reach_the_database() -> None:
    async with await client_for(Backend(EmptyPool())) as client:
        response = await client.get("/v1/usage?by=org_id,model&since=7d&limit=10")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["group_by"] == ["org_id", "model"] and body["rows"] == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
        OSError("Network is unreachable"),
    ],
)
@pytest.mark.parametrize(
    "path", ["/v1/usage?since=24h", "/v1/providers", "/v1/audit", "/v1/keys", "/v1/tokens"]
)
async def test_a_database_outage_is_503_service_unavailable(error: Exception, path: str) -> None:
    async with await client_for(Backend(DownPool(error))) as client:
        response = await client.get(path)
    assert response.status_code == 503, response.text
    error_body = assert_error(response, "service_unavailable", None)
    assert error_body["type"] == "service_unavailable"
    assert "unavailable" in error_body["message"]
    assert response.headers["retry-after"] == "5"


async def test_no_pool_yet_is_503_too() -> None:
    async with await client_for(Backend(None)) as client:
        response = await client.get("/v1/usage")
        assert response.status_code == 503
        assert_error(response, "service_unavailable", None)
        response = await client.post("/v1/policies", json={"name": "p", "type": "request_size"})
        assert response.status_code == 503


async def test_reload_with_the_database_down_is_503() -> None:
    backend = Backend()
    backend.reload_error = ConnectionResetError("connection reset by peer")
    async with await client_for(backend) as client:
        response = await client.post("/v1/reload")
    assert response.status_code == 503
    assert_error(response, "service_unavailable", None)


async def test_readyz_and_healthz_need_no_token() -> None:
    async with await client_for(Backend(), token=None) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert (await client.get("/healthz")).json()["status"] == "ok"
        assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.")
        response = await client.get("/v1/providers")
        assert response.status_code == 401
        assert_error(response, "missing_admin_token", None)
        response = await client.get("/v1/providers", headers={"authorization": "Bearer nope"})
        assert response.status_code == 401
        assert_error(response, "invalid_admin_token", None)


async def test_unknown_paths_wrong_methods_and_bad_bodies() -> None:
    async with await client_for(Backend(EmptyPool())) as client:
        response = await client.get("/v1/nothing")
        assert response.status_code == 404
        assert_error(response, "not_found", None)
        response = await client.get("/v1/reload")
        assert response.status_code == 405
        assert_error(response, "method_not_allowed", None)
        assert response.headers["allow"] == "POST"
        response = await client.post(
            "/v1/policies", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert_error(response, "invalid_json", None)
        response = await client.post("/v1/policies", json=[1, 2])
        assert_error(response, "invalid_body", None)
        response = await client.post("/v1/policies", json={"type": "request_size"})
        assert response.status_code == 400
        assert_error(response, "invalid_parameter", "name")
        response = await client.post("/v1/keys", json={"name": "x"})
        assert response.status_code == 400
        assert_error(response, "invalid_parameter", "app")
        response = await client.post("/v1/tokens", json={"name": "t", "role": "owner"})
        error = assert_error(response, "invalid_parameter", "role")
        assert "admin, viewer" in error["message"]
        response = await client.get("/v1/audit?limit=0")
        assert_error(response, "invalid_parameter", "limit")
