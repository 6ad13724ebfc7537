"""``ext-proc apply`` against the real Postgres: what lands in the catalog, idempotence,
dry runs, version bumps, pruning, refusals, invalid files and the fingerprint round trip."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from ext_proc.apply import StalePlan, apply, format_plan, plan
from ext_proc.auth.store import create_key, revoke_key
from ext_proc.config import load_config
from ext_proc.stores.catalog import applied_state, config_version
from ext_proc.stores.catalog import load_config as load_catalog
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration


GATEWAY = """\
x-timeouts: &timeouts {timeout: 30s, connect_timeout: 2s}
providers:
  openai: {type: openai, base_url: "https://api.openai.com/", api_key_env: OPENAI_API_KEY}
  azure-eastus:
    <<: *timeouts
    type: azure_openai
    base_url: "https://contoso.openai.azure.com"
    api_version: 2024-10-21
    api_key_env: AZURE_OPENAI_API_KEY
    headers: {X-Team: platform}
    retries: {attempts: 2, on: [5xx, reset]}
  claude: {type: anthropic, base_url: "https://api.anthropic.com", api_key_file: /run/keys/claude}
models:
  gpt-4o-mini: {provider: azure-eastus, deployment: gpt-4o-mini-prod}
  gpt-4.1: {provider: openai, aliases: [gpt-4.1-latest], encoding: o200k_base}
  claude-sonnet: {provider: claude, deployment: claude-sonnet-4-5}
policies:
  sixty-per-minute: {type: rate_limit, requests: 60, window: 60s}
  tokens-per-minute: {type: token_limit, tokens: 100000, window: 1m, scope: org}
  mini-only: {type: model_allowlist, models: [gpt-4o-mini, "gpt-4*"]}
  small-requests: {type: request_size, max_bytes: 262144}
  short-prompts:
    type: custom_cel
    pre_check_expression: "estimated_tokens < 4000"
    post_check_expression: "total_tokens < 8000"
    message: "prompts must stay under 4000 tokens"
    cooldown: 30s
    on_error: deny
