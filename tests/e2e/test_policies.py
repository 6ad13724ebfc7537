"""Keys and policies end to end: the stock SDKs see 401/403/404/413/429 exactly when the
policies say so, and every decision is in the usage row and the metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import openai
import pytest

from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello there"}]


def cli(e2e: E2E, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": e2e.database_url,
        "REDIS_URL": e2e.stack.redis_url or "",
        "EXT_PROC_REDIS_PREFIX": e2e.stack.options.redis_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "ext_proc", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


async def poll_status(call: object, expected: type[Exception], timeout: float = 5.0) -> Exception:
    """Repeat a request until it raises ``expected`` (bounded); return the exception."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()  # type: ignore[operator]
        except expected as exc:
            return exc
        if time.monotonic() > deadline:
            raise AssertionError(f"still no {expected.__name__} after {timeout}s")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- 401


@pytest.mark.parametrize(
    ("key", "code"), [("", "missing_api_key"), ("gwk_not-a-real-key", "invalid_api_key")]
)
async def test_missing_or_unknown_key_is_401(e2e: E2E, key: str, code: str) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{e2e.base_url}/v1", api_key=key or "unused", max_retries=0
    )
    headers = {"Authorization": ""} if not key else {}
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, extra_headers=headers
        )
    assert info.value.status_code == 401
    assert info.value.code == code
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["error_code"]) == (401, "denied", code)
    assert row["app_id"] is None and row["key_id"] is None


async def test_key_in_azure_and_anthropic_headers(e2e: E2E) -> None:
    for header in ("api-key", "x-api-key"):
        client = openai.AsyncOpenAI(base_url=f"{e2e.base_url}/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=HELLO,
            extra_headers={"Authorization": "", header: e2e.api_key},
        )
        row = await e2e.usage_row(raw.headers["x-request-id"])
        assert row["app_id"] == "e2e-app" and row["org_id"] == "e2e"


async def test_revoked_key_is_401_within_a_second(e2e: E2E) -> None:
    key = await e2e.create_key("e2e-app")
    client = e2e.sdk(key=key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # cached now
    listing = await asyncio.to_thread(cli, e2e, "keys", "list", "--app", "e2e-app")
    assert listing.returncode == 0, listing.stderr
    key_id = next(line.split()[0] for line in listing.stdout.splitlines() if key[:12] in line)
    revoked = await asyncio.to_thread(cli, e2e, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    exc = await poll_status(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=HELLO),
        openai.AuthenticationError,
        timeout=1.0,
    )
    assert time.monotonic() - started < 1.0
    assert isinstance(exc, openai.AuthenticationError) and exc.code == "revoked_api_key"
    assert key not in str(exc.message)  # never echo the key
    row = await e2e.usage_row(exc.response.headers["x-request-id"])
    assert row["key_id"] == key_id and row["decision"] == "denied"


async def test_expired_key_is_401(e2e: E2E) -> None:
    made = await asyncio.to_thread(
        cli, e2e, "keys", "create", "--app", "e2e-app", "--expires-in", "1s"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]  # contract: the key is the last line
    assert key.startswith("gwk_")
    client = e2e.sdk(key=key)
    exc = await poll_status(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=HELLO),
        openai.AuthenticationError,
        timeout=5.0,
    )
    assert isinstance(exc, openai.AuthenticationError) and exc.code == "expired_api_key"


# ------------------------------------------------------------------- 403 / 404 / 413


async def test_model_not_in_allowlist_is_403(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("checked-app"))
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert info.value.code == "model_not_allowed"
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert (row["decision"], row["policy"], row["status_code"]) == ("denied", "mini-only", 403)
    assert row["app_id"] == "checked-app"
    ok = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    assert ok.status_code == 200
    models = [m.id async for m in await client.models.list()]
    assert "gpt-4o-mini" in models and "text-embedding-3-small" in models
    assert "gpt-4o" not in models


async def test_cel_pre_check_denies_streams(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("checked-app"))
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
    assert info.value.code == "policy_violation"
    assert "streaming is disabled" in info.value.message
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert row["policy"] == "no-streams" and row["decision"] == "denied"


async def test_unknown_model_is_404(e2e: E2E) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await e2e.sdk().chat.completions.create(model="gpt-9", messages=HELLO)
    assert info.value.code == "model_not_found"
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["model"]) == (404, "denied", "gpt-9")


async def test_request_size_policy_is_413(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("checked-app"))
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert row["policy"] == "small-bodies"
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO * 4)
    assert info.value.status_code == 413 and info.value.code == "too_many_messages"


# ---------------------------------------------------------------------------- 429


async def test_rate_limit_counts_down_then_429(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("limited-app"))
    remaining = []
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-reset-requests"]
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    response = info.value.response
    assert info.value.code == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    row = await e2e.usage_row(response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["policy"]) == (429, "denied", "three-per-hour")
    denied = e2e.metric("ext_proc_requests_total", decision="denied", policy="three-per-hour")
    assert denied >= 1


async def test_key_scoped_limit_is_per_key(e2e: E2E) -> None:
    first = e2e.sdk(key=await e2e.create_key("keyed-app"))
    second = e2e.sdk(key=await e2e.create_key("keyed-app"))
    for client in (first, second):
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    for client in (first, second):
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


async def test_token_limit_reserves_and_settles(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("budget-app"))
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=150
    )
    assert first.headers["x-ratelimit-limit-tokens"] == "400"
    used = first.parse().usage
    assert used is not None
    # The reservation (estimate + 150) was settled to the real total, so the budget left
    # is 400 - total: a second request reserving more than that is refused.
    row = await e2e.usage_row(first.headers["x-request-id"])
    assert row["estimated_prompt_tokens"] == used.prompt_tokens
    deadline = time.monotonic() + 5
    while True:  # settlement happens after the response: poll the header (bounded)
        probe = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=1
        )
        left = int(probe.headers["x-ratelimit-remaining-tokens"])
        if left >= 400 - 2 * (used.total_tokens + 10) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert left >= 400 - 2 * (used.total_tokens + 10)  # not 400 - 2 * (prompt + 150)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=390)
    assert "tokens" in info.value.message
    row = await e2e.usage_row(info.value.response.headers["x-request-id"])
    assert row["policy"] == "token-budget"


async def test_post_check_violation_marks_row_and_cools_down(e2e: E2E) -> None:
    client = e2e.sdk(key=await e2e.create_key("post-app"))
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, extra_headers={"x-mock-completion-tokens": "30"}
    )
    assert raw.status_code == 200  # a post-check cannot recall the answer
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["policy_violations"] == ["short-answers"]
    assert e2e.metric("ext_proc_policy_violations_total", policy="short-answers") >= 1
    exc = await poll_status(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=HELLO),
        openai.RateLimitError,
    )
    assert isinstance(exc, openai.RateLimitError) and exc.code == "policy_cooldown"
    assert int(exc.response.headers["retry-after"]) > 3000


async def test_environment_adds_policies(e2e: E2E) -> None:
    prod = e2e.sdk(key=await e2e.create_key("env-app", "prod"))
    default = e2e.sdk(key=await e2e.create_key("env-app"))
    with pytest.raises(openai.PermissionDeniedError):
        await prod.chat.completions.create(model="gpt-4o", messages=HELLO)
    raw = await default.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["environment"] == "default" and row["status_code"] == 200


async def test_apply_twice_is_a_no_op(e2e: E2E) -> None:
    config = str(e2e.stack.options.config_path)
    again = await asyncio.to_thread(cli, e2e, "apply", "-f", config)
    assert again.returncode == 0, again.stderr
    assert "no changes" in again.stdout
