"""What every build method produces and the layer/strength search steers with: one direction per layer.

Difference of means (:mod:`vector_builder.methods.diffmean`) defines the fields; the token and learned
methods express their vectors in the same terms, so the search treats every method alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Direction:
    """One instruction's direction at every layer.

    ``unit[L]`` is the unit difference of means, ``strength[L]`` the paper's strength ``c`` (mean
    projection of the with-instruction activations), ``baseline[L]`` the same projection without the
    instruction, and ``shift[L] = ‖d[L]‖ = strength[L] − baseline[L]``. ``first_piece``: for a
    direction that pushes one token of a longer word (the token method), that token's text.
    """

    key: str
    unit: torch.Tensor  # [layers, hidden] float32
    strength: torch.Tensor  # [layers]
    baseline: torch.Tensor  # [layers]
    shift: torch.Tensor  # [layers]
    count: int
    first_piece: str | None = None