applications:
  support-bot:
    org: acme
    description: "Answers support tickets"
    policies: [sixty-per-minute, tokens-per-minute, mini-only]
    environments:
      default: {policies: [small-requests]}
      prod: {policies: [short-prompts]}
      dev:
  batch-jobs: {org: globex, policies: [tokens-per-minute]}
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def table_state(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every catalog row (timestamps and versions included) and the catalog_state row."""
    tables = [
        "organizations",
        "providers",
        "models",
        "policies",
        "applications",
        "application_environments",
        "application_policies",
        "catalog_state",
    ]
    state = {}
    for table in tables:
        rows = await pool.fetch(f"SELECT t::text AS row FROM {table} t ORDER BY 1")
        state[table] = [row["row"] for row in rows]
    return state


async def test_apply_writes_the_catalog_and_loads_back_with_the_same_fingerprint(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = write(tmp_path, GATEWAY)
    code, out, err = await cli("apply", "-f", str(path))
    assert code == 0, err
    assert "+ provider azure-eastus (azure_openai, https://contoso.openai.azure.com)" in out
    assert "+ model gpt-4o-mini (azure-eastus/gpt-4o-mini-prod)" in out
    assert "+ policy sixty-per-minute (rate_limit)" in out
    assert (
        "+ application support-bot (org acme): policies [sixty-per-minute, tokens-per-minute, "
        "mini-only]; environments.default.policies [small-requests]; "
        "environments.prod.policies [short-prompts]"
    ) in out
    assert "13 to create, 0 to update, 0 to delete" in out
    assert re.search(r"applied .*gateway\.yaml: 13 created, 0 updated, 0 deleted", out)

    # Rows as gateway.yaml writes them.
    policy = await pool.fetchrow(
        "SELECT type, config::text, enabled, on_error, version, managed_by FROM policies "
        "WHERE name = 'sixty-per-minute'"
    )
    assert policy is not None
    assert orjson.loads(policy["config"]) == {"requests": 60, "window": "1m", "scope": "app"}
    assert (policy["type"], policy["enabled"], policy["on_error"]) == ("rate_limit", True, "allow")
    assert (policy["version"], policy["managed_by"]) == (1, "file")
    cel = await pool.fetchrow(
        "SELECT config::text, on_error FROM policies WHERE name = 'short-prompts'"
    )
    assert cel is not None and cel["on_error"] == "deny"
    assert orjson.loads(cel["config"])["cooldown"] == "30s"
    azure = await pool.fetchrow(
        "SELECT base_url, config::text FROM providers WHERE name = 'azure-eastus'"
    )
    assert azure is not None and azure["base_url"] == "https://contoso.openai.azure.com"
    azure_config = orjson.loads(azure["config"])
    assert azure_config["api_version"] == "2024-10-21"
    assert azure_config["headers"] == {"x-team": "platform"}
    assert azure_config["timeout"] == "30s" and azure_config["retries"]["on"] == ["5xx", "reset"]
    assert (
        await pool.fetchval(
            "SELECT p.name FROM models m JOIN providers p ON p.id = m.provider_id "
            "WHERE m.name = 'claude-sonnet'"
        )
        == "claude"
    )
    bindings = await pool.fetch(
        "SELECT e.name AS env, p.name AS policy, b.position FROM application_policies b "
        "JOIN applications a ON a.id = b.application_id JOIN policies p ON p.id = b.policy_id "
        "LEFT JOIN application_environments e ON e.id = b.environment_id "
        "WHERE a.name = 'support-bot' ORDER BY e.name NULLS FIRST, b.position"
    )
    assert [(r["env"], r["policy"], r["position"]) for r in bindings] == [
        (None, "sixty-per-minute", 0),
        (None, "tokens-per-minute", 1),
        (None, "mini-only", 2),
        ("default", "small-requests", 0),
        ("prod", "short-prompts", 0),
    ]
    environments = await pool.fetch(
        "SELECT a.name AS app, e.name AS env FROM application_environments e "
        "JOIN applications a ON a.id = e.application_id ORDER BY 1, 2"
    )
    assert [(r["app"], r["env"]) for r in environments] == [
        ("batch-jobs", "default"),
        ("support-bot", "default"),
        ("support-bot", "dev"),
        ("support-bot", "prod"),
    ]
    orgs = await pool.fetch("SELECT name FROM organizations ORDER BY name")
    assert [r["name"] for r in orgs] == ["acme", "globex"]

    # The round trip: the catalog is the file.
    file_config = load_config(path)
    loaded = await load_catalog(pool)
    assert loaded is not None
    assert loaded.source == "postgres"
    assert loaded.fingerprint == file_config.fingerprint
    assert loaded.canonical() == file_config.canonical()
    assert loaded.application_policies("support-bot", "prod") == file_config.application_policies(
        "support-bot", "prod"
    )
    assert await config_version(pool) == file_config.fingerprint
    state = await applied_state(pool)
    assert state.applied_fingerprint == state.fingerprint == file_config.fingerprint
    assert state.applied_source == str(path) and state.applied_at is not None


async def test_the_example_config_round_trips(pool: asyncpg.Pool, repo_root: Path) -> None:
    config = load_config(repo_root / "examples" / "gateway.yaml")
    assert await load_catalog(pool) is None  # nothing applied yet
    assert await config_version(pool) == ""
    await apply(pool, await plan(pool, config, prune=False))
    loaded = await load_catalog(pool)
    assert loaded is not None and loaded.fingerprint == config.fingerprint


async def test_applying_the_same_file_again_writes_nothing(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = write(tmp_path, GATEWAY)
    assert (await cli("apply", "-f", str(path)))[0] == 0
    before = await table_state(pool)

    # The same meaning written differently is not a change either.
    reformatted = GATEWAY.replace("window: 60s", "window: 1m").replace(
        '"https://api.openai.com/"', "https://api.openai.com"
    )
    for text in (GATEWAY, reformatted):
        code, out, err = await cli("apply", "-f", str(write(tmp_path, text)))
        assert code == 0, err
        assert out.strip() == "no changes"
        assert await table_state(pool) == before  # updated_at, versions, revision untouched


async def test_dry_run_prints_the_diff_and_writes_nothing(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = write(tmp_path, GATEWAY)
    empty = await table_state(pool)
    code, out, _ = await cli("apply", "-f", str(path), "--dry-run")
    assert code == 0
    assert "+ policy mini-only (model_allowlist)" in out
    assert out.rstrip().endswith("dry run: nothing was written")
    assert await table_state(pool) == empty

    assert (await cli("apply", "-f", str(path)))[0] == 0
    applied = await table_state(pool)
    changed = GATEWAY.replace("requests: 60", "requests: 100").replace(
        "policies: [tokens-per-minute]}", "policies: [tokens-per-minute, small-requests]}"
    )
    code, out, _ = await cli("apply", "-f", str(write(tmp_path, changed)), "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "~ policy sixty-per-minute: requests 60 -> 100; version 1 -> 2",
        "~ application batch-jobs: policies [tokens-per-minute] -> "
        "[tokens-per-minute, small-requests]",
        "0 to create, 2 to update, 0 to delete",
        "dry run: nothing was written",
    ]
    assert await table_state(pool) == applied


async def test_a_changed_policy_gets_a_new_version_and_nothing_else_moves(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert (await cli("apply", "-f", str(write(tmp_path, GATEWAY))))[0] == 0
    before = {
        r["name"]: (r["version"], r["updated_at"])
        for r in await pool.fetch("SELECT name, version, updated_at FROM policies")
    }
    changed = (
        GATEWAY.replace("tokens: 100000, window: 1m", "tokens: 50000, window: 1m")
        .replace("mini-only]\n", "mini-only, short-prompts]\n")
        .replace("      prod: {policies: [short-prompts]}\n", "")
    )
    code, out, err = await cli("apply", "-f", str(write(tmp_path, changed)))
    assert code == 0, err
    assert "~ policy tokens-per-minute: tokens 100000 -> 50000; version 1 -> 2" in out
    assert (
        "~ application support-bot: policies [sixty-per-minute, tokens-per-minute, mini-only]"
        " -> [sixty-per-minute, tokens-per-minute, mini-only, short-prompts]"
    ) in out
    assert "~ application support-bot: environments [default, dev, prod] -> [default, dev]" in out
    after = {
        r["name"]: (r["version"], r["updated_at"])
        for r in await pool.fetch("SELECT name, version, updated_at FROM policies")
    }
    assert after["tokens-per-minute"][0] == 2
    assert after["tokens-per-minute"][1] > before["tokens-per-minute"][1]
    unchanged = {name for name in before if name != "tokens-per-minute"}
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    loaded = await load_catalog(pool)
    assert loaded is not None
    assert loaded.fingerprint == load_config(write(tmp_path, changed, "check.yaml")).fingerprint
    assert "prod" not in loaded.applications["support-bot"].environments


async def test_a_new_environment_with_policies_is_an_application_update(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert (await cli("apply", "-f", str(write(tmp_path, GATEWAY))))[0] == 0
    staged = GATEWAY.replace(
        "batch-jobs: {org: globex, policies: [tokens-per-minute]}",
        "batch-jobs: {org: globex, policies: [tokens-per-minute], "
        "environments: {staging: {policies: [small-requests]}}}",
    )
    code, out, err = await cli("apply", "-f", str(write(tmp_path, staged)))
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "~ application batch-jobs: environments [default] -> [default, staging]",
        "~ application batch-jobs: environments.staging.policies [] -> [small-requests]",
        "0 to create, 2 to update, 0 to delete",
    ]
    loaded = await load_catalog(pool)
    assert loaded is not None
    assert [p.name for p in loaded.application_policies("batch-jobs", "staging")] == [
        "tokens-per-minute",
        "small-requests",
    ]


async def test_objects_missing_from_the_file_are_kept_unless_pruned(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert (await cli("apply", "-f", str(write(tmp_path, GATEWAY))))[0] == 0
    smaller = (
        GATEWAY.replace("  claude-sonnet: {provider: claude, deployment: claude-sonnet-4-5}\n", "")
        .replace(
            '  claude: {type: anthropic, base_url: "https://api.anthropic.com", '
            "api_key_file: /run/keys/claude}\n",
            "",
        )
        .replace("  batch-jobs: {org: globex, policies: [tokens-per-minute]}\n", "")
    )
    path = write(tmp_path, smaller)
    code, out, err = await cli("apply", "-f", str(path))
    assert code == 0, err
    assert out.splitlines() == [
        "- provider claude (kept; --prune deletes)",
        "- model claude-sonnet (kept; --prune deletes)",
        "- application batch-jobs (kept; --prune deletes)",
        "no changes",
    ]
    assert await pool.fetchval("SELECT count(*) FROM models WHERE name = 'claude-sonnet'") == 1

    code, out, err = await cli("apply", "-f", str(path), "--prune")
    assert code == 0, err
    assert out.splitlines()[:4] == [
        "- application batch-jobs (org globex)",
        "- model claude-sonnet (claude/claude-sonnet-4-5)",
        "- provider claude (anthropic, https://api.anthropic.com)",
        "0 to create, 0 to update, 3 to delete",
    ]
    assert await pool.fetchval("SELECT count(*) FROM models WHERE name = 'claude-sonnet'") == 0
    assert await pool.fetchval("SELECT count(*) FROM applications WHERE name = 'batch-jobs'") == 0
    assert await pool.fetchval("SELECT count(*) FROM organizations WHERE name = 'globex'") == 0
    loaded = await load_catalog(pool)
    assert loaded is not None and loaded.fingerprint == load_config(path).fingerprint


async def test_prune_refuses_to_delete_an_application_with_active_keys(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert (await cli("apply", "-f", str(write(tmp_path, GATEWAY))))[0] == 0
    new = await create_key(pool, "batch-jobs")
    await create_key(pool, "batch-jobs")
    without = GATEWAY.replace("  batch-jobs: {org: globex, policies: [tokens-per-minute]}\n", "")
    path = write(tmp_path, without)
    before = await table_state(pool)
    code, out, err = await cli("apply", "-f", str(path), "--prune")
    assert code == 1
    assert "- application batch-jobs (org globex)" in out
    assert "refused: application batch-jobs still has 2 active API key(s): revoke them first" in err
    assert "nothing was written" in err
    assert await table_state(pool) == before

    await revoke_key(pool, new.info.key_id)
    code, _, err = await cli("apply", "-f", str(path), "--prune")
    assert code == 1 and "still has 1 active API key(s)" in err
    for key in await pool.fetch("SELECT id FROM api_keys WHERE revoked_at IS NULL"):
        await revoke_key(pool, key["id"])
    code, _, err = await cli("apply", "-f", str(path), "--prune")
    assert code == 0, err
    # The revoked keys went with their application.
    assert await pool.fetchval("SELECT count(*) FROM api_keys") == 0


async def test_removing_an_environment_with_active_keys_is_refused(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert (await cli("apply", "-f", str(write(tmp_path, GATEWAY))))[0] == 0
    await create_key(pool, "support-bot", environment="dev")
    without_dev = GATEWAY.replace("      dev:\n", "")
    code, _, err = await cli("apply", "-f", str(write(tmp_path, without_dev)))
    assert code == 1
    assert "environment dev of application support-bot still has 1 active API key(s)" in err
    # The database enforces it for every writer, too.
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="revoke them first"):
        await pool.execute("DELETE FROM application_environments WHERE name = 'dev'")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="default environment"):
        await pool.execute("DELETE FROM application_environments WHERE name = 'default'")


def _position(text: str, needle: str, offset: int = 0) -> str:
    index = text.index(needle) + offset
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"{line}:{column}"


INVALID_CASES = {
    "bad window": (
        GATEWAY.replace("window: 60s", "window: 60x"),
        "60x",
        "policies.sixty-per-minute.window: invalid duration '60x'",
    ),
    "unknown policy type": (
        GATEWAY.replace("type: rate_limit", "type: rate_limiter"),
        "rate_limiter",
        "policies.sixty-per-minute.type: unknown policy type 'rate_limiter'",
    ),
    "binding to a missing policy": (
        GATEWAY.replace("policies: [tokens-per-minute]}", "policies: [tokens-per-minute, nope]}"),
        "nope",
        "applications.batch-jobs.policies[1]: unknown policy 'nope'",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CASES))
async def test_an_invalid_file_is_rejected_whole_with_positions(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path, case: str
) -> None:
    text, needle, message = INVALID_CASES[case]
    path = write(tmp_path, text)
    empty = await table_state(pool)
    code, out, err = await cli("apply", "-f", str(path))
    assert code == 2
    assert out == ""
    assert f"{path}:{_position(text, needle)}: {message}" in err
    assert f"{path}: rejected, 1 problem; nothing was written" in err
    assert await table_state(pool) == empty


async def test_cel_syntax_errors_point_into_the_expression_and_all_problems_are_listed(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    text = GATEWAY.replace('"estimated_tokens < 4000"', '"estimated_tokens < < 4000"').replace(
        "window: 60s", "window: 60x"
    )
    path = write(tmp_path, text)
    code, _, err = await cli("apply", "-f", str(path))
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == (
        f"{path}:{_position(text, '60x')}: policies.sixty-per-minute.window: "
        "invalid duration '60x'; use a number with a unit: ms, s, m, h or d "
        "(e.g. 500ms, 60s, 5m, 1h, 1d)"
    )
    cel = re.fullmatch(
        rf"{re.escape(str(path))}:(\d+):(\d+): policies\.short-prompts\.pre_check_expression: "
        r"CEL syntax error: .+",
        lines[1],
    )
    assert cel is not None, lines
    expression_start = _position(text, "estimated_tokens < <", offset=0)
    line, column = expression_start.split(":")
    assert cel.group(1) == line
    assert int(cel.group(2)) > int(column)  # inside the expression, not at its start
    assert lines[-1] == f"{path}: rejected, 2 problems; nothing was written"
    assert await pool.fetchval("SELECT count(*) FROM policies") == 0


async def test_an_unmigrated_database_is_refused(unmigrated_cli: Cli, tmp_path: Path) -> None:
    code, _, err = await unmigrated_cli("apply", "-f", str(write(tmp_path, GATEWAY)))
    assert code == 2
    assert "run `ext-proc migrate` first" in err


async def test_apply_overwrites_file_managed_objects_and_skips_api_managed_ones(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = write(tmp_path, GATEWAY)
    assert (await cli("apply", "-f", str(path)))[0] == 0
    # An SQL edit to a file-managed policy (the file still manages it), an edit made as
    # the admin API makes them (it manages the policy from then on), and an API policy.
    await pool.execute(
        "UPDATE policies SET config = config || '{\"requests\": 5}' WHERE name = 'sixty-per-minute'"
    )
    await pool.execute(
        "UPDATE policies SET config = config || '{\"tokens\": 5}', managed_by = 'api' "
        "WHERE name = 'tokens-per-minute'"
    )
    await pool.execute(
        "INSERT INTO policies (name, type, config) "
        "VALUES ('admin-only', 'rate_limit', '{\"requests\": 1, \"window\": \"10s\"}')"
    )
    edited = await load_catalog(pool)
    assert edited is not None and edited.policies["sixty-per-minute"].params.requests == 5  # type: ignore[attr-defined]
    assert await config_version(pool) == edited.fingerprint != load_config(path).fingerprint

    code, out, err = await cli("apply", "-f", str(path))
    assert code == 0, err
    assert "~ policy sixty-per-minute: requests 5 -> 60; version 2 -> 3" in out
    assert (
        "! policy tokens-per-minute: managed by the admin API, not overwritten (--force "
        "overwrites it): tokens 5 -> 100000"
    ) in out
    assert "- policy admin-only (managed by the admin API; kept; --prune-api deletes)" in out
    assert "1 skipped (managed by the admin API)" in out
    assert "--force overwrites them" in err
    rows = {
        row["name"]: (row["version"], row["managed_by"])
        for row in await pool.fetch("SELECT name, version, managed_by FROM policies")
    }
    assert rows["sixty-per-minute"] == (3, "file")
    assert rows["tokens-per-minute"] == (2, "api")  # not overwritten
    assert rows["admin-only"] == (1, "api")
    kept = await load_catalog(pool)
    assert kept is not None and kept.policies["tokens-per-minute"].params.tokens == 5  # type: ignore[attr-defined]

    # --prune leaves API-managed objects alone; --force takes them over; --prune-api
    # deletes the ones the file does not declare.
    code, out, err = await cli("apply", "-f", str(path), "--prune")
    assert code == 0, err
    assert await pool.fetchval("SELECT count(*) FROM policies WHERE name = 'admin-only'") == 1
    code, out, err = await cli("apply", "-f", str(path), "--force", "--prune-api")
    assert code == 0, err
    assert "~ policy tokens-per-minute: tokens 5 -> 100000; version 2 -> 3" in out
    assert "- policy admin-only (rate_limit)" in out
    rows = {
        row["name"]: (row["version"], row["managed_by"])
        for row in await pool.fetch("SELECT name, version, managed_by FROM policies")
    }
    assert rows["tokens-per-minute"] == (3, "file") and "admin-only" not in rows
    restored = await load_catalog(pool)
    assert restored is not None and restored.fingerprint == load_config(path).fingerprint
    assert await config_version(pool) == restored.fingerprint
    # Each write is in the audit log.
    actions = await pool.fetch(
        "SELECT action, kind, name FROM audit_log WHERE actor = 'ext-proc apply' "
        "AND name IN ('tokens-per-minute', 'admin-only') ORDER BY id"
    )
    assert [(r["action"], r["kind"], r["name"]) for r in actions] == [
        ("create", "policy", "tokens-per-minute"),
        ("update", "policy", "tokens-per-minute"),
        ("delete", "policy", "admin-only"),
    ]


async def test_versions_are_bumped_by_the_database_for_any_writer(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO policies (name, type, config) "
        "VALUES ('p', 'rate_limit', '{\"requests\": 1, \"window\": \"10s\"}')"
    )
    await pool.execute("UPDATE policies SET enabled = false, version = 99 WHERE name = 'p'")
    await pool.execute("UPDATE policies SET enabled = false WHERE name = 'p'")  # no change
    await pool.execute("UPDATE policies SET version = 42 WHERE name = 'p'")  # not by hand
    assert await pool.fetchval("SELECT version FROM policies WHERE name = 'p'") == 2


async def test_a_plan_made_before_another_change_is_refused(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    config = load_config(write(tmp_path, GATEWAY))
    first = await plan(pool, config, prune=False)
    await pool.execute("INSERT INTO organizations (name) VALUES ('someone-else')")
    with pytest.raises(StalePlan, match="run apply again"):
        await apply(pool, first)
    assert await pool.fetchval("SELECT count(*) FROM policies") == 0
    result = await apply(pool, await plan(pool, config, prune=False))
    assert result.created == 13
    assert result.policy_versions == dict.fromkeys(config.policies, 1)
    # (The organization inserted by SQL is an object of its own now, kept and listed.)
    assert format_plan(await plan(pool, config, prune=False)).splitlines()[-1] == "no changes"


async def next_message(pubsub: aioredis.client.PubSub, timeout: float = 5.0) -> bytes | None:
    """The next published message's data (subscribe confirmations skipped), bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None and message["type"] == "message":
            data: bytes = message["data"]
            return data
    return None


async def test_apply_publishes_a_config_invalidation(
    pool: asyncpg.Pool, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(f"{redis_prefix}invalidate")
        config = load_config(write(tmp_path, GATEWAY))
        result = await apply(pool, await plan(pool, config, prune=False), client, redis_prefix)
        assert result.published and result.publish_error is None
        assert await next_message(pubsub) == b"config:*"

        # An application moving to another org also drops every cached key.
        moved = GATEWAY.replace("org: globex", "org: initech")
        config = load_config(write(tmp_path, moved))
        result = await apply(pool, await plan(pool, config, prune=False), client, redis_prefix)
        assert result.published
        assert [await next_message(pubsub), await next_message(pubsub)] == [b"key:*", b"config:*"]
    finally:
        await pubsub.aclose()
        await client.aclose()
