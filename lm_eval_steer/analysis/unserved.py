"""Instructions that share a steered prompt without an entry of their own.

A vector for one instruction acts on the whole answer, so it can cost the other instructions of the
same prompt. This module measures that cost from logged samples. Every document of a steered run is
routed again from the run's own record (``config.steering``: its route and each entry's
``applies_to``, as :mod:`lm_eval_steer.runtime.routing` routed it). A document is *steered* when an
entry applies to it. Each of its instructions is *served* when an entry for that instruction (and its
kwargs filter) applies, and *unserved* otherwise.

For the unserved instructions of steered documents, :func:`compare_unserved` counts how many the run
follows and how many the baseline follows on the same documents. The documents are paired by lm-eval's
``doc_hash``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval_steer.runtime.routing import instruction_kwargs, routes_to, serves_instruction
from lm_eval_steer.runtime.vectorfile import AppliesTo, VectorFileError, parse_applies_to


@dataclass(frozen=True)
class RecordedRouting:
    """What a run recorded about its routing: the route and each entry's ``applies_to`` (None: the
    entry serves every document under ``route=auto``)."""

    route: str
    applies: tuple[AppliesTo | None, ...]

    @classmethod
    def of(cls, steering: Mapping[str, Any] | None) -> RecordedRouting | None:
        """The routing in a results file's ``config.steering``; None for a run without steering or one
        whose record cannot be read (never a guess)."""
        if not isinstance(steering, Mapping) or not isinstance(steering.get("route"), str):
            return None
        applies: list[AppliesTo | None] = []
        for vector_file in steering.get("vector_files") or []:
            for entry in (vector_file.get("entries") if isinstance(vector_file, Mapping) else None) or []:
                if not isinstance(entry, Mapping):
                    return None
                try:
                    applies.append(parse_applies_to(entry.get("applies_to"), "config.steering", str(entry.get("name"))))
                except VectorFileError:
                    return None
        return cls(steering["route"], tuple(applies))


def served_instructions(doc: Mapping[str, Any], routing: RecordedRouting) -> list[bool] | None:
    """Per instruction of ``doc`` (in ``instruction_id_list`` order): whether an applied entry is for
    it; None when no entry applies to the document (it was not steered)."""
    applied = [applies for applies in routing.applies if routes_to(applies, doc, routing.route)]
    if not applied:
        return None
    return [
        any(applies is not None and serves_instruction(applies, instruction_id, kwargs) for applies in applied)
        for instruction_id, kwargs in instruction_kwargs(doc)
    ]


def unserved_outcomes(samples: Iterable[Mapping[str, Any]], routing: RecordedRouting, metric: str) -> dict[str, list[tuple[int, bool]]]:
    """``{doc_hash: [(instruction index, followed), ...]}`` for the unserved instructions of every
    steered document; ``metric`` is an instruction-level metric (``inst_level_loose_acc``, optionally
    ``,filter``), whose per-instruction booleans are read."""
    name, _, filter_name = metric.partition(",")
    found: dict[str, list[tuple[int, bool]]] = {}
    for sample in samples:
        doc, outcomes, key = sample.get("doc") or {}, sample.get(name), sample.get("doc_hash")
        if sample.get("filter", "none") != (filter_name or "none") or not isinstance(key, str) or not isinstance(outcomes, list):
            continue
        served = served_instructions(doc, routing)
        if served is None or len(served) != len(outcomes):
            continue
        unserved = [(index, bool(outcomes[index])) for index, is_served in enumerate(served) if not is_served]
        if unserved:
            found[key] = unserved
    return found


def outcomes_by_document(samples: Iterable[Mapping[str, Any]], metric: str) -> dict[str, list[bool]]:
    """``{doc_hash: per-instruction outcomes}`` of a run (the baseline's side of the pairing)."""
    name, _, filter_name = metric.partition(",")
    return {
        sample["doc_hash"]: [bool(value) for value in sample[name]]
        for sample in samples
        if sample.get("filter", "none") == (filter_name or "none") and isinstance(sample.get("doc_hash"), str) and isinstance(sample.get(name), list)
    }


@dataclass(frozen=True)
class UnservedTally:
    """Unserved instructions in a run's steered documents that the baseline also answered: how many,
    and how many the run follows where the baseline does not (``gained``) and the reverse (``lost``)."""

    documents: int
    instructions: int
    followed: int  # by the run
    gained: int
    lost: int

    @property
    def accuracy(self) -> float:
        return self.followed / self.instructions

    @property
    def baseline_accuracy(self) -> float:
        return (self.followed - self.gained + self.lost) / self.instructions

    @property
    def delta(self) -> float:
        return (self.gained - self.lost) / self.instructions

    @property
    def delta_stderr(self) -> float | None:
        """Standard error of the paired difference ``d_i ∈ {−1, 0, 1}`` (run minus baseline per
        instruction, treated as independent): ``sqrt((Σd² − n·d̄²) / (n (n − 1)))``; None for n < 2."""
        n = self.instructions
        if n < 2:
            return None
        return math.sqrt(max(self.gained + self.lost - n * self.delta**2, 0.0) / (n * (n - 1)))


def compare_unserved(run_outcomes: Mapping[str, Sequence[tuple[int, bool]]], baseline: Mapping[str, Sequence[bool]]) -> UnservedTally | None:
    """Pairs each document's unserved outcomes with the baseline's outcomes for the same instructions;
    documents the baseline did not answer are left out. None when nothing could be paired."""
    documents = instructions = followed = gained = lost = 0
    for key, unserved in run_outcomes.items():
        reference = baseline.get(key)
        if reference is None or any(index >= len(reference) for index, _ in unserved):
            continue
        documents += 1
        instructions += len(unserved)
        followed += sum(hit for _, hit in unserved)
        gained += sum(hit and not reference[index] for index, hit in unserved)
        lost += sum(reference[index] and not hit for index, hit in unserved)
    return UnservedTally(documents, instructions, followed, gained, lost) if instructions else None
