"""The admin API's answers to bad input and to a database that cannot answer: 400 in
the gateway's error shape naming the parameter, 503 ``service_unavailable`` with a
message; never a 500 nor a traceback. The service behind it is a stand-in."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc.admin.api import AdminApi
from ext_proc.http.server import Request, Response
from ext_proc.settings import Settings


class DownPool:
    """An asyncpg pool whose server is gone."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.queries = 0

    async def fetch(self, *_: Any) -> list[Any]:
        self.queries += 1
        raise self.error


class EmptyPool:
    async def fetch(self, *_: Any) -> list[Any]:
        return []


class Service:
    def __init__(self, pool: Any = None) -> None:
        self.settings = Settings(admin_token="secret")
        self.pool = pool
        self.reload_error: Exception | None = None

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        return 503, {"status": "unavailable", "checks": {}}

    async def reload(self) -> str:
        if self.reload_error is not None:
            raise self.reload_error
        return "f" * 64


async def call(
    api: AdminApi, path: str, query: str = "", method: str = "GET", **headers: str
) -> tuple[int, dict[str, Any], Response]:
    response = await api.handle(Request(method, path, query, headers, b""))
    assert isinstance(response.body, bytes)
    return response.status, orjson.loads(response.body), response


def assert_error(body: dict[str, Any], code: str, param: str | None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]


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
async def test_bad_usage_parameters_are_400_naming_the_parameter(query: str, param: str) -> None:
    pool = DownPool(ConnectionRefusedError())
    status, body, _ = await call(AdminApi(Service(pool)), "/v1/usage", query)  # type: ignore[arg-type]
    assert status == 400, body
    assert_error(body, "invalid_parameter", param)
    assert body["error"]["type"] == "invalid_request_error"
    assert pool.queries == 0  # refused before touching the database


async def test_good_usage_parameters_reach_the_database() -> None:
    api = AdminApi(Service(EmptyPool()))  # type: ignore[arg-type]
    status, body, _ = await call(api, "/v1/usage", "by=org_id,model&since=7d&limit=10")
    assert status == 200, body
    assert body["group_by"] == ["org_id", "model"] and body["rows"] == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
        OSError("Network is unreachable"),
    ],
)
async def test_a_database_outage_is_503_service_unavailable(error: Exception) -> None:
    api = AdminApi(Service(DownPool(error)))  # type: ignore[arg-type]
    status, body, response = await call(api, "/v1/usage", "since=24h")
    assert status == 503
    assert_error(body, "service_unavailable", None)
    assert body["error"]["type"] == "service_unavailable"
    assert "unavailable" in body["error"]["message"]
    assert ("retry-after", "5") in response.headers


async def test_no_pool_yet_is_503_too() -> None:
    status, body, _ = await call(AdminApi(Service(None)), "/v1/usage")  # type: ignore[arg-type]
    assert status == 503
    assert_error(body, "service_unavailable", None)


async def test_reload_with_the_database_down_is_503() -> None:
    service = Service()
    service.reload_error = ConnectionResetError("connection reset by peer")
    api = AdminApi(service)  # type: ignore[arg-type]
    status, body, _ = await call(api, "/v1/reload", method="POST", authorization="Bearer secret")
    assert status == 503
    assert_error(body, "service_unavailable", None)


async def test_readyz_answers_what_the_service_says() -> None:
    status, body, _ = await call(AdminApi(Service()), "/readyz")  # type: ignore[arg-type]
    assert status == 503 and body["status"] == "unavailable"


async def test_unknown_paths_and_wrong_methods() -> None:
    api = AdminApi(Service())  # type: ignore[arg-type]
    status, body, _ = await call(api, "/v1/nothing")
    assert status == 404
    assert_error(body, "not_found", None)
    status, body, response = await call(api, "/v1/reload")
    assert status == 405
    assert_error(body, "method_not_allowed", None)
    assert ("allow", "POST") in response.headers
