"""vector_builder.methods.learned on a tiny random Llama: the training objective steers as the runtime
does, only the vector learns, early stopping keeps the best held-out step, the stage's direction adds
the trained vector, and targets come from the right source."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vector_builder import prompts
from vector_builder.methods.learned import LearnedSettings, targets, training
from vector_builder.methods.learned.stage import as_direction, examples_from
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.scoring import strict_follows

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _runner(model, tokenizer, batch_size: int = 8) -> Runner:
    """The model run with the tokenizer's pad token and eos as the only stop token."""
    return Runner(model, tokenizer, GenerationSettings(batch_size=batch_size), tokenizer.pad_token_id, (tokenizer.eos_token_id,))


def _examples(tokenizer, count: int = 6) -> list[training.Example]:
    items = [targets.TargetResponse(f"Question {i}: name a colour.", {}, f"the colour number {i} is blue", "greedy") for i in range(count)]
    return examples_from(tokenizer, items)


def test_batch_tensors_label_only_the_responses_under_left_padding():
    examples = [training.Example((5, 6, 7), (8, 9)), training.Example((5,), (10, 11, 12))]
    ids, mask, labels, scored = training.batch_tensors(examples, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [0, 5, 10, 11, 12]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 10, 11, 12]]
    assert scored == 3


def _manual_loss(model, example: training.Example, vectors: dict[int, torch.Tensor], skip_first: bool) -> torch.Tensor:
    """The objective written out with plain forward hooks: ``h_L += v_L`` at every position but the first."""
    sequence = torch.tensor([list(example.prompt) + list(example.response)])

    def hook_for(vector):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            delta = vector.expand_as(hidden).clone()
            if skip_first:
                delta[:, 0] = 0
            steered = hidden + delta
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    handles = [model.model.layers[layer].register_forward_hook(hook_for(vector)) for layer, vector in vectors.items()]
    try:
        logits = model(input_ids=sequence, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    start = len(example.prompt)
    return torch.nn.functional.cross_entropy(logits[start - 1 : -1], sequence[0, start:])


@pytest.mark.parametrize("skip_first", [True, False])
def test_training_objective_steers_like_the_runtime(tiny, skip_first):
    model, tokenizer = tiny
    example = _examples(tokenizer, 1)[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ours = training.response_loss(model, [example], vector[None], [LAYER], tokenizer.pad_token_id, skip_first)
    torch.testing.assert_close(ours, _manual_loss(model, example, {LAYER: vector}, skip_first))
    # and the vector matters: a different vector gives a different loss
    assert not torch.isclose(ours, training.response_loss(model, [example], torch.zeros(1, 64), [LAYER], tokenizer.pad_token_id, skip_first))


def test_a_jointly_trained_set_steers_every_layer_at_once(tiny):
    model, tokenizer = tiny
    example = _examples(tokenizer, 1)[0]
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    ours = training.response_loss(model, [example], vectors, [1, 2], tokenizer.pad_token_id, True)
    torch.testing.assert_close(ours, _manual_loss(model, example, {1: vectors[0], 2: vectors[1]}, True))
    for alone in ({1: vectors[0]}, {2: vectors[1]}):  # the set is not either of its vectors
        assert not torch.isclose(ours, _manual_loss(model, example, alone, True))


def test_joint_training_moves_every_vector_of_the_set_in_one_run(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    config = LearnedSettings(layers=(1, 2), steps=6, lr=0.05, batch_size=2, eval_every=2, patience=5, joint=True)
    trained = training.train_vectors(_runner(model, tokenizer), examples[2:], examples[:2], [1, 2], config)
    assert sorted(trained) == [1, 2] and all(item.norm > 0 for item in trained.values())
    assert trained[1].train_loss == trained[2].train_loss and trained[1].best_step == trained[2].best_step
    assert not torch.equal(trained[1].vector, trained[2].vector)
    with pytest.raises(ValueError, match="distinct layers"):
        training.train_vectors(_runner(model, tokenizer), examples[2:], examples[:2], [1, 1], config)

def test_unconstrained_kl_counts_only_tokens_the_unsteered_model_would_write():
    unsteered = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]])  # argmax 0, 1, 2
    steered = torch.tensor([[[0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2, training.IGNORE]])  # only position 0 is free: the target agrees with argmax there
    p = torch.softmax(unsteered[0, 0], -1)
    expected = (p * (p.log() - torch.log_softmax(steered[0, 0], -1))).sum()
    torch.testing.assert_close(training.unconstrained_kl(unsteered, steered, labels), expected)
    assert float(training.unconstrained_kl(unsteered, unsteered, labels)) == pytest.approx(0.0, abs=1e-6)
    nothing_free = training.unconstrained_kl(unsteered, steered.requires_grad_(), torch.tensor([[1, 0, training.IGNORE]]))
    assert float(nothing_free.detach()) == 0.0 and nothing_free.requires_grad


def _own_words_then_target(model, tokenizer, count: int = 6) -> list[training.Example]:
    """Examples whose responses open with the unsteered model's own greedy tokens (free for the fluency
    term) and end with the example's target words (constrained)."""
    examples = []
    for example in _examples(tokenizer, count):
        prompt = torch.tensor([example.prompt])
        own = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1] :]
        examples.append(training.Example(example.prompt, tuple(own.tolist()) + example.response))
    return examples


