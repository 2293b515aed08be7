"""Numbers and tables as every report prints them: combined standard errors, ``0.412 ± 0.021``,
Markdown tables that also read well in a terminal."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def combined_stderr(a: float | None, b: float | None) -> float | None:
    """Standard error of a difference of two independent estimates: ``sqrt(se_a^2 + se_b^2)``.

    Runs on the same documents are positively correlated, so this overstates the true error of the
    delta: a conservative choice for both the leaderboard and the sigma gate.
    """
    if a is None or b is None:
        return None
    return math.hypot(a, b)


def format_value(value: float | None, stderr: float | None = None, *, signed: bool = False) -> str:
    """``0.412 ± 0.021`` (or ``+0.052 ± 0.030`` with ``signed``); ``—`` for a missing value."""
    if value is None:
        return "—"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return f"{text} ± {stderr:.3f}" if stderr is not None else text


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table, padded so that it also reads well as plain terminal output."""
    rows = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows),
    ]
    return "\n".join(lines)
