"""Config problems: one ``ConfigIssue`` per problem, all of them raised together.

A gateway.yaml is accepted whole or rejected whole; the operator gets every problem at
once, each as ``FILE:LINE:COL: field.path: message`` (lines and columns 1-based), so an
editor or CI log can jump straight to it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int  # 1-based; 0 when the problem has no position (e.g. the file is unreadable)
    column: int  # 1-based
    path: str  # "policies.sixty-per-minute.window"; "" for the document itself
    message: str
    # The path as keys and list indexes, ("policies", "p", "window"): what the admin API
    # names a field by (not compared: ``path`` says the same).
    loc: tuple[str | int, ...] = field(default=(), compare=False)
    # A 1-based (line, column) inside the field's text (a CEL expression), when known.
    text_position: tuple[int, int] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config was rejected; ``issues`` lists every problem, sorted by position."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(
            sorted(issues, key=lambda issue: (issue.line, issue.column))
        )
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def path_text(loc: Iterable[str | int]) -> str:
    """``policies.p.models[1]`` for ("policies", "p", "models", 1)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text = f"{text}.{part}" if text else part
    return text


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
