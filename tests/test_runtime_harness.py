"""The installed harness still behaves as ``lm_eval_steer.runtime.harness`` says.

``steered-hf`` finds each batch row's steering entries from what ``HFLM`` hands the model; these
tests watch a plain ``HFLM`` on a tiny model and fail if a harness release changes any of the
assumptions (and steering would silently go to the wrong rows).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM

from lm_eval_steer.runtime.harness import Evaluation, continuation_start, generation_group, loglikelihood_input, running_evaluation

PROMPTS = ["Write a poem about the sea.", "Hi", "Tell me a long story about two dragons and a knight who meet at dawn", "Why?"]
GEN = {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}


class Watched(HFLM):
    """``HFLM`` that records what the model-facing methods receive, in call order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, object]] = []

    def tok_batch_encode(self, strings, *args, **kwargs):
        self.calls.append(("encode", list(strings)))
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length, stop, **kwargs):
        self.calls.append(("generate", context.shape[0]))
        return super()._model_generate(context, max_length, stop, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        self.calls.append(("requests", list(requests)))
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        self.calls.append(("model_call", inps.tolist()))
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)


@pytest.fixture(scope="module")
def watched(tiny_model_dir) -> Watched:
    # max_length 12 makes the long prompt exceed the window, so the truncation rule is exercised
    return Watched(pretrained=str(tiny_model_dir), device="cpu", batch_size=2, max_length=12)


def test_each_generation_batch_is_encoded_right_before_it_is_generated(watched) -> None:
    watched.calls.clear()
    requests = [Instance("generate_until", {}, (prompt, dict(GEN)), i) for i, prompt in enumerate(PROMPTS)]
    watched.generate_until(requests, disable_tqdm=True)
    kinds = [kind for kind, _ in watched.calls]
    assert kinds == ["encode", "generate"] * (len(kinds) // 2) and kinds
    encoded = [strings for kind, strings in watched.calls if kind == "encode"]
    generated = [size for kind, size in watched.calls if kind == "generate"]
    assert [len(strings) for strings in encoded] == generated  # one string per batch row
    assert sorted(string for strings in encoded for string in strings) == sorted(PROMPTS)


def test_identical_prompts_of_one_gen_kwargs_group_are_encoded_once_each_in_request_order(watched, monkeypatch) -> None:
    # Each "generation" is the two-digit number of its row in encoding order, so every answer tells
    # when its request was encoded. Each request has its own (equal) gen_kwargs dict, as in a task.
    digits = [watched.tok_encode(str(digit)) for digit in range(10)]
    assert all(len(ids) == 1 for ids in digits)
    encoded = 0

    def numbered(context, max_length, stop, **kwargs):
        nonlocal encoded
        rows = range(encoded, encoded + context.shape[0])
        encoded += context.shape[0]
        numbers = torch.tensor([[*digits[row // 10], *digits[row % 10]] for row in rows])
        return torch.cat([context, numbers.to(context.device)], dim=1)

    monkeypatch.setattr(watched, "_model_generate", numbered)
    short = {**GEN, "max_gen_toks": 3}
    asked = [(PROMPTS[0], GEN), (PROMPTS[1], GEN), (PROMPTS[0], short), (PROMPTS[0], GEN), (PROMPTS[2], GEN), (PROMPTS[1], GEN), (PROMPTS[0], short), (PROMPTS[0], GEN), (PROMPTS[3], short), (PROMPTS[0], GEN)]
    requests = [Instance("generate_until", {}, (prompt, dict(gen_kwargs)), i) for i, (prompt, gen_kwargs) in enumerate(asked)]
    order = [int(answer) for answer in watched.generate_until(requests, disable_tqdm=True)]
    assert sorted(order) == list(range(len(requests))), "every request must be encoded exactly once"
    by_prompt_and_group: dict[tuple[str, str], list[int]] = {}
    for (prompt, gen_kwargs), position in zip(asked, order):
        by_prompt_and_group.setdefault((prompt, generation_group(dict(gen_kwargs))), []).append(position)
    assert max(len(positions) for positions in by_prompt_and_group.values()) == 4
    for positions in by_prompt_and_group.values():
        assert positions == sorted(positions), "identical prompts of one gen_kwargs group must be encoded in request order"


def test_loglikelihood_rows_are_the_documented_model_inputs(watched) -> None:
    watched.calls.clear()
    requests = [Instance("loglikelihood", {}, (prompt, " and then it rained"), i) for i, prompt in enumerate(PROMPTS)]
    watched.loglikelihood(requests, disable_tqdm=True)
    (given,) = [payload for kind, payload in watched.calls if kind == "requests"]
    rows = [row for kind, batch in watched.calls if kind == "model_call" for row in batch]
    assert sorted(tuple(strings) for strings, _, _ in given) == sorted(request.args for request in requests)
    truncated = 0
    for _, context, continuation in given:
        expected = loglikelihood_input(context, continuation, watched.max_length)
        truncated += len(context) + len(continuation) > watched.max_length + 1
        # right-padded with zeros into its batch: the row is the input followed by padding only
        matches = [row for row in rows if row[: len(expected)] == expected and not any(row[len(expected) :])]
        assert matches, f"no model row equals the documented input {expected}"
        assert 0 < continuation_start(expected, continuation) <= len(expected)
    assert truncated, "the window was never exceeded: the truncation rule went untested"


# --------------------------------------------------------------------------- assumption 6: the running evaluation


class Recording(LM):
    """The smallest model the evaluator accepts: records :func:`running_evaluation` when it is called."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Evaluation | None] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.seen.append(running_evaluation())
        return ["" for _ in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_the_evaluator_still_keeps_what_running_evaluation_reads() -> None:
    """Assumption 6 is read from the evaluator's local variables (it tells the model nothing about its
    tasks): if a harness release renames them, this fails here instead of reuse quietly checking nothing."""
    import lm_eval.evaluator

    names = inspect.unwrap(lm_eval.evaluator.evaluate).__code__.co_varnames
    assert {"eval_tasks", "apply_chat_template", "system_instruction"} <= set(names)


def test_running_evaluation_finds_the_tasks_and_settings_of_a_real_evaluate_call() -> None:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = Recording()
    assert running_evaluation() is None  # outside an evaluation
    simple_evaluate(model=model, tasks=["ifeval_format"], limit=1, system_instruction="Be brief.", task_manager=TaskManager(include_defaults=False))
    (evaluation,) = model.seen
    assert evaluation is not None and set(evaluation.tasks) == {"ifeval_format"}
    assert evaluation.system_instruction == "Be brief." and evaluation.apply_chat_template is False
    assert evaluation.task_versions["ifeval_format"] == evaluation.tasks["ifeval_format"].VERSION
