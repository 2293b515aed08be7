"""IFEval subsets for the steering paper: which prompts, where the data lives, how to score them.

Shared by the task module the harness loads (``tasks/ifeval_task.py``) and the vector builder, so it
lives in the package and imports from a plain checkout. Every document has the IFEval
fields ``key``, ``prompt``, ``instruction_id_list`` and ``kwargs`` (a list of dicts aligned with
``instruction_id_list``; ``steered-hf`` routes vectors by them); the no-instruction variants add
``prompt_without_instruction``, the text the model is shown. Scoring always uses the original
instruction ids and kwargs through the harness's own IFEval scorer.

Data: the IFEval prompts, the paper's files and NLTK's ``punkt_tab`` packaged with lm-eval-steer
(or ``$LM_EVAL_STEER_DATA``, see :mod:`lm_eval_steer.core.paths`); nothing is read from the network.

Nothing from ``lm_eval.tasks.ifeval`` is imported at module level: importing it makes the harness
try to download NLTK data, so it happens only after :func:`prepare_scorer` has checked for it.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lm_eval_steer.core.errors import UserError
from lm_eval_steer.core.paths import DataMissingError, data_dir, data_file

IFEVAL_FILE = "ifeval/input_data.jsonl"
PAPER_REPOSITORY = "https://github.com/microsoft/llm-steer-instruct"
PUNKT_RESOURCE = "tokenizers/punkt_tab"
PER_INSTRUCTION_PREFIX = "inst_level_loose_acc:"

# The paper's 13 format instructions (exactly the single-instruction prompts of its format file).
FORMAT_INSTRUCTIONS = frozenset(
    {
        "change_case:capital_word_frequency",
        "change_case:english_capital",
        "change_case:english_lowercase",
        "detectable_format:constrained_response",
        "detectable_format:json_format",
        "detectable_format:multiple_sections",
        "detectable_format:number_bullet_lists",
        "detectable_format:number_highlighted_sections",
        "detectable_format:title",
        "language:response_language",
        "punctuation:no_comma",
        "startend:end_checker",
        "startend:quotation",
    }
)
LENGTH_INSTRUCTIONS = frozenset(
    {
        "length_constraints:number_paragraphs",
        "length_constraints:number_sentences",
        "length_constraints:number_words",
    }
)
KEYWORD_INSTRUCTIONS = frozenset({"keywords:existence", "keywords:forbidden_words"})

STRIPPED_FILE = "ifeval_wo_instructions.jsonl"

# Prompts where the paper's stripping left the instruction in place (1802, 2857) or kept the
# stripping model's scaffolding (136): without these the no-instruction setting would still show
# the instruction. Each is the original prompt with only the instruction sentences removed.
STRIPPED_FIXES: dict[int, str] = {
    136: "A nucleus is a cluster of protons and neutrons. Elaborate on this. An example:\n"
    "* A nucleus is a cluster of protons and neutrons\n* A proton is ....\n\n"
    "Please follow the format of the example above.",
    1802: "Gandalf was a wizard who fought in the War of the Ring. Is that a good explanation for "
    "a 10 year old? Please think first, then give your answer.",
    2857: "Write a rubric for performance review of a software engineer.",
}


@dataclass(frozen=True)
class Subset:
    """One IFEval subset: which prompts belong to it and where its stripped prompts come from."""

    instructions: frozenset[str]
    min_instructions: int
    max_instructions: int
    # Paper file (under seed/) holding the stripped prompts; for the keyword subsets it holds the
    # documents themselves, since the paper rewrote those prompts to carry a single keyword.
    paper_file: str
    stripped_field: str
    docs_from_paper_file: bool = False
    # A held-out subset: every IFEval prompt that none of these subsets selects, whatever its
    # instructions (``instructions`` and the instruction counts are then ignored).
    outside: tuple[str, ...] = ()

    def selects(self, instruction_ids: list[str]) -> bool:
        """True when a prompt's instructions put it in this subset."""
        if self.outside:
            return not any(SUBSETS[name].selects(instruction_ids) for name in self.outside)
        count_ok = self.min_instructions <= len(instruction_ids) <= self.max_instructions
        return count_ok and set(instruction_ids) <= self.instructions


