"""vector_builder: pure parts (sums, directions, candidate choice, prompts) without a model."""

from __future__ import annotations

from dataclasses import replace

import random

import pytest
import torch

from lm_eval_steer.core import degeneracy
from vector_builder import prompts, search
from vector_builder.activations import RunningSum, left_pad, positions_from_mask
from lm_eval_steer.runtime.interventions import unit as unit_rows
from vector_builder.directions import build_direction, difference_of_means, mean_projection


def _states(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _summed(states: torch.Tensor, chunk: int) -> RunningSum:
    total = RunningSum.zeros(states.shape[1], states.shape[2])
    for start in range(0, len(states), chunk):
        total.add(states[start : start + chunk])
    return total


def test_running_sums_equal_stacking():
    states = _states(11, 0)
    summed = _summed(states, chunk=3)
    assert summed.count == 11
    torch.testing.assert_close(summed.total, states.sum(0))
    torch.testing.assert_close(summed.mean(), torch.stack(list(states)).mean(0))


def test_difference_of_means_and_strength_equal_direct_computation():
    with_states, without_states = _states(9, 1) + 0.5, _states(9, 2)
    direction = build_direction("x", _summed(with_states, 4), _summed(without_states, 2))
    direct = (with_states - without_states).mean(0)  # mean over pairs of h_with - h_without
    torch.testing.assert_close(difference_of_means(_summed(with_states, 4), _summed(without_states, 5)), direct)
    unit = direct / direct.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(direction.unit, unit.float())
    # c[L] = mean_i h_with_i[L] . u[L]
    direct_c = torch.einsum("nlh,lh->nl", with_states, unit).mean(0)
    torch.testing.assert_close(direction.strength, direct_c.float())
    torch.testing.assert_close(direction.shift, direct.norm(dim=-1).float())
    torch.testing.assert_close(direction.strength - direction.baseline, direction.shift, atol=1e-5, rtol=1e-5)
    assert torch.equal(unit_rows(torch.zeros(2, 4)), torch.zeros(2, 4))
    torch.testing.assert_close(mean_projection(torch.ones(1, 4), torch.full((1, 4), 0.5)), torch.tensor([2.0]))


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


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


SETTINGS = search.SearchSettings(max_new_tokens=4, batch_size=2, pad_id=0, stop_ids=(2,))
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
    # the degeneracy guard counts the pooled outputs: one degenerate output anywhere disqualifies L3
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


def test_split_is_deterministic_and_disjoint():
    queries = prompts.load_queries()
    assert len(queries) >= 200
    train, val = prompts.split_queries(queries, 20, 5, seed=3)
    assert (train, val) == prompts.split_queries(queries, 20, 5, seed=3)
    assert not set(train) & set(val)
    assert prompts.split_queries(queries, 20, 5, seed=4) != (train, val)
    with pytest.raises(prompts.PromptError, match="only"):
        prompts.split_queries(queries[:3], 2, 2, seed=0)


def test_instruction_text_is_seeded_and_leaves_global_random_alone():
    prompts.describe("punctuation:no_comma", {}, "warm-up")  # importing the registry may itself draw
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = prompts.describe("length_constraints:number_sentences", {"relation": "less than"}, "s")
    assert random.random() == expected_next
    assert first == prompts.describe("length_constraints:number_sentences", {"relation": "less than"}, "s")
    assert first[1]["relation"] == "less than"


def test_plan_groups():
    ids = prompts.expand_instructions(["format", "length"])
    specs, targets = prompts.plan(ids)
    assert {t.mode for t in targets if t.instruction_id in prompts.FORMAT_IDS} == {"project"}
    length = [t for t in targets if t.instruction_id in prompts.LENGTH_IDS]
    assert {t.direction for t in length} == {prompts.CONCISE_KEY} and {t.mode for t in length} == {"add"}
    assert len(specs) == len(prompts.FORMAT_IDS) + 1
    specs, targets = prompts.plan(prompts.expand_instructions(["keywords"]), ["apple"])
    assert [s.key for s in specs] == ["keywords:existence:apple"]
    exclusion = next(t for t in targets if t.instruction_id == "keywords:forbidden_words")
    assert exclusion.sign == -1.0 and exclusion.direction == "keywords:existence:apple"
    assert exclusion.fixed_kwargs == {"forbidden_words": ["apple"]}
    with pytest.raises(prompts.PromptError, match="keywords"):
        prompts.plan(["keywords:existence"])
    with pytest.raises(prompts.PromptError, match="neither a group"):
        prompts.expand_instructions(["nonsense"])


def test_chat_prompt_has_a_single_bos(smol_tokenizer):
    ids = prompts.chat_ids(smol_tokenizer, "Why is the sky blue?")
    templated = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], tokenize=False, add_generation_prompt=True)
    assert smol_tokenizer.decode(ids) == templated
    bos = smol_tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos  # the template's own BOS, not a second one


def test_strength_bases():
    direction = build_direction("x", _summed(_states(5, 3) + 1.0, 5), _summed(_states(5, 4), 5))
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


def test_validation_prompts_hide_the_instruction_but_score_against_it():
    target = prompts.Target("length_constraints:number_words", prompts.CONCISE_KEY, "length_constraints:number_words", "add", 1.0, {"relation": "less than"}, "num_words")
    plain = prompts.validation_prompts(target, ["Why?", "How?"], seed=0)
    both = prompts.validation_prompts(target, ["Why?", "How?"], seed=0, also_with_instruction=True)
    assert [p.text for p in plain] == ["Why?", "How?"] and both[:2] == plain
    assert all(p.kwargs["relation"] == "less than" and p.checker_prompt.startswith(q) for p, q in zip(plain, ["Why?", "How?"]))
    assert [p.text for p in both[2:]] == [p.checker_prompt for p in plain]
