"""The one way every ``lm-eval-steer`` subcommand reports an error it can name.

``lm-eval-steer <command>: error: <one line>`` on stderr and exit status 2, so scripts and CI logs
can rely on one format: the line names the file, entry or option at fault and the problem.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


def fail(command: str, problem: BaseException | str) -> int:
    """Prints ``problem`` as one error line for ``command`` and returns the exit status 2."""
    # str(KeyError("x")) is "'x'": print the message, not its repr.
    text = problem.args[0] if isinstance(problem, KeyError) and problem.args else str(problem)
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    print(f"lm-eval-steer {command}: error: {line}", file=sys.stderr)
    return EXIT_USAGE
