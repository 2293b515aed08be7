"""Instructions that share a steered prompt without an entry of their own
(:mod:`lm_eval_steer.analysis.unserved` and its section in ``lm-eval-steer compare``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from results_fixtures import ifeval_sample, ifeval_scores, table_rows, write_run

from lm_eval_steer.analysis.unserved import RecordedRouting, UnservedTally, compare_unserved, outcomes_by_document, served_instructions, unserved_outcomes
from lm_eval_steer.cli import main

LOWER, COMMA, WORD = "change_case:english_lowercase", "punctuation:no_comma", "keywords:existence"


def steering(*applies: dict[str, Any] | None, route: str = "auto") -> dict[str, Any]:
    """``config["steering"]`` with one entry per ``applies_to`` (None: an entry without one)."""
    entries = [{"name": f"e{i}", "layer": 3, "mode": "add", "strength": 2.0, "positions": "all", **({} if a is None else {"applies_to": a})} for i, a in enumerate(applies)]
    return {"route": route, "overrides": {}, "vector_files": [{"path": "v.safetensors", "sha256": "0" * 64, "entries": entries}]}


def doc(*instructions: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"instruction_id_list": [i for i, _ in instructions], "kwargs": [k for _, k in instructions]}


def test_the_recorded_routing_is_read_or_refused_never_guessed() -> None:
    routing = RecordedRouting.of(steering({"instruction_id": LOWER}, {"instruction_id": WORD, "kwargs": {"keywords": ["cat"]}}))
    assert routing is not None and routing.route == "auto"
    assert [(a.instruction_id, dict(a.kwargs)) for a in routing.applies] == [(LOWER, {}), (WORD, {"keywords": ["cat"]})]
    assert RecordedRouting.of(None) is None
    assert RecordedRouting.of({"vector_files": []}) is None  # no route recorded
    assert RecordedRouting.of(steering(["not", "a", "mapping"])) is None  # an applies_to this version does not write


def test_served_and_unserved_instructions_follow_the_runtime_routing() -> None:
    routing = RecordedRouting.of(steering({"instruction_id": LOWER}, {"instruction_id": WORD, "kwargs": {"keywords": ["cat"]}}))
    assert served_instructions(doc((LOWER, {}), (COMMA, {})), routing) == [True, False]
    # the keyword entry serves only the document whose word it was built for
    assert served_instructions(doc((COMMA, {}), (WORD, {"keywords": ["Cat"]})), routing) == [False, True]
    assert served_instructions(doc((COMMA, {}), (WORD, {"keywords": ["dog"]})), routing) is None  # nothing applies: not steered
    # route=all steers every document; an entry without applies_to serves every document under auto
    assert served_instructions(doc((COMMA, {})), RecordedRouting.of(steering({"instruction_id": LOWER}, route="all"))) == [False]
    assert served_instructions(doc((COMMA, {})), RecordedRouting.of(steering(None))) == [False]
    assert served_instructions(doc((LOWER, {})), RecordedRouting.of(steering({"instruction_id": LOWER}, route="none"))) is None


def test_an_entry_kept_off_a_document_by_not_with_serves_none_of_its_instructions() -> None:
    routing = RecordedRouting.of(steering({"instruction_id": WORD, "not_with": [COMMA]}, {"instruction_id": LOWER}))
    assert routing is not None and routing.applies[0].not_with == (COMMA,)
    assert served_instructions(doc((WORD, {}), (LOWER, {})), routing) == [True, True]
    # the word entry stays off: only the lowercase entry steers, and the word instruction is unserved
    assert served_instructions(doc((WORD, {}), (COMMA, {}), (LOWER, {})), routing) == [False, False, True]
    assert served_instructions(doc((WORD, {}), (COMMA, {})), routing) is None  # nothing applies: not steered
    # route=all applies every entry to every document, so not_with does not keep it off there
    everywhere = RecordedRouting.of(steering({"instruction_id": WORD, "not_with": [COMMA]}, route="all"))
    assert served_instructions(doc((WORD, {}), (COMMA, {})), everywhere) == [True, False]


def sample(doc_id: int, outcomes: dict[str, bool]) -> dict[str, Any]:
    return ifeval_sample(doc_id, outcomes)


def test_unserved_outcomes_are_paired_with_the_baseline_on_the_same_documents() -> None:
    routing = RecordedRouting.of(steering({"instruction_id": LOWER}))
    steered = [
        sample(0, {LOWER: True, COMMA: False}),  # unserved comma lost
        sample(1, {LOWER: False, COMMA: True}),  # unserved comma gained
        sample(2, {COMMA: True}),  # not steered: left out
        sample(3, {LOWER: True, COMMA: True}),  # the baseline lacks this document: left out
        {**sample(0, {LOWER: True, COMMA: True}), "filter": "other"},  # another filter's line
    ]
    baseline = [sample(0, {LOWER: False, COMMA: True}), sample(1, {LOWER: False, COMMA: False}), sample(2, {COMMA: False})]
    found = unserved_outcomes(steered, routing, "inst_level_loose_acc")
    assert sorted(len(v) for v in found.values()) == [1, 1, 1]
    tally = compare_unserved(found, outcomes_by_document(baseline, "inst_level_loose_acc"))
    assert tally == UnservedTally(documents=2, instructions=2, followed=1, gained=1, lost=1)
    assert tally.accuracy == tally.baseline_accuracy == 0.5 and tally.delta == 0.0
    assert tally.delta_stderr == pytest.approx(math.sqrt(2 / 2))  # d = (+1, -1): sample sd sqrt(2), over sqrt(2)
    assert compare_unserved(found, {}) is None  # nothing paired: no number


def test_delta_stderr_formula_and_small_samples() -> None:
    tally = UnservedTally(documents=10, instructions=10, followed=6, gained=3, lost=1)
    n, mean = 10, 0.2
    assert tally.delta == pytest.approx(mean)
    assert tally.delta_stderr == pytest.approx(math.sqrt((4 - n * mean**2) / (n * (n - 1))))
    assert UnservedTally(documents=1, instructions=1, followed=1, gained=1, lost=0).delta_stderr is None


def test_compare_shows_the_unserved_section_for_steered_runs(tmp_path: Path, capsys) -> None:
    base = write_run(
        tmp_path / "base",
        {"ifeval_composition": ifeval_scores(0.0, 0.5, 0.0, 0.5)},
        samples={"ifeval_composition": [sample(0, {LOWER: False, COMMA: True}), sample(1, {LOWER: False, COMMA: False}), sample(2, {COMMA: True})]},
    )
    steered = write_run(
        tmp_path / "steered",
        {"ifeval_composition": ifeval_scores(0.0, 0.5, 0.0, 0.5)},
        model_type="steered-hf",
        steering=steering({"instruction_id": LOWER}),
        samples={"ifeval_composition": [sample(0, {LOWER: True, COMMA: False}), sample(1, {LOWER: True, COMMA: False}), sample(2, {COMMA: True})]},
    )
    out = tmp_path / "board"
    assert main(["compare", str(base), str(steered), "--metrics", "prompt_level_loose_acc", "--no-degeneracy", "--out", str(out)]) == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    section = markdown.split("## Instructions without an entry, in steered prompts\n", 1)[1]
    rows = table_rows(section)
    assert rows[0] == ["task", "metric", "run", "steered documents", "unserved instructions", "baseline", "run", "gained / lost"]
    assert rows[1][0:6] == ["ifeval_composition", "inst loose", rows[1][2], "2", "2", "0.500"]
    assert rows[1][6].startswith("0.000 (Δ -0.500 ± ") and rows[1][7] == "+0 / −1"


def test_runs_without_readable_steering_add_no_section(tmp_path: Path) -> None:
    samples = {"ifeval_format": [sample(0, {LOWER: False, COMMA: True})]}
    base = write_run(tmp_path / "base", {"ifeval_format": ifeval_scores(0.0, 0.5, 0.0, 0.5)}, samples=samples)
    other = write_run(tmp_path / "other", {"ifeval_format": ifeval_scores(0.0, 0.5, 0.0, 0.5)}, model_type="steered-hf", steering=steering(["legacy"]), samples=samples)
    out = tmp_path / "board"
    assert main(["compare", str(base), str(other), "--no-degeneracy", "--out", str(out)]) == 0
    assert "Instructions without an entry" not in (out / "leaderboard.md").read_text(encoding="utf-8")
