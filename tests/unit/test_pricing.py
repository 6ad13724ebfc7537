"""Prices and costs: the arithmetic, the metadata codec, the public table, the
``price:`` field of gateway.yaml (validation, fingerprint, catalog round trip), and the
cost a finished request's usage row gets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ext_proc.config import ConfigError, ConfigIssue, parse_config
from ext_proc.routing.catalog import Catalog
from ext_proc.server.completion import _cost
from ext_proc.server.facts import Facts
from ext_proc.stores.catalog import specs_of
from ext_proc.usage.pricing import Price, cost_usd, table_price
from ext_proc.usage.record import UsageRecord

D = Decimal

GPT_4O = Price(input=D("2.5"), output=D("10"), cached_input=D("1.25"))
SONNET = Price(input=D("3"), output=D("15"), cached_input=D("0.3"), cache_write=D("3.75"))


# --------------------------------------------------------------------- arithmetic


def test_openai_cached_tokens_are_part_of_the_prompt_and_cost_the_cached_price() -> None:
    # 1000 prompt tokens of which 400 cached, 200 completion tokens:
    # 600 x 2.5 + 400 x 1.25 + 200 x 10 = 1500 + 500 + 2000 = 4000 per million = $0.004.
    assert cost_usd(GPT_4O, 1000, 200, 400) == D("0.004")
    assert GPT_4O.cost_usd(1000, 200, 400, None) == D("0.0040000000")


def test_anthropic_cache_read_and_write() -> None:
    # prompt 5000 = 1000 fresh + 3000 read from cache + 1000 written to it; 500 out:
    # 1000 x 3 + 3000 x 0.3 + 1000 x 3.75 + 500 x 15 = 3000 + 900 + 3750 + 7500 = 15150.
    assert cost_usd(SONNET, 5000, 500, 3000, 1000) == D("0.01515")


def test_missing_cached_and_write_prices_are_priced_as_input() -> None:
    flat = Price(input=D("1"), output=D("2"))
    assert cost_usd(flat, 1000, 0, 500, 300) == cost_usd(flat, 1000, 0) == D("0.001")


def test_reasoning_tokens_are_completion_tokens_priced_as_output() -> None:
    # An o-series answer: 100 completion tokens, 80 of them reasoning. The usage row's
    # completion_tokens already holds the 80; nothing is added for them.
    o3 = Price(input=D("2"), output=D("8"), cached_input=D("0.5"))
    assert cost_usd(o3, 50, 100) == D("0.0009")  # 50 x 2 + 100 x 8 = 900


def test_zero_and_missing_tokens_cost_zero() -> None:
    assert cost_usd(GPT_4O, 0, 0) == D(0)
    assert cost_usd(GPT_4O, None, None, None, None) == D(0)
    assert str(cost_usd(GPT_4O, 0, 0)) == "0E-10"  # at the column's scale


def test_inconsistent_cache_report_never_goes_negative() -> None:
    # A provider reporting more cached tokens than prompt tokens: cached priced as
    # reported, no negative uncached part.
    assert cost_usd(GPT_4O, 100, 0, 300) == D("0.000375")


def test_cost_is_quantized_to_ten_places_half_even() -> None:
    tiny = Price(input=D("0.00005"), output=D(0))  # 5e-11 per token
    assert cost_usd(tiny, 1, 0) == D("0E-10")  # 0.5e-10 -> 0 (even)
    assert cost_usd(tiny, 3, 0) == D("2E-10")  # 1.5e-10 -> 2e-10 (even)
    assert cost_usd(tiny, 5, 0) == D("2E-10")  # 2.5e-10 -> 2e-10 (even)
    assert cost_usd(tiny, 7, 0) == D("4E-10")  # 3.5e-10 -> 4e-10
    assert cost_usd(tiny, 3, 0).as_tuple().exponent == -10


def test_cost_is_exact_where_floats_are_not() -> None:
    # 0.1 + 0.2 in binary floating point is 0.30000000000000004.
    price = Price(input=D("0.1"), output=D("0.2"))
    assert cost_usd(price, 1_000_000, 1_000_000) == D("0.3")


# ------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("price", "text"),
    [
        (GPT_4O, "2.5,10,1.25"),
        (SONNET, "3,15,0.3,3.75"),
        (Price(D("0.15"), D("0.6")), "0.15,0.6"),
        (Price(D("1"), D("2"), cache_write=D("1.25")), "1,2,,1.25"),
        (Price(D("10.50"), D("0"), D("0.000001")), "10.5,0,0.000001"),
    ],
)
def test_price_codec_round_trips(price: Price, text: str) -> None:
    assert price.encode() == text
    decoded = Price.decode(text)
    assert decoded == price  # the source is not part of equality
    assert decoded is not None and decoded.source == "metadata"


@pytest.mark.parametrize(
    "junk", ["", "1", "abc", "1,x", "1,2,3,4,5", "-1,2", "1,NaN", "inf,1", "1,,2", ",1"]
)
def test_price_decode_refuses_junk(junk: str) -> None:
    assert Price.decode(junk) is None


def test_price_decode_refuses_non_strings() -> None:
    assert Price.decode(None) is None  # type: ignore[arg-type]
    assert Price.decode(2.5) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------------- table


def test_table_knows_the_served_name_before_the_app_name() -> None:
    dated = table_price("openai", "gpt-4o-mini-2024-07-18", "chat")
    assert dated is not None
    assert (dated.input, dated.output, dated.cached_input) == (D("0.15"), D("0.6"), D("0.075"))
    assert dated.source.startswith("genai-prices ")
    # The served model decides even when the app-facing name is another known model.
    served = table_price("openai", "gpt-4o", "gpt-4o-mini")
    assert served is not None and served.input == D("2.5")
    # A deployment name the table does not know falls back to the app-facing name.
    azure = table_price("azure", "prod-4o", "gpt-4o")  # Azure's list (OpenAI's prices)
    assert azure is not None and (azure.input, azure.output) == (D("2.5"), D("10"))


def test_table_anthropic_has_cache_read_and_write_prices() -> None:
    price = table_price("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4")
    assert price is not None
    assert (price.input, price.output, price.cached_input, price.cache_write) == (
        D("3"),
        D("15"),
        D("0.3"),
        D("3.75"),
    )


def test_table_lookup_is_by_provider_type() -> None:
    assert table_price("anthropic", "gpt-4o") is None  # not an Anthropic model
    assert table_price("openai", "claude-sonnet-4-20250514") is None
    assert table_price("openai", "acme-7b", "my-local-model") is None  # unknown: no cost
    assert table_price(None, "gpt-4o") is None  # a type with no list in the table


def test_embeddings_price_has_no_output_price() -> None:
    price = table_price("openai", "text-embedding-3-small")
    assert price is not None and price.input == D("0.02") and price.output == D(0)


# ------------------------------------------------------------------- gateway.yaml

HEAD = """\
providers:
  openai: {type: openai, base_url: "https://api.openai.com"}
  claude: {type: anthropic, base_url: "https://api.anthropic.com"}