SUBSETS: dict[str, Subset] = {
    "format": Subset(
        FORMAT_INSTRUCTIONS, 1, 1, "ifeval_single_instr_format.jsonl", "prompt_without_instruction"
    ),
    "length": Subset(LENGTH_INSTRUCTIONS, 1, 1, STRIPPED_FILE, "model_output"),
    "keywords_include": Subset(
        frozenset({"keywords:existence"}),
        1,
        1,
        "ifeval_single_keyword_include.jsonl",
        "prompt_without_instruction",
        docs_from_paper_file=True,
    ),
    "keywords_exclude": Subset(
        frozenset({"keywords:forbidden_words"}),
        1,
        1,
        "ifeval_single_keyword_exclude.jsonl",
        "prompt_without_instruction",
        docs_from_paper_file=True,
    ),
    "composition": Subset(
        FORMAT_INSTRUCTIONS | LENGTH_INSTRUCTIONS | KEYWORD_INSTRUCTIONS, 2, 3, STRIPPED_FILE, "model_output"
    ),
    # The 220 IFEval prompts the subsets above leave out (other instructions, single keyword
    # prompts, mixes): nothing here was used to build, choose or tune a vector, so a file's effect on
    # them, with the instruction, is a held-out check of the claims made on the subsets.
    "heldout": Subset(frozenset(), 1, 3, STRIPPED_FILE, "model_output", outside=("format", "length", "composition")),
}


class InstructionIdError(UserError, ValueError):
    """A command-line instruction id that IFEval's registry does not know."""


class PunktMissingError(UserError, LookupError):
    """NLTK's ``punkt_tab`` (used by the IFEval scorer) cannot be found."""


# ----------------------------------------------------------------------------- data files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def paper_file(name: str) -> Path:
    """Path of one of the paper's files (``seed/<name>``, from its repository, MIT licence)."""
    return data_file(f"seed/{name}")


def ifeval_rows() -> list[dict[str, Any]]:
    """The 541 IFEval prompts (``ifeval/input_data.jsonl``)."""
    return read_jsonl(data_file(IFEVAL_FILE))


# ----------------------------------------------------------------------------- documents


def as_doc(row: dict[str, Any], stripped: str | None) -> dict[str, Any]:
    """A task document in IFEval's shape, plus the stripped prompt for no-instruction tasks."""
    doc = {
        "key": int(row["key"]),
        "prompt": row["prompt"],
        "instruction_id_list": list(row["instruction_id_list"]),
        # Sparse dicts as in IFEval's input_data.jsonl (the hub stores absent kwargs as None);
        # the Dataset then fills absent keys with None again, so both sources end up identical.
        "kwargs": [{k: v for k, v in kwargs.items() if v is not None} for kwargs in row["kwargs"]],
    }
    if stripped is not None:
        doc["prompt_without_instruction"] = stripped
    return doc


def stripped_prompts(subset: Subset) -> dict[int, str]:
    """Paper's instruction-stripped prompt per IFEval key, with :data:`STRIPPED_FIXES` applied."""
    rows = read_jsonl(paper_file(subset.paper_file))
    return {int(row["key"]): row[subset.stripped_field] for row in rows} | STRIPPED_FIXES


def subset_docs(name: str, noinst: bool = False) -> list[dict[str, Any]]:
    """Documents of subset ``name`` (a key of :data:`SUBSETS`), without the instruction if ``noinst``."""
    if name not in SUBSETS:
        raise ValueError(f"unknown IFEval subset {name!r}; known: {', '.join(SUBSETS)}")
    subset = SUBSETS[name]
    if subset.docs_from_paper_file:
        rows = [row for row in read_jsonl(paper_file(subset.paper_file)) if subset.selects(row["instruction_id_list"])]
        return [as_doc(row, row[subset.stripped_field] if noinst else None) for row in rows]
    rows = [row for row in ifeval_rows() if subset.selects(row["instruction_id_list"])]
    if not noinst:
        return [as_doc(row, None) for row in rows]
    stripped = stripped_prompts(subset)
    missing = [row["key"] for row in rows if int(row["key"]) not in stripped]
    if missing:
        raise DataMissingError(f"seed/{subset.paper_file} has no stripped prompt for IFEval keys {missing}")
    return [as_doc(row, stripped[int(row["key"])]) for row in rows]


