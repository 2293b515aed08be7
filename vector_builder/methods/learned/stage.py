"""The learned method's build stage: per direction, training targets → one vector per learned layer
(or, with ``joint``, one set of vectors trained together at all of them).

The result is a :class:`~vector_builder.direction.Direction` like the difference-of-means one, so the
layer/strength search treats both methods alike: at a learned layer ``L``, ``unit[L] = v_L / ‖v_L‖``
and ``shift[L] = strength[L] = ‖v_L‖`` (so the ``add`` strength ``m × ‖v_L‖`` at multiplier ``m = 1``
adds exactly the trained ``v_L``); rows of layers that were not trained are zero and never searched.
A jointly trained set fills a row per layer the same way; its candidates steer with every row at once.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lm_eval_steer.runtime.hooks import find_decoder_layers, text_config
from vector_builder import prompts
from vector_builder.direction import Direction
from vector_builder.methods import twin_key
from vector_builder.methods.learned import LearnedSettings, targets, training
from vector_builder.runner import Runner

MIN_TARGETS = 4  # fewer passing targets than this and no vector is trained (too little to learn from)


@dataclass
class LearnedDirection:
    """A learned direction, how its targets were obtained and each layer's training."""

    direction: Direction | None  # None: too few targets passed the checker
    sources: dict[str, int] = field(default_factory=dict)  # target source -> count
    trained: dict[int, training.TrainedVector] = field(default_factory=dict)
    targets_seconds: float = 0.0
    looping_refused: int = 0  # answers that passed the checker but looped (with --target-max-repetition)

    def learned_at(self, layer: int) -> bool:
        """Whether training moved the vector at ``layer`` at all: when the held-out loss never fell
        below its value at step 0, the kept vector is the zero start, and steering with it would
        change nothing (so it is not worth validating)."""
        item = self.trained.get(layer)
        return item is not None and item.norm > 0.0

    def summary(self, timing: bool = True) -> dict[str, Any]:
        """Targets per source and each layer's norm and loss curves (and, with ``timing``, seconds:
        the vector file leaves them out so that a resumed build writes the same bytes)."""
        seconds = lambda value: {"seconds": round(value, 3)} if timing else {}  # noqa: E731
        return {
            "targets": dict(self.sources),
            "looping_refused": self.looping_refused,
            **({"targets_seconds": round(self.targets_seconds, 3)} if timing else {}),
            "layers": {
                str(layer): {
                    "norm": round(item.norm, 4),
                    "best_step": item.best_step,
                    **seconds(item.seconds),
                    "train_loss": [round(value, 5) for value in item.train_loss],
                    "heldout_loss": [[step, round(value, 5)] for step, value in item.heldout_loss],
                }
                for layer, item in sorted(self.trained.items())
            },
        }


def examples_from(tokenizer: Any, responses: Sequence[targets.TargetResponse]) -> list[training.Example]:
    """Chat prompt ids of each plain query and the response's ids, closed by the end-of-turn token so
    that the vector does not teach the model to run on."""
    end = prompts.end_of_turn_id(tokenizer)
    return [
        training.Example(tuple(prompts.chat_ids(tokenizer, item.query)), (*tokenizer.encode(item.response, add_special_tokens=False), end))
        for item in responses
    ]


def as_direction(key: str, trained: Mapping[int, training.TrainedVector], num_layers: int, hidden_size: int, count: int) -> Direction:
    unit = torch.zeros(num_layers, hidden_size)
    norms = torch.zeros(num_layers)
    for layer, item in trained.items():
        norms[layer] = item.vector.norm()
        if norms[layer] > 0:
            unit[layer] = item.vector / norms[layer]
    return Direction(key=key, unit=unit, strength=norms.clone(), baseline=torch.zeros(num_layers), shift=norms, count=count)


def learn_direction(
    runner: Runner, spec: prompts.DirectionSpec, queries: Sequence[str], settings: LearnedSettings, target_settings: targets.TargetSettings
) -> LearnedDirection:
    """Targets for ``spec`` on the training ``queries``, then one vector per layer in ``settings.layers``
    (with ``settings.joint``, the vectors at all those layers trained as one set)."""
    begin = time.perf_counter()
    responses, refused = targets.collect(runner, spec, queries, target_settings)
    outcome = LearnedDirection(
        direction=None, sources=dict(Counter(item.source for item in responses)), targets_seconds=time.perf_counter() - begin, looping_refused=refused
    )
    if len(responses) < MIN_TARGETS:
        return outcome
    examples = examples_from(runner.tokenizer, responses)
    held = max(1, math.ceil(len(examples) * settings.heldout_fraction))
    heldout, train = examples[:held], examples[held:]
    for layers in [settings.layers] if settings.joint else [(layer,) for layer in settings.layers]:
        outcome.trained.update(training.train_vectors(runner, train, heldout, layers, settings, desc=f"train {spec.key} L{'+'.join(map(str, layers))}"))
    return _with_direction(runner.model, spec.key, outcome)


def _with_direction(model: nn.Module, key: str, outcome: LearnedDirection) -> LearnedDirection:
    """``outcome`` with the search's view of its trained vectors (a fresh training or a checkpoint's)."""
    if outcome.trained:
        shape = (len(find_decoder_layers(model)), int(text_config(model).hidden_size))
        outcome.direction = as_direction(twin_key(key, "learned"), outcome.trained, *shape, count=sum(outcome.sources.values()))
    return outcome


def learn_all(
    runner: Runner,
    specs: Sequence[prompts.DirectionSpec],
    queries: Sequence[str],
    settings: LearnedSettings,
    target_settings: targets.TargetSettings,
    *,
    done: Mapping[str, LearnedDirection] | None = None,
    on_done: Callable[[str, LearnedDirection], None] | None = None,
) -> dict[str, LearnedDirection]:
    """:func:`learn_direction` for every spec not already in ``done`` (a checkpoint, whose directions
    are rebuilt from its vectors), in spec order."""
    results = {key: _with_direction(runner.model, key, item) for key, item in (done or {}).items()}
    for spec in specs:
        if spec.key in results:
            continue
        results[spec.key] = learn_direction(runner, spec, queries, settings, target_settings)
        if on_done is not None:
            on_done(spec.key, results[spec.key])
    return {spec.key: results[spec.key] for spec in specs}