models:
"""


def issues(models: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + models, "gw.yaml")
    return list(info.value.issues)


def where(models: str, needle: str) -> tuple[int, int]:
    text = HEAD + models
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def test_price_in_the_file_wins_over_the_table() -> None:
    config = parse_config(
        HEAD
        + "  gpt-4o: {provider: openai, price: {input: 2, output: 8.5, cached_input: 0.5}}\n"
        + "  gpt-4o-mini: {provider: openai}\n"
        + "  claude-sonnet-4: {provider: claude, deployment: claude-sonnet-4-20250514,\n"
        + "                    price: {input: 3, output: 15, cache_write: 3.75}}\n"
        + "  acme-7b: {provider: openai}\n"
    )
    assert config.models["gpt-4o"].price == Price(D("2"), D("8.5"), D("0.5"))
    catalog = Catalog.build(config, {})
    own = catalog.resolve("gpt-4o")
    assert own is not None and own.price is not None
    assert (own.price.input, own.price.source) == (D("2"), "config")
    assert own.price_code == "2,8.5,0.5"  # encoded once, at build
    table = catalog.resolve("gpt-4o-mini")
    assert table is not None and table.price is not None and table.price.input == D("0.15")
    claude = catalog.resolve("claude-sonnet-4")
    assert claude is not None and claude.price_code == "3,15,,3.75"
    unknown = catalog.resolve("acme-7b")
    assert unknown is not None and unknown.price is None and unknown.price_code == ""


def test_price_errors_name_the_field_and_its_position() -> None:
    models = (
        "  a: {provider: openai, price: {input: 2.5}}\n"
        "  b: {provider: openai, price: {input: -1, output: 10}}\n"
        "  c: {provider: openai, price: {inputs: 1, output: 2}}\n"
        "  d: {provider: openai, price: {input: cheap, output: 2}}\n"
        "  e: {provider: openai, price: {input: 0.0000001, output: 2}}\n"
        "  f: {provider: openai, price: 5}\n"
        "  g: {provider: openai, price: {input: .inf, output: 1, cache_write: '2'}}\n"
    )
    found = {(i.path, i.message): (i.line, i.column) for i in issues(models)}
    assert found == {
        ("models.a.price.output", "missing required field 'output'"): where(models, "price"),
        ("models.b.price.input", "must be at least 0, not -1"): where(models, "-1"),
        ("models.c.price.inputs", "unknown field 'inputs'; did you mean 'input'?"): where(
            models, "inputs"
        ),
        ("models.c.price.input", "missing required field 'input'"): where(models, "price: {inputs"),
        ("models.d.price.input", "expected a number, got a string ('cheap')"): where(
            models, "cheap"
        ),
        ("models.e.price.input", "use at most 6 decimal places, not 0.0000001"): where(
            models, "0.0000001"
        ),
        (
            "models.f.price",
            "expected a mapping of input, output, cached_input, cache_write, got an integer ('5')",
        ): where(models, "5}\n"),
        ("models.g.price.input", "expected a decimal number, got '.inf'"): where(models, ".inf"),
        ("models.g.price.cache_write", "expected a number, got a string ('2')"): where(
            models, "'2'"
        ),
    }
    assert str(issues(models)[0]).startswith(f"gw.yaml:{where(models, 'price')[0]}:")


def test_a_price_leaves_other_models_fingerprint_alone() -> None:
    plain = parse_config(HEAD + "  gpt-4o: {provider: openai}\n")
    assert "price" not in plain.canonical()["models"]["gpt-4o"]  # as before prices existed
    a = parse_config(HEAD + "  gpt-4o: {provider: openai, price: {input: 2.50, output: 10}}\n")
    b = parse_config(HEAD + "  gpt-4o: {provider: openai, price: {output: 1e1, input: 2.5}}\n")
    assert a.fingerprint == b.fingerprint != plain.fingerprint  # same meaning, same print
    assert a.canonical()["models"]["gpt-4o"]["price"] == {
        "input": "2.5",
        "output": "10",
        "cached_input": None,
        "cache_write": None,
    }


def test_price_survives_the_catalogs_json_form() -> None:
    # What `ext-proc apply` stores: specs (JSON in the models' config jsonb) that load back
    # to the same fingerprint; specs_of raises if they would not.
    config = parse_config(
        HEAD + "  gpt-4o: {provider: openai, price: {input: 0.00001, output: 12.345678,"
        " cached_input: 0, cache_write: 100000}}\n"
    )
    specs = specs_of(config)
    assert specs.models["gpt-4o"]["price"] == {
        "input": 0.00001,
        "output": 12.345678,
        "cached_input": 0,
        "cache_write": 100000,
    }
    loaded = specs.parse()
    assert loaded.fingerprint == config.fingerprint
    assert loaded.models["gpt-4o"].price == config.models["gpt-4o"].price


# ---------------------------------------------------------------- the usage row


def _facts(price: str) -> Facts:
    return Facts(
        request_id="r", started=0.0, endpoint="/v1/chat/completions", operation="chat",
        price=price,
    )  # fmt: skip


def test_row_cost_from_the_price_the_request_carried() -> None:
    rec = UsageRecord("r", prompt_tokens=1000, completion_tokens=200, cached_tokens=400)
    assert _cost(_facts(GPT_4O.encode()), rec) == D("0.004")
    assert _cost(_facts(""), rec) is None  # no price: NULL
    assert _cost(_facts("junk"), rec) is None
    zero = UsageRecord("r", prompt_tokens=0, completion_tokens=0, total_tokens=0)
    assert _cost(_facts(GPT_4O.encode()), zero) == D(0)  # a price and no tokens: 0, not NULL


def test_facts_carry_the_price_in_metadata() -> None:
    facts = _facts(SONNET.encode())
    back = Facts.from_json(facts.to_json())
    assert back is not None and back.price == "3,15,0.3,3.75"
    assert back.policy_facts().price == SONNET
    assert '"pr"' not in _facts("").to_json()  # only written when there is one