def load_subset(subset: str, noinst: bool = False, **_: Any) -> dict[str, Any]:
    """``custom_dataset``-style loader: ``{"test": Dataset}`` for the task's ``dataset_kwargs``."""
    import datasets

    return {"test": datasets.Dataset.from_list(subset_docs(subset, noinst))}


# ----------------------------------------------------------------------------- scoring


def prepare_scorer() -> None:
    """Makes the IFEval scorer usable offline and deterministic, or fails saying how to fix it.

    Run before any document is generated for: offline, the harness "downloads" ``punkt_tab``,
    fails silently, and only crashes while scoring, after all the generation time is spent.
    """
    import nltk
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # langdetect samples randomly; unseeded, scores vary run to run
    ours = str(data_dir() / "nltk")
    if ours not in nltk.data.path:
        nltk.data.path.insert(0, ours)  # first: the packaged copy is the one the scores were made with
    try:
        nltk.data.find(PUNKT_RESOURCE)
    except LookupError:
        raise PunktMissingError(
            f"{ours}/{PUNKT_RESOURCE}: NLTK's sentence tables, needed by the IFEval scorer, are missing "
            f"(also searched {len(nltk.data.path) - 1} NLTK folders); reinstall lm-eval-steer, or point LM_EVAL_STEER_DATA at a copy"
        ) from None


def harness_ifeval() -> ModuleType:
    """The harness's ``lm_eval.tasks.ifeval.utils`` (imported after :func:`prepare_scorer`)."""
    prepare_scorer()
    from lm_eval.tasks.ifeval import utils

    return utils


def instruction_registry() -> Mapping[str, Any]:
    """IFEval's instruction id → checker class, imported only after the offline NLTK data is found
    (importing it otherwise "downloads" punkt_tab, fails silently and crashes later while scoring)."""
    prepare_scorer()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def instruction_ids(text: str, option: str, patterns: bool = False) -> tuple[str, ...]:
    """``"ID,ID"`` from a command-line ``option`` → the distinct IFEval instruction ids, in order;
    an :class:`InstructionIdError` naming the option and the first unknown id otherwise. With
    ``patterns``, fnmatch globs (``punctuation:*``, ``*``) are accepted where they match an id."""
    ids = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    known = instruction_registry()
    unknown = [item for item in ids if item not in known and not (patterns and fnmatch.filter(known, item))]
    if unknown:
        raise InstructionIdError(f"{option} {unknown[0]!r}: {'matches no' if patterns else 'not an'} IFEval instruction id")
    return ids


def subset_instruction_ids(name: str) -> frozenset[str]:
    """Instruction ids the documents of subset ``name`` can carry (any IFEval id for a held-out subset)."""
    subset = SUBSETS[name]
    return frozenset(instruction_registry()) if subset.outside else subset.instructions


def per_instruction_metric(instruction_id: str) -> str:
    """Name of the metric holding loose accuracy on one instruction id."""
    return PER_INSTRUCTION_PREFIX + instruction_id


def per_instruction_scores(instruction_ids: list[str], followed: list[bool]) -> dict[str, float]:
    """Loose accuracy per instruction id of one document (mean if an id occurs twice)."""
    by_id: dict[str, list[bool]] = defaultdict(list)
    for instruction_id, ok in zip(instruction_ids, followed, strict=True):
        by_id[instruction_id].append(ok)
    return {per_instruction_metric(key): sum(oks) / len(oks) for key, oks in by_id.items()}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """The harness's IFEval metrics, plus ``inst_level_loose_acc:<id>`` for each of the doc's ids.

    A document reports only its own ids, so each per-id metric averages (with stderr) over the
    documents that carry that instruction.
    """
    scores = harness_ifeval().process_results(doc, results)
    scores.update(per_instruction_scores(doc["instruction_id_list"], scores["inst_level_loose_acc"]))
    return scores


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    """The harness's instruction-level aggregation (fraction of all instructions followed)."""
    return harness_ifeval().agg_inst_level_acc(items)
