"""The project's own error type for inputs a user can fix, and short renderings of bad values.

Every error that names a bad input (a vector file, a model argument, a results file, a build
option or checkpoint) derives from :class:`UserError`. Python callers catch it like any exception;
the command lines print its message as one line and exit 2 (:mod:`lm_eval_steer.core.console`), and the
start-up hook does the same for plain ``lm_eval`` (:mod:`lm_eval_steer._autoload`). Anything else
is an internal error and keeps its traceback. This module imports nothing, so every layer can use it.
"""

from __future__ import annotations

from typing import Any

#: The longest error line a command prints: enough to name a file, an entry and the problem.
MAX_LINE = 300
#: The longest rendering of a bad value inside a message (a 95 MB string must not be echoed).
MAX_VALUE = 60


class UserError(Exception):
    """An input the user can fix; the message names the file or argument and the problem."""


def brief(value: Any, limit: int = MAX_VALUE) -> str:
    """``repr(value)``, cut to ``limit`` characters (``…`` marks the cut); never builds a huge repr."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[: limit + 1]
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    elif isinstance(value, (list, tuple, dict)) and len(value) > limit:
        return f"<a {type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` with its lines joined by ``; `` and cut to ``limit`` characters."""
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"
