"""Build methods and the choice between them.

- ``diffmean``: the paper's difference-of-means direction (:mod:`vector_builder.directions`), in the
  instruction's mode (``project`` for format, ``add`` for length and keywords);
- ``learned``: a vector trained on target responses (:mod:`vector_builder.learned`), always ``add``;
- ``both``: every instruction is searched with each method on the same validation prompts, and the
  vector file keeps, per instruction, the method whose chosen candidate validated best.

The choice between methods uses the search's own rule: the higher validation score, then fewer
degenerate outputs; an exact tie keeps ``diffmean`` (the paper's recipe). A method that chose "no
steering" does not compete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from vector_builder.learned_directions import LEARNED_SUFFIX, learned_key
from vector_builder.prompts import Target
from vector_builder.search import TargetResult

METHODS = ("diffmean", "learned", "both")


def methods_of(method: str) -> tuple[str, ...]:
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return ("diffmean", "learned") if method == "both" else (method,)


def learned_target(target: Target) -> Target:
    """The learned-method twin of ``target``: its own name and direction, ``add`` mode, same checker and sign."""
    return replace(target, name=target.name + LEARNED_SUFFIX, direction=learned_key(target.direction), mode="add")


def targets_for(target: Target, method: str) -> Target:
    return learned_target(target) if method == "learned" else target


def pick(results: Mapping[str, TargetResult]) -> str | None:
    """The winning method among ``{method: result}`` (None: every method chose no steering)."""
    best: tuple[float, int, int] | None = None
    winner = None
    for order, (method, result) in enumerate(sorted(results.items(), key=lambda item: item[0] != "diffmean")):
        if result.chosen is None:
            continue
        chosen = result.candidate(result.chosen)
        key = (chosen.score, -chosen.n_degenerate, -order)
        if best is None or key > best:
            best, winner = key, method
    return winner
