"""Routing: which steering entries (with which strengths) each document gets.

``route="auto"``: an entry with ``applies_to`` serves a document whose ``instruction_id_list``
contains its instruction id and whose kwargs for that instruction contain its kwargs filter, unless
another of its instructions matches one of its ``not_with`` patterns; an entry without ``applies_to`` serves every document. ``route="all"``: every entry on every document.
``route="none"``: nothing (a baseline through the same model class).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, VectorFile

ROUTES = ("auto", "all", "none")


@dataclass(frozen=True)
class Overrides:
    """Run-wide overrides from the model args (``None`` = keep each entry's own value)."""

    layer: int | None = None
    scale: float = 1.0
    mode: str | None = None
    positions: str | None = None
    stop_rules: bool = True  # False: every entry steers to the end of the answer (its stop rules dropped)

    def given(self) -> dict[str, Any]:
        """The overrides the user actually set (for the results JSON and cache keys)."""
        defaults = Overrides()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}


def _value_matches(wanted: Any, given: Any) -> bool:
    """Strings compare case-insensitively; a wanted list must be a subset of the given list."""
    if isinstance(wanted, list):
        given_items = given if isinstance(given, list) else [given]
        return {str(w).lower() for w in wanted} <= {str(g).lower() for g in given_items}
    if isinstance(wanted, str) and isinstance(given, str):
        return wanted.lower() == given.lower()
    return wanted == given


def instruction_kwargs(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``[(instruction_id, its kwargs), ...]`` of an IFEval-style document (kwargs may be missing)."""
    ids = doc.get("instruction_id_list") or []
    kwargs = doc.get("kwargs") or []
    return [(instruction_id, (kwargs[i] if i < len(kwargs) and isinstance(kwargs[i], Mapping) else {}) or {}) for i, instruction_id in enumerate(ids)]


def serves_instruction(applies_to: AppliesTo, instruction_id: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether an entry with ``applies_to`` serves one instruction of a document (its id and kwargs)."""
    return instruction_id == applies_to.instruction_id and all(
        key in kwargs and kwargs[key] is not None and _value_matches(value, kwargs[key]) for key, value in applies_to.kwargs.items()
    )


def excluded(applies_to: AppliesTo, doc: Mapping[str, Any] | None) -> bool:
    """Whether the document carries another instruction than the entry's own that one of
    ``applies_to.not_with``'s patterns (fnmatch globs) matches."""
    if not applies_to.not_with:  # most entries: no need to walk the document's instructions
        return False
    others = [instruction_id for instruction_id, _ in instruction_kwargs(doc or {}) if instruction_id != applies_to.instruction_id]
    return any(fnmatch.fnmatchcase(instruction_id, pattern) for instruction_id in others for pattern in applies_to.not_with)


def match_kwargs(applies_to: AppliesTo, doc: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The kwargs of the document's instruction that the entry serves, or ``None`` if none matches
    (:func:`excluded` is checked apart, since ``route="all"`` ignores it)."""
    for instruction_id, kwargs in instruction_kwargs(doc or {}):
        if serves_instruction(applies_to, instruction_id, kwargs):
            return kwargs
    return None


def resolve_strength(entry: SteeringEntry, kwargs: Mapping[str, Any] | None, scale: float) -> float:
    """``scale × (strength_rule(kwargs[rule.kwarg]) if the document gives that kwarg else entry.strength)``."""
    rule = entry.applies_to.strength_rule if entry.applies_to else None
    if rule is not None and kwargs is not None and isinstance(kwargs.get(rule.kwarg), (int, float)):
        return scale * rule.strength_for(float(kwargs[rule.kwarg]))
    return scale * entry.strength


def apply_overrides(entry: SteeringEntry, overrides: Overrides) -> SteeringEntry:
    return dataclasses.replace(
        entry,
        layer=entry.layer if overrides.layer is None else overrides.layer,
        mode=overrides.mode or entry.mode,
        positions=overrides.positions or entry.positions,
        stop_after=entry.stop_after if overrides.stop_rules else (),
        stop_after_tokens=entry.stop_after_tokens if overrides.stop_rules else None,
    )


def routes_to(applies_to: AppliesTo | None, doc: Mapping[str, Any] | None, route: str) -> bool:
    """Whether an entry with ``applies_to`` is applied to ``doc`` under ``route``: never under
    ``"none"``, always under ``"all"``; under ``"auto"`` when it has no ``applies_to``, or the document
    carries its instruction (with matching kwargs) and no other instruction its ``not_with`` names."""
    if route == "none":
        return False
    if route == "all" or applies_to is None:
        return True
    return match_kwargs(applies_to, doc) is not None and not excluded(applies_to, doc)


def entries_for_document(
    doc: Mapping[str, Any] | None,
    files: Sequence[VectorFile],
    route: str,
    overrides: Overrides = Overrides(),
) -> tuple[SteeringEntry, ...]:
    """The entries to apply to one document, with overrides applied and strengths resolved."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    if route == "none":
        return ()
    chosen: list[SteeringEntry] = []
    for vector_file in files:
        for entry in vector_file.entries:
            if not routes_to(entry.applies_to, doc, route):
                continue
            kwargs = match_kwargs(entry.applies_to, doc) if entry.applies_to else None
            resolved = apply_overrides(entry, overrides)
            chosen.append(dataclasses.replace(resolved, strength=resolve_strength(entry, kwargs, overrides.scale)))
    return tuple(chosen)


def route_key(entries: Sequence[SteeringEntry]) -> tuple[tuple[Any, ...], ...]:
    """A hashable summary of a resolved entry list (documents with equal keys are steered alike).

    ``id(entry.vector)`` tells apart same-named entries of different files (resolved entries share
    their file's tensor).
    """
    return tuple((id(entry.vector), entry.name, entry.layer, entry.mode, entry.strength, entry.positions, entry.stop_after, entry.stop_after_tokens, entry.start_after_tokens) for entry in entries)


def vector_digest(vector: torch.Tensor) -> str:
    """sha256 of the vector's float32 values (the form the hooks apply it in)."""
    return hashlib.sha256(vector.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


def route_signature(entries: Sequence[SteeringEntry], skip_first_token: bool) -> tuple[Any, ...]:
    """Everything about a document's resolved entries that decides its answers, with each vector
    identified by its content (:func:`vector_digest`), not by the file or name it came from: two runs
    whose signatures for a document are equal steer it alike. ``()`` for an unsteered document, and
    ``skip_first_token`` counts only when something is steered."""
    if not entries:
        return ()
    applied = tuple(
        (vector_digest(entry.vector), entry.layer, entry.mode, entry.strength, entry.positions, entry.stop_after, entry.stop_after_tokens, entry.start_after_tokens)
        for entry in entries
    )
    return (skip_first_token, applied)
