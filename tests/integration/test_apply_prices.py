"""``ext-proc apply`` with prices and budgets: what the catalog stores for a model's
``price:`` and a ``budget`` policy, the exact round trip back to the file's config, and
a price change being an update like any other."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson
import pytest

from ext_proc.config import load_config
from ext_proc.routing.catalog import Catalog
from ext_proc.stores.catalog import load_config as load_catalog
from ext_proc.usage.pricing import Price
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration

GATEWAY = """\
providers:
  openai: {type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}
  claude: {type: anthropic, base_url: "https://api.anthropic.com", api_key_env: CLAUDE_KEY}
models:
  gpt-4o: {provider: openai, price: {input: 2.5, cached_input: 1.25, output: 10}}
  gpt-4o-mini: {provider: openai}
  claude-sonnet-4: {provider: claude, deployment: claude-sonnet-4-20250514,
                    price: {input: 3, output: 15, cached_input: 0.3, cache_write: 3.75}}
  cheap: {provider: openai, deployment: acme-7b, price: {input: 0.000015, output: 0.00006}}
policies:
  monthly-fifty: {type: budget, usd: 50, period: month, scope: org}
  pennies: {type: budget, usd: 0.000123, window: 30d, default_max_tokens: 256, unpriced: deny}
applications:
  support-bot: {org: acme, policies: [monthly-fifty, pennies]}
"""


async def test_prices_and_budgets_round_trip_through_the_catalog(
    cli: Cli, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GATEWAY)
    code, out, err = await cli("apply", "-f", str(path))
    assert code == 0, err

    # The price lives in the model's config jsonb, as numbers.
    stored = await pool.fetchval("SELECT config::text FROM models WHERE name = 'claude-sonnet-4'")
    assert orjson.loads(stored) == {
        "price": {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 3.75}
    }
    assert await pool.fetchval("SELECT config::text FROM models WHERE name = 'gpt-4o-mini'") == "{}"
    budget = await pool.fetchval("SELECT config::text FROM policies WHERE name = 'pennies'")
    assert orjson.loads(budget) == {
        "usd": 0.000123,
        "window": "30d",
        "scope": "app",
        "default_max_tokens": 256,
        "unpriced": "deny",
    }

    # Loaded back, the catalog is the file: same fingerprint, exact decimals.
    file_config = load_config(path)
    loaded = await load_catalog(pool)
    assert loaded is not None and loaded.fingerprint == file_config.fingerprint
    assert loaded.models["cheap"].price == Price(Decimal("0.000015"), Decimal("0.00006"))
    assert loaded.policies["pennies"].params == file_config.policies["pennies"].params
    routes = Catalog.build(loaded, {})
    sonnet = routes.resolve("claude-sonnet-4")
    assert sonnet is not None and sonnet.price_code == "3,15,0.3,3.75"

    # Applying it again writes nothing; a new price is an update of that model only.
    code, out, _ = await cli("apply", "-f", str(path))
    assert (code, out.strip()) == (0, "no changes")
    path.write_text(GATEWAY.replace("output: 10}", "output: 12}"))
    code, out, err = await cli("apply", "-f", str(path))
    assert code == 0, err
    assert "~ model gpt-4o" in out and "0 to create, 1 to update, 0 to delete" in out
    reloaded = await load_catalog(pool)
    assert reloaded is not None
    assert reloaded.models["gpt-4o"].price == Price(Decimal("2.5"), Decimal("12"), Decimal("1.25"))
