"""The build methods, one module (or package) each, and the choice between them.

- ``diffmean``: the paper's difference-of-means direction (:mod:`~vector_builder.methods.diffmean`), in
  the instruction's mode (``project`` for format, ``add`` for length and keywords);
- ``learned``: a vector trained on target responses (:mod:`~vector_builder.methods.learned`), always ``add``;
- ``token`` (keyword instructions only): the word's output-embedding row
  (:mod:`~vector_builder.methods.token`), ``add``; no training, so affordable for many words;
- ``both``: every instruction is searched with ``diffmean`` and ``learned`` on the same validation
  prompts, and the vector file keeps, per instruction, the method whose chosen candidate validated best.

The choice between methods uses the search's own rule: the higher validation score, then fewer
degenerate outputs; an exact tie keeps ``diffmean`` (the paper's recipe). A method that chose "no
steering" does not compete.

Every method produces a :class:`~vector_builder.direction.Direction` per direction spec; a method's
twin of a target is named ``<target>@<method>`` (:data:`SUFFIXES`). A new method is a module here, a
name in :data:`METHODS` (and :data:`SUFFIXES`), and a stage in :mod:`vector_builder.pipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from vector_builder.prompts import Target
from vector_builder.search import TargetResult

METHODS = ("diffmean", "learned", "token", "both")
#: The suffix of a method's twin targets and directions (difference of means keeps the plain names).
SUFFIXES = {"learned": "@learned", "token": "@token"}


def methods_of(method: str) -> tuple[str, ...]:
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return ("diffmean", "learned") if method == "both" else (method,)


def twin_key(key: str, method: str) -> str:
    """The name of ``method``'s twin of a target or direction ``key`` (``key`` itself for diffmean)."""
    return key + SUFFIXES.get(method, "")


def targets_for(target: Target, method: str) -> Target:
    """The ``method`` twin of ``target``: its own name and direction (suffixed), ``add`` mode, same
    checker and sign; ``target`` itself for difference of means."""
    if method not in SUFFIXES:
        return target
    return replace(target, name=twin_key(target.name, method), direction=twin_key(target.direction, method), mode="add")


def base_name(name: str) -> str:
    """The searched target a twin's name belongs to (its validation prompts are that target's)."""
    for suffix in SUFFIXES.values():
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def pick(results: Mapping[str, TargetResult], objective: str = "follows") -> str | None:
    """The winning method among ``{method: result}`` by their chosen candidates' ``objective``
    (:meth:`~vector_builder.search.CandidateResult.objective`; None: every method chose no steering)."""
    best: tuple[float, int, int] | None = None
    winner = None
    for order, (method, result) in enumerate(sorted(results.items(), key=lambda item: item[0] != "diffmean")):
        if result.chosen is None:
            continue
        chosen = result.candidate(result.chosen)
        key = (chosen.objective(objective), -chosen.n_degenerate, -order)
        if best is None or key > best:
            best, winner = key, method
    return winner
