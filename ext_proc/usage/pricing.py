"""Model prices and the cost of one request, in exact decimal dollars.

A ``Price`` is USD per million tokens: ``input``, ``output``, and optionally
``cached_input`` (prompt tokens read from the provider's cache) and ``cache_write``
(Anthropic's cache-creation tokens); either missing is priced as ``input``.

Where a price comes from, decided once per config load (``Catalog.build``), never per
request: the model's ``price:`` in gateway.yaml, else the public table of the pinned
``genai-prices`` package (pydantic's, pure data shipped in the wheel: nothing is
downloaded at run time; refreshing it means bumping the pinned version), looked up by
the model actually served (``deployment``) and then by the app-facing name, for the
provider type's price list (openai and azure_openai: OpenAI's; anthropic: Anthropic's).
Unknown model: no price, and the usage row's ``cost_usd`` is NULL.

The price travels with the request in Envoy metadata as a short string
(``Price.encode`` / ``Price.decode``), so whoever finishes the request prices it with
the price in force when it started.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

log = logging.getLogger(__name__)

# Costs are kept to 10 decimal places (1e-10 USD): the scale of usage_records.cost_usd
# (numeric(20,10)), so the value computed here is exactly the one stored, spooled, summed
# by the rollups and charged to budgets. Prices have at most 6 decimal places per million
# tokens (the loader's rule; the table's are coarser), so an exact per-request cost has at
# most 12: quantizing drops at most 5e-11 USD per request, and half-even rounding keeps
# sums over many requests unbiased.
COST_SCALE = Decimal("1e-10")
# For quantizing: room for any cost up to the column's 10 integer digits and 10 places.
_CONTEXT = Context(prec=50)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens; ``source`` says where it came from (not part of equality)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # None: cached prompt tokens cost ``input``
    cache_write: Decimal | None = None  # None: cache-creation tokens cost ``input``
    source: str = field(default="config", compare=False)

    def cost_usd(
        self,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        cache_creation_tokens: int | None = None,
    ) -> Decimal:
        return cost_usd(
            self, prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens
        )

    def encode(self) -> str:
        """``input,output[,cached_input[,cache_write]]`` with empty fields for None, e.g.
        ``2.5,10,1.25`` (the metadata form: short, and exact)."""
        parts = [decimal_text(self.input), decimal_text(self.output)]
        if self.cached_input is not None or self.cache_write is not None:
            parts.append("" if self.cached_input is None else decimal_text(self.cached_input))
        if self.cache_write is not None:
            parts.append(decimal_text(self.cache_write))
        return ",".join(parts)

    @classmethod
    def decode(cls, text: str) -> Price | None:
        """The price ``encode`` wrote, or None for anything else (junk, negative, NaN)."""
        return _decode(text) if isinstance(text, str) else None


@functools.lru_cache(maxsize=256)  # a handful of distinct prices per config: decoded once
def _decode(text: str) -> Price | None:
    parts = text.split(",")
    if not 2 <= len(parts) <= 4 or len(text) > 200:
        return None
    values: list[Decimal | None] = []
    for index, part in enumerate(parts):
        if part == "" and index >= 2:
            values.append(None)
            continue
        try:
            value = Decimal(part)
        except InvalidOperation:
            return None
        if not value.is_finite() or value < 0:
            return None
        values.append(value)
    input_price, output_price = values[0], values[1]
    if input_price is None or output_price is None:
        return None
    values += [None] * (4 - len(values))
    return Price(input_price, output_price, values[2], values[3], source="metadata")


def cost_usd(
    price: Price,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cached_tokens: int | None = None,
    cache_creation_tokens: int | None = None,
) -> Decimal:
    """The cost of one request in USD, exact, quantized to ``COST_SCALE``.

    Token semantics are ``ext_proc.tokens.types.Usage``'s: ``prompt_tokens`` includes the
    cached and cache-creation tokens, and reasoning tokens are part of
    ``completion_tokens`` (priced as output). None counts as 0; cached plus cache-creation
    tokens beyond the prompt (a provider's inconsistent report) are priced as reported and
    leave no negative uncached part.
    """
    prompt = max(0, prompt_tokens or 0)
    completion = max(0, completion_tokens or 0)
    cached = max(0, cached_tokens or 0)
    creation = max(0, cache_creation_tokens or 0)
    uncached = max(0, prompt - cached - creation)
    cached_price = price.input if price.cached_input is None else price.cached_input
    write_price = price.input if price.cache_write is None else price.cache_write
    # Exact in the default 28-digit context: a token count (at most 10 digits) times a
    # price (at most 11 significant digits from the file, fewer in the table) and their
    # sum stay well below 28 digits; /1e6 is a shift (scaleb), never a rounding. Operators
    # rather than Context methods: 2.4 us per row instead of 7.5.
    total = (
        price.input * uncached
        + cached_price * cached
        + write_price * creation
        + price.output * completion
    )
    return total.scaleb(-6).quantize(COST_SCALE, rounding=ROUND_HALF_EVEN, context=_CONTEXT)


def decimal_text(value: Decimal) -> str:
    """Plain notation without trailing zeros: ``2.5``, ``10``, ``0.075`` (never ``1E+1``)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def json_number(value: Decimal) -> int | float:
    """A JSON/YAML number that reads back as ``value``: an int when whole, else the float
    whose shortest repr is the decimal (exact for up to 15 significant digits, which the
    loader's limits on prices and budgets guarantee)."""
    if value == value.to_integral_value():
        return int(value)
    return float(value)


# --------------------------------------------------------------------- the table


def table_source() -> str:
    """What the table is, for ``Price.source`` and the README: ``genai-prices 0.2.5``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"genai-prices {version('genai-prices')}"
    except PackageNotFoundError:
        return "genai-prices (not installed)"


def table_price(table_provider: str | None, *names: str) -> Price | None:
    """The public table's price for the first of ``names`` it knows (pass the served name
    first, then the app-facing one), in the price list of ``provider_type``; None when
    the type has no list there or no name matches.

    Called once per config load per model (and cached): never on the request path.
    """
    if table_provider is None:
        return None
    for name in names:
        if name:
            found = _lookup(table_provider, name)
            if found is not None:
                return found
    return None


@functools.lru_cache(maxsize=4096)  # bounded by the catalog's models; prices change with
# the package version only, so nothing invalidates it within a process
def _lookup(table_provider: str, name: str) -> Price | None:
    snapshot = _snapshot()
    if snapshot is None:
        return None
    try:
        provider, model = snapshot.find_provider_model(name, None, table_provider, None)
    except LookupError:
        return None
    prices = model.get_prices(datetime.now(UTC))
    input_price = _base(getattr(prices, "input_mtok", None))
    if input_price is None:
        return None  # priced per request, image, second...: not by tokens
    output_price = _base(getattr(prices, "output_mtok", None)) or Decimal(0)
    return Price(
        input=input_price,
        output=output_price,
        cached_input=_base(getattr(prices, "cache_read_mtok", None)),
        cache_write=_base(getattr(prices, "cache_write_mtok", None)),
        source=f"{table_source()} ({provider.id}/{model.id})",
    )


def _base(value: Any) -> Decimal | None:
    """A flat price, or the base tier of a tiered one (e.g. prompts over 200k tokens cost
    more on some models; the gateway prices every request at the base tier)."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    return base if isinstance(base, Decimal) else Decimal(str(base))


@functools.cache
def _snapshot() -> Any:
    """genai-prices' bundled data (the wheel's own snapshot; its auto-update, which would
    download, is never started). None, logged once, if the package is missing."""
    try:
        from genai_prices import data_snapshot
    except ImportError as exc:  # an install without the dependency: prices from the file only
        log.warning("the price table (genai-prices) cannot be loaded: %s", exc)
        return None
    return data_snapshot.get_snapshot()
