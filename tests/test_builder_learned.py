"""Learned vectors on a tiny random Llama: the training objective steers as the runtime does, only
the vector learns, early stopping keeps the best held-out step, and targets come from the right source."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_llama
from vector_builder import learned, prompts, targets
from vector_builder.learned_directions import as_direction, examples_from
from vector_builder.methods import base_name, methods_of, pick, targets_for
from vector_builder.search import CandidateResult, TargetResult

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(tokenizer, count: int = 6) -> list[learned.Example]:
    items = [targets.TargetResponse(f"Question {i}: name a colour.", {}, f"the colour number {i} is blue", "greedy") for i in range(count)]
    return examples_from(tokenizer, items)


def test_batch_tensors_label_only_the_responses_under_left_padding():
    examples = [learned.Example((5, 6, 7), (8, 9)), learned.Example((5,), (10, 11, 12))]
    ids, mask, labels, scored = learned.batch_tensors(examples, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [0, 5, 10, 11, 12]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 10, 11, 12]]
    assert scored == 3


def _manual_loss(model, example: learned.Example, vector: torch.Tensor, layer: int, skip_first: bool) -> torch.Tensor:
    """The objective written out with a plain forward hook: ``h_L += v`` at every position but the first."""
    sequence = torch.tensor([list(example.prompt) + list(example.response)])

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        delta = vector.expand_as(hidden).clone()
        if skip_first:
            delta[:, 0] = 0
        steered = hidden + delta
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        logits = model(input_ids=sequence, use_cache=False).logits[0]
    finally:
        handle.remove()
    start = len(example.prompt)
    return torch.nn.functional.cross_entropy(logits[start - 1 : -1], sequence[0, start:])


@pytest.mark.parametrize("skip_first", [True, False])
def test_training_objective_steers_like_the_runtime(tiny, skip_first):
    model, tokenizer = tiny
    example = _examples(tokenizer, 1)[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ours = learned.response_loss(model, [example], vector, LAYER, tokenizer.pad_token_id, skip_first)
    torch.testing.assert_close(ours, _manual_loss(model, example, vector, LAYER, skip_first))
    # and the vector matters: a different vector gives a different loss
    assert not torch.isclose(ours, learned.response_loss(model, [example], torch.zeros(64), LAYER, tokenizer.pad_token_id, skip_first))


def test_padding_does_not_change_the_loss(tiny):
    model, tokenizer = tiny
    short, long = learned.Example((1, 5, 6), (7, 8)), learned.Example((1, 5, 6, 9, 9, 9, 9), (7, 8, 3))
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    pad = tokenizer.pad_token_id
    alone = learned.response_loss(model, [short], vector, LAYER, pad, True)
    batched_tokens = learned.response_loss(model, [short, long], vector, LAYER, pad, True) * 5
    long_alone = learned.response_loss(model, [long], vector, LAYER, pad, True) * 3
    torch.testing.assert_close(batched_tokens - long_alone, alone * 2, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_leaves_the_model_untouched(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    config = learned.TrainingSettings(max_steps=12, learning_rate=0.05, batch_size=2, eval_every=4, patience=5)
    result = learned.train_vector(model, examples[2:], examples[:2], LAYER, config, pad_id=tokenizer.pad_token_id)
    assert result.heldout_loss[0][0] == 0 and result.norm > 0
    assert min(loss for _, loss in result.heldout_loss[1:]) < result.heldout_loss[0][1]
    assert result.best_step == min(result.heldout_loss, key=lambda item: item[1])[0]
    assert len(result.train_loss) == 12
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name
        assert parameter.requires_grad == flags[name]
        assert torch.equal(parameter, before[name]), name


def test_early_stopping_keeps_the_best_heldout_vector(tiny, monkeypatch):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])  # held-out loss at steps 0, 2, 4, 6, 8, ...
    seen: dict[int, torch.Tensor] = {}

    def fake_heldout(model_, heldout, vector, *args):
        seen[len(seen) * 2] = vector.clone()
        return next(scripted)

    monkeypatch.setattr(learned, "_heldout_loss", fake_heldout)
    config = learned.TrainingSettings(max_steps=50, learning_rate=0.1, batch_size=2, eval_every=2, patience=2)
    result = learned.train_vector(model, examples[2:], examples[:2], LAYER, config, pad_id=tokenizer.pad_token_id)
    assert len(result.train_loss) == 8  # two evaluations (steps 6 and 8) without improvement
    assert result.best_step == 4
    assert [step for step, _ in result.heldout_loss] == [0, 2, 4, 6, 8]
    torch.testing.assert_close(result.vector, seen[4])
    assert not torch.equal(result.vector, seen[8])


def test_training_refuses_empty_sets(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="held-out"):
        learned.train_vector(model, _examples(tokenizer), [], LAYER, learned.TrainingSettings(), pad_id=0)


def test_learned_direction_adds_exactly_the_trained_vector():
    vector = torch.tensor([3.0, 4.0, 0.0])
    trained = {1: learned.TrainedVector(layer=1, vector=vector)}
    direction = as_direction("x@learned", trained, num_layers=3, hidden_size=3, count=5)
    assert direction.shift.tolist() == [0.0, 5.0, 0.0]
    torch.testing.assert_close(direction.unit[1] * direction.shift[1], vector)
    assert torch.equal(direction.unit[0], torch.zeros(3))


def test_examples_end_with_the_end_of_turn_token(smol_tokenizer):
    example = _examples(smol_tokenizer, 1)[0]
    assert example.response[-1] == prompts.end_of_turn_id(smol_tokenizer) == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert list(example.prompt) == prompts.chat_ids(smol_tokenizer, "Question 0: name a colour.")


# ------------------------------------------------------------------------------------------- targets


def _settings(tokenizer, samples: int) -> targets.TargetSettings:
    return targets.TargetSettings(max_new_tokens=5, batch_size=4, pad_id=tokenizer.pad_token_id, stop_ids=(tokenizer.eos_token_id,), samples=samples)


def test_targets_take_greedy_then_repaired_answers(tiny):
    model, tokenizer = tiny
    spec = prompts.DirectionSpec("change_case:english_lowercase", "change_case:english_lowercase")
    queries = [f"Tell me fact {i}." for i in range(4)]
    greedy = [a[0] for a in targets.generate_texts(model, tokenizer, [p.checker_prompt for p in prompts.training_prompts(spec, queries, 0)], _settings(tokenizer, 0), sample=False, desc="t")]
    accept_first_two = {greedy[0], greedy[1]}
    calls = []

    def checker(instruction_id, kwargs, prompt, response):
        calls.append(response)
        return response in accept_first_two or (response == response.lower() and response not in greedy)

    found = targets.collect(model, tokenizer, spec, queries, _settings(tokenizer, 0), checker=checker)
    assert [item.source for item in found[:2]] == ["greedy", "greedy"]
    assert [item.query for item in found] == queries[: len(found)] or all(item.query in queries for item in found)
    repaired = [item for item in found if item.source == "repaired"]
    assert all(item.response == item.response.lower() for item in repaired)
    assert {item.query for item in repaired} <= set(queries[2:])


def test_targets_without_a_passing_answer_or_repair_are_dropped(tiny):
    model, tokenizer = tiny
    spec = prompts.DirectionSpec("detectable_format:multiple_sections", "detectable_format:multiple_sections")
    found = targets.collect(model, tokenizer, spec, ["A?", "B?"], _settings(tokenizer, 2), checker=lambda *args: False)
    assert found == []


REPAIRABLE = {
    "change_case:english_lowercase": {},
    "change_case:english_capital": {},
    "punctuation:no_comma": {},
    "startend:quotation": {},
    "startend:end_checker": {"end_phrase": "Any other questions?"},
    "detectable_format:title": {},
    "detectable_format:json_format": {},
    "detectable_format:constrained_response": {},
    "length_constraints:number_sentences": {"relation": "less than", "num_sentences": 2},
    "length_constraints:number_words": {"relation": "less than", "num_words": 9},
}

SENTENCES = [
    "The cat sat on the warm mat, and then it slept for most of the afternoon.",
    "Rain fell outside while the children read their favourite books by the window.",
    "Well, there are many good names for a cat, such as Luna, Milo and Oliver.",
    "Choose a name that is short, easy to call and fits the personality of your pet.",
]
# English prose (the capital-letters checker also asks langdetect for English), with commas and line breaks.
TEXT = st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=5).flatmap(lambda items: st.sampled_from([" ", "\n", "\n\n"]).map(lambda sep: sep.join(items)))


@pytest.fixture(scope="module")
def offline_scorer():
    """The IFEval checkers need NLTK's punkt_tab, which the package ships."""
    from lm_eval_steer.core.ifeval import prepare_scorer

    prepare_scorer()


@settings(max_examples=30, deadline=None)
@given(response=TEXT, instruction_id=st.sampled_from(sorted(REPAIRABLE)))
def test_repairs_pass_the_strict_checker(offline_scorer, response, instruction_id):
    kwargs = REPAIRABLE[instruction_id]
    fixed = targets.REPAIRS[instruction_id](response, kwargs, "What is a good name for a cat?")
    assert fixed is not None
    assert targets.strict_follows(instruction_id, kwargs, "What is a good name for a cat? (instruction)", fixed)


def test_highlight_repair_needs_enough_lines():
    assert targets.REPAIRS["detectable_format:number_highlighted_sections"]("one\ntwo", {"num_highlights": 3}, "q") is None
    assert targets.REPAIRS["detectable_format:number_highlighted_sections"]("one\n\ntwo\nthree", {"num_highlights": 2}, "q") == "*one*\n\n*two*\nthree"


# ------------------------------------------------------------------------------------------- methods


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