def test_the_fluency_term_is_zero_unsteered_and_grows_with_the_vector(tiny):
    model, tokenizer = tiny
    examples = _own_words_then_target(model, tokenizer, 3)
    pad = tokenizer.pad_token_id
    zero = torch.zeros(1, 64)
    torch.testing.assert_close(
        training.response_loss(model, examples, zero, [LAYER], pad, True, fluency=5.0), training.response_loss(model, examples, zero, [LAYER], pad, True)
    )
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))[None] * 4
    plain = training.response_loss(model, examples, vector, [LAYER], pad, True)
    assert training.response_loss(model, examples, vector, [LAYER], pad, True, fluency=1.0) > plain + 1e-3


def test_a_fluency_weight_keeps_the_trained_vector_closer_to_the_unsteered_model(tiny):
    model, tokenizer = tiny
    examples = _own_words_then_target(model, tokenizer)
    pad = tokenizer.pad_token_id

    def divergence(vector: torch.Tensor) -> float:
        with torch.no_grad():
            both = training.response_loss(model, examples, vector[None], [LAYER], pad, True, fluency=1.0)
            return float(both - training.response_loss(model, examples, vector[None], [LAYER], pad, True))

    trained = {}
    for weight in (0.0, 20.0):
        config = LearnedSettings(steps=12, lr=0.05, batch_size=2, eval_every=4, patience=5, fluency=weight)
        trained[weight] = training.train_vectors(_runner(model, tokenizer), examples[2:], examples[:2], [LAYER], config)[LAYER].vector
    assert trained[0.0].norm() > 0 and trained[20.0].norm() > 0
    assert divergence(trained[20.0]) < divergence(trained[0.0])


