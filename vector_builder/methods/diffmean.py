"""The difference-of-means method (the paper's recipe): paired prompts' activation sums → one direction
per spec. The direction functions are pure tensor functions (shapes ``[layers, hidden]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_steer.runtime import interventions
from vector_builder import activations, prompts
from vector_builder.activations import RunningSum
from vector_builder.direction import Direction
from vector_builder.runner import Runner

def collect_sums(runner: Runner, specs: Sequence[prompts.DirectionSpec], train: Sequence[str]) -> dict[str, tuple[RunningSum, RunningSum]]:
    """Spec key → running sums of the last-prompt-token activations of its training pairs
    (:func:`vector_builder.prompts.training_pairs`) with and without the instruction, in one pass."""
    groups: dict[str, list[list[int]]] = {}
    for spec in specs:
        pairs = prompts.training_pairs(spec, train, runner.settings.seed)
        groups[f"with:{spec.key}"] = [prompts.chat_ids(runner.tokenizer, text) for text, _ in pairs]
        groups[f"without:{spec.key}"] = [prompts.chat_ids(runner.tokenizer, text) for _, text in pairs]
    sums = activations.collect(runner.model, groups, batch_size=runner.settings.batch_size, pad_id=runner.pad_id, desc="train activations")
    return {spec.key: (sums[f"with:{spec.key}"], sums[f"without:{spec.key}"]) for spec in specs}


def difference_of_means(with_sum: RunningSum, without_sum: RunningSum) -> torch.Tensor:
    """``d[L] = (1/n_w) Σ h_with[L] − (1/n_o) Σ h_without[L]``; with paired prompts (n_w = n_o) this is
    the mean over pairs of ``h_with − h_without``."""
    return with_sum.mean() - without_sum.mean()


def mean_projection(mean: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``c[L] = mean[L] · u[L]``: by linearity, the mean over examples of ``h[L] · u[L]``."""
    return (mean * directions).sum(-1)


def build_direction(key: str, with_sum: RunningSum, without_sum: RunningSum) -> Direction:
    """``unit = d / ‖d‖``, ``strength = c`` (with-instruction mean projection), ``baseline`` (the same
    without it) and ``shift = ‖d‖`` at every layer."""
    difference = difference_of_means(with_sum, without_sum)
    unit = interventions.unit(difference)
    return Direction(
        key=key,
        unit=unit.to(torch.float32),
        strength=mean_projection(with_sum.mean(), unit).to(torch.float32),
        baseline=mean_projection(without_sum.mean(), unit).to(torch.float32),
        shift=difference.norm(dim=-1).to(torch.float32),
        count=with_sum.count,
    )
