"""Steering directions from running sums: pure tensor functions (shapes ``[layers, hidden]``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm_eval_steer.runtime import interventions
from vector_builder.activations import RunningSum


def difference_of_means(with_sum: RunningSum, without_sum: RunningSum) -> torch.Tensor:
    """``d[L] = (1/n_w) Σ h_with[L] − (1/n_o) Σ h_without[L]``; with paired prompts (n_w = n_o) this is
    the mean over pairs of ``h_with − h_without``."""
    return with_sum.mean() - without_sum.mean()


def mean_projection(mean: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``c[L] = mean[L] · u[L]``: by linearity, the mean over examples of ``h[L] · u[L]``."""
    return (mean * directions).sum(-1)


@dataclass(frozen=True)
class Direction:
    """One instruction's direction at every layer.

    ``unit[L]`` is the unit difference of means, ``strength[L]`` the paper's strength ``c`` (mean
    projection of the with-instruction activations), ``baseline[L]`` the same projection without the
    instruction, and ``shift[L] = ‖d[L]‖ = strength[L] − baseline[L]``.
    """

    key: str
    unit: torch.Tensor  # [layers, hidden] float32
    strength: torch.Tensor  # [layers]
    baseline: torch.Tensor  # [layers]
    shift: torch.Tensor  # [layers]
    count: int


def build_direction(key: str, with_sum: RunningSum, without_sum: RunningSum) -> Direction:
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