def test_padding_does_not_change_the_loss(tiny):
    model, tokenizer = tiny
    short, long = training.Example((1, 5, 6), (7, 8)), training.Example((1, 5, 6, 9, 9, 9, 9), (7, 8, 3))
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    pad = tokenizer.pad_token_id
    alone = training.response_loss(model, [short], vector[None], [LAYER], pad, True)
    batched_tokens = training.response_loss(model, [short, long], vector[None], [LAYER], pad, True) * 5
    long_alone = training.response_loss(model, [long], vector[None], [LAYER], pad, True) * 3
    torch.testing.assert_close(batched_tokens - long_alone, alone * 2, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_leaves_the_model_untouched(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    config = LearnedSettings(steps=12, lr=0.05, batch_size=2, eval_every=4, patience=5)
    result = training.train_vectors(_runner(model, tokenizer), examples[2:], examples[:2], [LAYER], config)[LAYER]
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

    def fake_heldout(runner, heldout, vector, *args):
        seen[len(seen) * 2] = vector[0].clone()
        return next(scripted)

    monkeypatch.setattr(training, "_heldout_loss", fake_heldout)
    config = LearnedSettings(steps=50, lr=0.1, batch_size=2, eval_every=2, patience=2)
    result = training.train_vectors(_runner(model, tokenizer), examples[2:], examples[:2], [LAYER], config)[LAYER]
    assert len(result.train_loss) == 8  # two evaluations (steps 6 and 8) without improvement
    assert result.best_step == 4
    assert [step for step, _ in result.heldout_loss] == [0, 2, 4, 6, 8]
    torch.testing.assert_close(result.vector, seen[4])
    assert not torch.equal(result.vector, seen[8])


def test_training_refuses_empty_sets(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="held-out"):
        training.train_vectors(_runner(model, tokenizer), _examples(tokenizer), [], [LAYER], LearnedSettings())


def test_learned_direction_adds_exactly_the_trained_vector():
    vector = torch.tensor([3.0, 4.0, 0.0])
    trained = {1: training.TrainedVector(layer=1, vector=vector)}
    direction = as_direction("x@learned", trained, num_layers=3, hidden_size=3, count=5)
    assert direction.shift.tolist() == [0.0, 5.0, 0.0]
    torch.testing.assert_close(direction.unit[1] * direction.shift[1], vector)
    assert torch.equal(direction.unit[0], torch.zeros(3))


def test_examples_end_with_the_end_of_turn_token(smol_tokenizer):
    example = _examples(smol_tokenizer, 1)[0]
    assert example.response[-1] == prompts.end_of_turn_id(smol_tokenizer) == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert list(example.prompt) == prompts.chat_ids(smol_tokenizer, "Question 0: name a colour.")


# ------------------------------------------------------------------------------------------- targets


def _settings(samples: int) -> targets.TargetSettings:
    return targets.TargetSettings(max_tokens=5, samples=samples)


def test_targets_take_greedy_then_repaired_answers(tiny):
    model, tokenizer = tiny
    spec = prompts.DirectionSpec("change_case:english_lowercase", "change_case:english_lowercase")
    queries = [f"Tell me fact {i}." for i in range(4)]
    greedy = [a[0] for a in targets.generate_texts(_runner(model, tokenizer, 4), [p.checker_prompt for p in prompts.training_prompts(spec, queries, 0)], _settings(0), sample=False, desc="t")]
    accept_first_two = {greedy[0], greedy[1]}
    calls = []

    def checker(instruction_id, kwargs, prompt, response):
        calls.append(response)
        return response in accept_first_two or (response == response.lower() and response not in greedy)

    found, refused = targets.collect(_runner(model, tokenizer, 4), spec, queries, _settings(0), checker=checker)
    assert refused == 0, "without max_repetition nothing is refused for looping"
    assert [item.source for item in found[:2]] == ["greedy", "greedy"]
    assert [item.query for item in found] == queries[: len(found)] or all(item.query in queries for item in found)
    repaired = [item for item in found if item.source == "repaired"]
    assert all(item.response == item.response.lower() for item in repaired)
    assert {item.query for item in repaired} <= set(queries[2:])


def test_targets_without_a_passing_answer_or_repair_are_dropped(tiny):
    model, tokenizer = tiny
    spec = prompts.DirectionSpec("detectable_format:multiple_sections", "detectable_format:multiple_sections")
    assert targets.collect(_runner(model, tokenizer, 4), spec, ["A?", "B?"], _settings(2), checker=lambda *args: False) == ([], 0)


LOOPING = "I like cats. " * 30
FLUENT = "Cats are small, quiet animals that many people keep as pets; they sleep much of the day and hunt at night."


def test_looping_answers_are_refused_as_targets_at_every_source(tiny, smol_tokenizer, monkeypatch):
    # greedy answers: one loops, one does not; the lowercase repair of the looping one loops as well
    monkeypatch.setattr(targets, "generate_texts", lambda runner, messages, settings, sample, desc: [[LOOPING], [FLUENT]])
    model, _ = tiny
    spec = prompts.DirectionSpec("change_case:english_lowercase", "change_case:english_lowercase")
    passes_all = lambda *args: True  # noqa: E731
    runner = _runner(model, smol_tokenizer, 4)
    strict = targets.TargetSettings(max_tokens=64, samples=0, max_repetition=0.5)
    found, refused = targets.collect(runner, spec, ["A?", "B?"], strict, checker=passes_all)
    assert [(item.query, item.response) for item in found] == [("B?", FLUENT)] and refused == 2
    lenient = targets.TargetSettings(max_tokens=64, samples=0)
    assert [item.response for item in targets.collect(runner, spec, ["A?", "B?"], lenient, checker=passes_all)[0]] == [LOOPING, FLUENT]
    refusing = lambda instruction_id, kwargs, prompt, response: response == FLUENT  # noqa: E731
    assert targets.collect(runner, spec, ["A?", "B?"], strict, checker=refusing)[1] == 0, "only answers that pass the checker count as refused for looping"


def test_target_max_repetition_must_be_a_share():
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="--target-max-repetition must be a number from 0"):
            targets.TargetSettings(max_repetition=bad)


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


def test_the_constrained_response_repair_opens_with_the_answers_own_yes_or_no():
    repair = targets.REPAIRS["detectable_format:constrained_response"]
    assert repair("No, a poodle is smaller.", {}, "Is a poodle bigger?") == "My answer is no. No, a poodle is smaller."
    assert repair("  Yes! It is.", {}, "?").startswith("My answer is yes. Yes!")
    assert repair("Nobody knows.", {}, "?").startswith("My answer is maybe. Nobody"), "a word that merely starts with 'no' is not a no"


@settings(max_examples=30, deadline=None)
@given(response=TEXT, instruction_id=st.sampled_from(sorted(REPAIRABLE)))
def test_repairs_pass_the_strict_checker(offline_scorer, response, instruction_id):
    kwargs = REPAIRABLE[instruction_id]
    fixed = targets.REPAIRS[instruction_id](response, kwargs, "What is a good name for a cat?")
    assert fixed is not None
    assert strict_follows(instruction_id, kwargs, "What is a good name for a cat? (instruction)", fixed)


def test_highlight_repair_needs_enough_lines():
    assert targets.REPAIRS["detectable_format:number_highlighted_sections"]("one\ntwo", {"num_highlights": 3}, "q") is None
    assert targets.REPAIRS["detectable_format:number_highlighted_sections"]("one\n\ntwo\nthree", {"num_highlights": 2}, "q") == "*one*\n\n*two*\nthree"
