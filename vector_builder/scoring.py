"""IFEval's checkers as the builder scores answers: loose for validation, strict for training targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Scorer = Callable[[str, Mapping[str, Any], str, str], bool]
"""``scorer(instruction_id, kwargs, prompt_with_instruction, response) -> followed``."""


def ifeval_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str, *, strict: bool) -> bool:
    """IFEval's strict or loose check of one instruction, exactly as the harness scores it."""
    from lm_eval_steer.core.ifeval import harness_ifeval

    utils = harness_ifeval()  # finds the offline NLTK data and seeds langdetect (deterministic scores)
    example = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[dict(kwargs)])
    test = utils.test_instruction_following_strict if strict else utils.test_instruction_following_loose
    return bool(test(example, response).follow_all_instructions)


def loose_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """IFEval's loose check (the validation score)."""
    return ifeval_follows(instruction_id, kwargs, prompt, response, strict=False)


def strict_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """IFEval's strict check (what a learned vector's training target must pass)."""
    return ifeval_follows(instruction_id, kwargs, prompt, response, strict=True)
