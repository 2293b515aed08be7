"""The learned method: a vector per direction and layer, trained with the model frozen on responses
that follow the instruction.

:mod:`~vector_builder.methods.learned.targets` generates and checks the training responses,
:mod:`~vector_builder.methods.learned.training` optimises one vector, and
:mod:`~vector_builder.methods.learned.stage` runs both per direction for the build. Its settings are
:class:`LearnedSettings` here and :class:`~vector_builder.methods.learned.targets.TargetSettings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class LearnedSettings:
    """The learned method's candidates and training (recorded as ``learned``; the command line's
    ``--learned-<field>``).

    ``layers`` (empty = about ``n_layers / 5``) × ``multipliers`` are its candidates, a vector per
    layer; with ``joint``, the vectors at all of ``layers`` are trained together as one set and every
    candidate steers with the whole set (one candidate per multiplier). Adam at learning
    rate ``lr`` takes at most ``steps`` steps of ``batch_size`` examples, with the L2 penalty ``l2``
    (λ in the objective) and the fluency weight ``fluency`` (μ: the divergence from the unsteered
    model at the target tokens it would have written itself; 0 = off); the loss on
    ``heldout_fraction`` of the targets, every ``eval_every`` steps, stops training after
    ``patience`` evaluations without improvement.
    """

    layers: tuple[int, ...] = ()
    multipliers: tuple[float, ...] = (1.0,)
    steps: int = 40
    lr: float = 0.08
    batch_size: int = 4
    l2: float = 0.0
    fluency: float = 0.0
    eval_every: int = 10
    patience: int = 2
    heldout_fraction: float = 0.25
    joint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "multipliers", tuple(float(m) for m in self.multipliers))
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--learned-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name, value in (("lr", self.lr), ("l2", self.l2), ("fluency", self.fluency), *(("multipliers", m) for m in self.multipliers)):
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"--learned-{name} must be a finite {'positive' if name == 'lr' else 'non-negative'} number, got {value}")
        if self.joint and len(set(self.layers)) < 2:
            raise ValueError(f"--learned-joint trains a set of vectors together: it needs at least two distinct --learned-layers, got {list(self.layers)}")
