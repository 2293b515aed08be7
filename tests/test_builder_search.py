"""vector_builder.search without a model: candidates, the strength formula, the guards and the
choice, pooling, strength rules, re-choosing resumed results, stop strings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lm_eval_steer.core import degeneracy
from vector_builder import prompts, search
from vector_builder.activations import RunningSum
from vector_builder.direction import Direction
from vector_builder.methods.diffmean import build_direction


def test_repetition_measure():
    assert degeneracy.repetition([1, 2, 3, 4, 5, 6]) == 0.0
    looping = [1, 2, 3] * 10
    assert degeneracy.repetition(looping) > 0.8
    assert degeneracy.is_degenerate(looping, 0.5)
    assert not degeneracy.is_degenerate([1, 2, 3] * 3, 0.5)  # too short to judge


def _result(scores: dict[str, list[bool]], degenerate: dict[str, int] | None = None) -> search.TargetResult:
    items = []
    for label, follows in scores.items():
        bad = (degenerate or {}).get(label, 0)
        layer = None if label == "none" else int(label[1:].split("x")[0])
        items.append(search.CandidateResult(label, layer, 1.0, None if layer is None else 1.0, follows, [True] * bad + [False] * (len(follows) - bad), [""] * len(follows)))
    return search.TargetResult("t", items)


SETTINGS = search.SearchSettings()
FMT = "detectable_format:title"


def _with_lengths(result: search.TargetResult, lengths: dict[str, list[int]]) -> search.TargetResult:
    for item in result.candidates:
        item.lengths = lengths[item.label]
    return result


def test_ties_go_to_no_steering():
    assert search._choose(_result({"none": [True, False], "L1x1": [True, False], "L3x1": [False, True]}), SETTINGS, FMT) is None
    assert search._choose(_result({"none": [True, False], "L1x1": [False, False]}), SETTINGS, FMT) is None


def test_best_candidate_wins_and_degenerate_ones_are_disqualified():
    result = _result({"none": [False, False], "L1x1": [True, True], "L3x1": [True, False]}, degenerate={"L1x1": 1})
    assert search._choose(result, SETTINGS, FMT) == "L3x1"
    assert result.candidate("L1x1").disqualified
    # as many degenerate outputs as the unsteered model has is tolerated
    result = _result({"none": [False, False], "L1x1": [True, True]}, degenerate={"none": 1, "L1x1": 1})
    assert search._choose(result, SETTINGS, FMT) == "L1x1"


def test_the_guard_judges_each_answer_against_its_own_unsteered_answer():
    # unsteered, answer 0 loops; L1 cures it but loops on answer 1: the pooled counts are equal
    unsteered = search.CandidateResult("none", None, 0.0, None, follows=[False] * 3, degenerate=[True, False, False], responses=[""] * 3)
    swapped = search.CandidateResult("L1x1", 1, 1.0, 1.0, follows=[True] * 3, degenerate=[False, True, False], responses=[""] * 3)
    cured = search.CandidateResult("L2x1", 2, 1.0, 1.0, follows=[True, True, False], degenerate=[False, False, False], responses=[""] * 3)
    result = search.TargetResult("t", [unsteered, swapped, cured])
    assert search._choose(result, SETTINGS, FMT) == "L2x1"
    assert (swapped.new_looping, swapped.cured_looping, swapped.disqualified) == (1, 1, True)
    assert (cured.new_looping, cured.cured_looping, cured.disqualified) == (0, 1, False)
    # the budget is in answers
    assert search._choose(result, replace(SETTINGS, allowed_degenerate=1), FMT) == "L1x1"
    assert search.looping_changes(swapped.degenerate, unsteered.degenerate) == (1, 1)


def test_the_fluent_objective_counts_only_passes_that_do_not_loop():
    # unsteered: one pass, no loop. L1 passes three times, but two of those loop (both looped unsteered
    # already, so the guard lets them through); L2 passes twice without looping.
    unsteered = search.CandidateResult("none", None, 0.0, None, follows=[True, False, False, False], degenerate=[False, True, True, False], responses=[""] * 4)
    looping = search.CandidateResult("L1x1", 1, 1.0, 1.0, follows=[True, True, True, False], degenerate=[False, True, True, False], responses=[""] * 4)
    fluent = search.CandidateResult("L2x1", 2, 1.0, 1.0, follows=[True, False, False, True], degenerate=[False, True, True, False], responses=[""] * 4)
    assert (looping.score, looping.fluent_score, fluent.score, fluent.fluent_score) == (0.75, 0.25, 0.5, 0.5)
    result = search.TargetResult("t", [unsteered, looping, fluent])
    assert search._choose(result, SETTINGS, FMT) == "L1x1"
    assert search._choose(result, replace(SETTINGS, objective="fluent"), FMT) == "L2x1"
    # no candidate beats the unsteered fluent pass rate: no steering
    result = search.TargetResult("t", [unsteered, looping])
    assert search._choose(result, replace(SETTINGS, objective="fluent"), FMT) is None
    with pytest.raises(ValueError, match="--objective must be one of follows, fluent"):
        search.SearchSettings(objective="accuracy")


def test_candidates_that_pass_by_answering_short_are_disqualified_except_for_length_instructions():
    def result() -> search.TargetResult:
        scores = {"none": [False, False], "L1x1": [True, True], "L3x1": [True, False]}
        return _with_lengths(_result(scores), {"none": [100, 60], "L1x1": [30, 10], "L3x1": [40, 40]})

    # L1 says everything in 20 tokens on average against the unsteered 80: below 0.5 x, so out.
    guarded = result()
    assert search._choose(guarded, SETTINGS, "keywords:forbidden_words") == "L3x1"
    assert guarded.candidate("L1x1").disqualified and not guarded.candidate("L3x1").disqualified
    # A length vector shortens answers on purpose; 0 turns the guard off.
    assert search._choose(result(), SETTINGS, "length_constraints:number_words") == "L1x1"
    # "My answer is yes." is the whole answer a constrained-response prompt asks for
    assert search._choose(result(), SETTINGS, "detectable_format:constrained_response") == "L1x1"
    assert search._choose(result(), replace(SETTINGS, min_length_ratio=0.0), "keywords:forbidden_words") == "L1x1"
    # Results read from an old checkpoint have no lengths: the guard cannot judge them and lets them pass.
    assert search._choose(_result({"none": [False, False], "L1x1": [True, True]}), SETTINGS, FMT) == "L1x1"


def test_pooled_length_guard_compares_the_pooled_means():
    short = _with_lengths(_result({"none": [False], "L1x1": [True]}), {"none": [100], "L1x1": [10]})
    long = _with_lengths(_result({"none": [False], "L1x1": [False]}), {"none": [100], "L1x1": [100]})
    pooled = search.pool("keywords:forbidden_words (pooled)", [short, long], SETTINGS, "keywords:forbidden_words")
    assert pooled.candidate("L1x1").lengths == [10, 100]
    assert not pooled.candidate("L1x1").disqualified  # mean 55 >= 0.5 x 100
    assert pooled.chosen == "L1x1"


def test_pooled_choice_sums_outcomes_over_targets():
    # Alone, the first word would pick L3 and the second tie; pooled, L3 wins 3/4 against 1/4 unsteered.
    first = _result({"none": [False, False], "L1x1": [True, False], "L3x1": [True, True]})
    second = _result({"none": [True, False], "L1x1": [False, False], "L3x1": [True, False]})
    pooled = search.pool("keywords:existence (pooled)", [first, second], SETTINGS, "keywords:existence")
    assert pooled.chosen == "L3x1"
    assert pooled.candidate("L3x1").follows == [True, True, True, False]
    assert pooled.candidate("L3x1").strength is None  # each word's strength comes from its own direction
    # pooled, each answer is still judged against its own unsteered answer: one new loop disqualifies L3
    looping = _result({"none": [False, False], "L1x1": [True, True], "L3x1": [True, True]}, degenerate={"L3x1": 1})
    guarded = search.pool("p", [first, looping], SETTINGS, "keywords:existence")
    assert guarded.candidate("L3x1").disqualified and guarded.chosen == "L1x1"
    with pytest.raises(ValueError, match="different candidates"):
        search.pool("p", [first, _result({"none": [False], "L2x1": [True]})], SETTINGS, "keywords:existence")
    with pytest.raises(ValueError, match="nothing to pool"):
        search.pool("p", [], SETTINGS, "keywords:existence")


def test_strength_rule_is_fitted_per_requested_value():
    result = _result({"none": [False, False, False], "L1x1": [True, False, True], "L1x2": [False, True, False]})
    result.candidates[2].strength = 2.0
    result.chosen = search._choose(result, SETTINGS, FMT)
    assert result.chosen == "L1x1"
    val = [prompts.Prompt("q", {"num_sentences": n}, "q") for n in (3, 5, 3)]
    assert search.fit_rule(result, val, "num_sentences") == [[3.0, 1.0], [5.0, 2.0]]


def test_default_layers_follow_the_paper():
    assert search.default_layers(30) == list(range(6, 30, 2))
    assert [c.label for c in search.candidates([4], [1, 1.5])] == ["none", "L4x1", "L4x1.5"]


def test_strength_bases():
    with_states, without_states = (torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in (3, 4))
    direction = build_direction("x", RunningSum((with_states + 1.0).sum(0), 5), RunningSum(without_states.sum(0), 5))
    layer = 1
    b, shift, c = (float(t[layer]) for t in (direction.baseline, direction.shift, direction.strength))
    project = prompts.Target("p", "x", "punctuation:no_comma", "project")
    exclude = prompts.Target("e", "x", "keywords:forbidden_words", "add", sign=-1.0)
    two = search.Candidate(layer, 2.0)
    assert search.strength_of(project, direction, search.Candidate(layer, 1.0), "shift") == pytest.approx(c, rel=1e-5)
    assert search.strength_of(project, direction, two, "shift") == pytest.approx(b + 2 * shift, rel=1e-5)
    assert search.strength_of(exclude, direction, two, "shift") == pytest.approx(-2 * shift, rel=1e-5)
    assert search.strength_of(exclude, direction, two, "paper") == pytest.approx(-2 * c, rel=1e-5)
    with pytest.raises(ValueError, match="strength base"):
        search.strength_of(project, direction, two, "other")


def test_resumed_results_are_chosen_again_under_the_current_guards():
    unsteered = search.CandidateResult("none", None, 0.0, None, follows=[False, False], degenerate=[False, False], responses=[], lengths=[40, 40])
    steered = search.CandidateResult("L1x1", 1, 1.0, 2.0, follows=[True, True], degenerate=[True, False], responses=[], lengths=[40, 40])
    result = search.TargetResult(name="t", candidates=[unsteered, steered], chosen="L1x1")
    settings = search.SearchSettings(allowed_degenerate=0)
    assert search.rechosen(result, settings, "punctuation:no_comma").chosen is None  # one degenerate answer too many
    assert steered.disqualified
    relaxed = replace(settings, allowed_degenerate=1)
    assert search.rechosen(result, relaxed, "punctuation:no_comma").chosen == "L1x1"
    assert not steered.disqualified


def test_only_keyword_inclusion_entries_stop_after_their_word():
    _, targets = prompts.plan(["keywords:existence", "keywords:forbidden_words", "punctuation:no_comma"], ["apple"])
    stops = {target.instruction_id: search.stop_strings(target, stop_after_keyword=True) for target in targets}
    assert stops == {"keywords:existence": ("apple",), "keywords:forbidden_words": (), "punctuation:no_comma": ()}
    assert all(search.stop_strings(target, stop_after_keyword=False) == () for target in targets)
    with_piece = {target.instruction_id: search.stop_strings(target, True, first_piece="app") for target in targets}
    assert with_piece == {"keywords:existence": ("apple", "app"), "keywords:forbidden_words": (), "punctuation:no_comma": ()}
    direction = Direction("d", torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0, first_piece="app")
    include = next(target for target in targets if target.instruction_id == "keywords:existence")
    assert search.entry_stop_strings(include, direction, search.SearchSettings()) == ("apple", "app")
    assert search.entry_stop_strings(include, direction, search.SearchSettings(stop_after_first_token=False)) == ("apple",)


def test_title_and_constrained_response_entries_stop_once_what_their_checker_asks_for_is_written():
    _, targets = prompts.plan(["detectable_format:title", "detectable_format:constrained_response", "punctuation:no_comma"])
    stops = {target.instruction_id: search.stop_strings(target, True, stop_once_followed=True) for target in targets}
    assert stops == {
        "detectable_format:title": (">>",),
        "detectable_format:constrained_response": ("My answer is yes.", "My answer is no.", "My answer is maybe."),
        "punctuation:no_comma": (),  # a comma later would still fail it: steered to the end
    }
    assert all(search.stop_strings(target, True, stop_once_followed=False) == () for target in targets)
    direction = Direction("d", torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0)
    assert search.entry_stop_strings(targets[0], direction, search.SearchSettings()) == (">>",), "on by default"
    assert search.entry_stop_strings(targets[0], direction, search.SearchSettings(stop_once_followed=False)) == ()
    # each stop string really satisfies the harness's own checker, whatever follows it
    from lm_eval_steer.core.ifeval import prepare_scorer

    prepare_scorer()
    from vector_builder.scoring import strict_follows

    for instruction_id, strings in search.FOLLOWED_ONCE_WRITTEN.items():
        for string in strings:
            answer = ("<<A title" if instruction_id.endswith("title") else "Well. ") + string + " and then anything, at all"
            assert strict_follows(instruction_id, {}, "q", answer), (instruction_id, answer)


def test_token_stop_candidates_come_shortest_first_so_a_tie_steers_less():
    grid = search.candidates([3], [1.0], stop_after_tokens=[64, 16])
    assert [c.label for c in grid] == ["none", "L3x1@16", "L3x1@64", "L3x1"]
    unsteered = search.CandidateResult("none", None, 0.0, None, follows=[False, False], degenerate=[False, False], responses=[""] * 2)
    items = [search.CandidateResult(c.label, c.layer, 1.0, 1.0, follows=[True, False], degenerate=[False, False], responses=[""] * 2, stop_after_tokens=c.stop_after_tokens) for c in grid[1:]]
    assert search._choose(search.TargetResult("t", [unsteered, *items]), SETTINGS, FMT) == "L3x1@16"
    items[0].degenerate = [False, True]  # the shortest rule loops on a new answer: the next one wins
    assert search._choose(search.TargetResult("t", [unsteered, *items]), SETTINGS, FMT) == "L3x1@64"


def test_delayed_starts_come_latest_first_and_never_at_or_after_the_stop():
    grid = search.candidates([3], [1.0], stop_after_tokens=[8], start_after_tokens=[4, 16])
    assert [c.label for c in grid] == ["none", "L3x1>4@8", "L3x1@8", "L3x1>16", "L3x1>4", "L3x1"]
    assert [(c.start_after_tokens, c.stop_after_tokens) for c in grid[1:3]] == [(4, 8), (None, 8)]
    unsteered = search.CandidateResult("none", None, 0.0, None, follows=[False, False], degenerate=[False, False], responses=[""] * 2)
    items = [
        search.CandidateResult(c.label, c.layer, 1.0, 1.0, follows=[True, False], degenerate=[False, False], responses=[""] * 2,
                               stop_after_tokens=c.stop_after_tokens, start_after_tokens=c.start_after_tokens)
        for c in grid[1:]
    ]  # fmt: skip
    assert search._choose(search.TargetResult("t", [unsteered, *items]), SETTINGS, FMT) == "L3x1>4@8", "a tie goes to the smallest window"
    assert items[3].as_candidate() == grid[4]
