"""The one way every ``lm-eval-steer`` subcommand reports an error it can name.

``lm-eval-steer <command>: error: <one line>`` on stderr and exit status 2, so scripts and CI logs
can rely on one format: the line names the file, entry or option at fault and the problem, and is
at most :data:`~lm_eval_steer.core.errors.MAX_LINE` characters long.
"""

from __future__ import annotations

import sys

from lm_eval_steer.core.errors import one_line

EXIT_USAGE = 2


def fail(command: str, problem: BaseException | str) -> int:
    """Prints ``problem`` as one error line for ``command`` and returns the exit status 2."""
    # str(KeyError("x")) is "'x'": print the message, not its repr.
    text = problem.args[0] if isinstance(problem, KeyError) and problem.args else str(problem)
    program = f"lm-eval-steer {command}" if command else "lm-eval-steer"
    print(one_line(f"{program}: error: {text}"), file=sys.stderr)
    return EXIT_USAGE
