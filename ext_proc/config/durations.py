"""Durations in gateway.yaml: ``"500ms"``, ``"60s"``, ``"5m"``, ``"1h"``, ``"1d"``,
combinations such as ``"1m30s"``, or a bare number of seconds."""

from __future__ import annotations

import math
import re

_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
VALID_UNITS_HELP = "use a number with a unit: ms, s, m, h or d (e.g. 500ms, 60s, 5m, 1h, 1d)"


class DurationError(ValueError):
    """The value is not a duration we accept; the message says what is."""


def parse_duration(value: str | int | float, *, allow_zero: bool = False) -> float:
    """Seconds for a duration written as text with units, or a bare number of seconds."""
    if isinstance(value, bool):  # bool is an int; `window: yes` is a mistake, not 1 second
        raise DurationError(f"{value!r} is not a duration; {VALID_UNITS_HELP}")
    seconds = float(value) if isinstance(value, int | float) else _parse_text(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise DurationError(f"{value!r} is not a finite duration; {VALID_UNITS_HELP}")
    if seconds < 0:
        raise DurationError(f"{value!r} is negative; durations must be positive")
    if seconds == 0 and not allow_zero:
        raise DurationError(f"{value!r} is zero; this duration must be greater than zero")
    return seconds


def _parse_text(text: str) -> float:
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return float(stripped)
    position, total = 0, 0.0
    for part in _PART.finditer(stripped):
        if part.start() != position:
            break
        total += float(part.group(1)) * _UNITS[part.group(2)]
        position = part.end()
    if stripped and position == len(stripped):
        return total
    if stripped.startswith("-"):
        raise DurationError(f"{text!r} is negative; durations must be positive")
    raise DurationError(f"invalid duration {text!r}; {VALID_UNITS_HELP}")
