"""vector_builder.methods: the registry (twins, the choice between methods), difference of means from
running sums, and the token method's first token."""

from __future__ import annotations

import pytest
import torch

from lm_eval_steer.runtime.interventions import unit as unit_rows
from vector_builder import prompts
from vector_builder.activations import RunningSum
from vector_builder.methods import base_name, methods_of, pick, targets_for
from vector_builder.methods.diffmean import build_direction, difference_of_means, mean_projection
from vector_builder.methods.token import first_piece, first_token
from vector_builder.search import CandidateResult, TargetResult


pytestmark = pytest.mark.usefixtures("one_thread")


def _result(name: str, chosen_score: float | None, degenerate: int = 0) -> TargetResult:
    none = CandidateResult("none", None, 0.0, None, [False, False], [False, False], [])
    items = [none]
    if chosen_score is not None:
        follows = [True] * int(chosen_score * 2) + [False] * (2 - int(chosen_score * 2))
        items.append(CandidateResult("L1x1", 1, 1.0, 2.0, follows, [True] * degenerate + [False] * (2 - degenerate), []))
    return TargetResult(name, items, chosen=None if chosen_score is None else "L1x1")


def test_pick_prefers_the_better_method_and_diffmean_on_ties():
    assert pick({"diffmean": _result("a", 0.5), "learned": _result("a@learned", 1.0)}) == "learned"
    assert pick({"learned": _result("a@learned", 0.5), "diffmean": _result("a", 0.5)}) == "diffmean"
    assert pick({"diffmean": _result("a", 0.5), "learned": _result("a@learned", 0.5, degenerate=1)}) == "diffmean"
    assert pick({"diffmean": _result("a", None), "learned": _result("a@learned", 0.5)}) == "learned"
    assert pick({"diffmean": _result("a", None), "learned": _result("a@learned", None)}) is None


def test_methods_and_learned_targets():
    assert methods_of("both") == ("diffmean", "learned")
    with pytest.raises(ValueError, match="--method"):
        methods_of("magic")
    target = prompts.Target("keywords:forbidden_words:cat", "keywords:existence:cat", "keywords:forbidden_words", "add", -1.0, {"forbidden_words": ["cat"]})
    twin = targets_for(target, "learned")
    assert (twin.name, twin.direction, twin.mode, twin.sign) == ("keywords:forbidden_words:cat@learned", "keywords:existence:cat@learned", "add", -1.0)
    token = targets_for(target, "token")
    assert (token.name, token.direction, token.mode, token.sign) == ("keywords:forbidden_words:cat@token", "keywords:existence:cat@token", "add", -1.0)
    assert targets_for(target, "diffmean") is target
    assert {base_name(twin.name), base_name(token.name), base_name(target.name)} == {target.name}


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


def test_first_token_is_the_mid_sentence_spelling(tiny):
    _, tokenizer = tiny
    for word in ("apple", "ocean", "Argentinian"):
        assert first_token(tokenizer, word) == tokenizer.encode(f"Say {word}", add_special_tokens=False)[len(tokenizer.encode("Say", add_special_tokens=False))]
    assert tokenizer.decode([first_token(tokenizer, "ocean")]).strip() == "ocean"


def test_first_piece_is_the_pushed_token_of_a_longer_word_only(smol_tokenizer):
    assert first_piece(smol_tokenizer, "Argentinian") == "Argent"  # " Argent" + "inian"
    assert first_piece(smol_tokenizer, "medalist") == "medal"
    assert first_piece(smol_tokenizer, "mother") is None, "a one-token word: the word itself is the stop string"
    assert first_piece(smol_tokenizer, "jurgen") == "jur" and first_piece(smol_tokenizer, "le") is None
