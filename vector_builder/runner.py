"""How a build runs a model: the recorded generation settings, the tokenizer's pad and stop ids, and
batched continuations cut at the first stop token (validation answers and training targets)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vector_builder import prompts
from vector_builder.activations import left_pad, model_device


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How every stage runs the model (recorded as ``generation``).

    ``batch_size``: prompts per forward pass or ``generate`` call; ``seed``: every seeded choice of the
    build (query split, instruction wording, sampled words and answers, training order);
    ``max_new_tokens``: the length limit of a validation answer (training targets have their own);
    ``skip_first_token``: steering leaves each row's first token (the attention sink) alone, in
    training as in validation.
    """

    batch_size: int = 8  # batch composition changes float rounding, so it is part of the result
    seed: int = 0
    max_new_tokens: int = 128
    skip_first_token: bool = True


@dataclass(frozen=True, eq=False)
class Runner:
    """A model with its tokenizer, as the build runs it: ``settings`` are recorded, ``pad_id`` and
    ``stop_ids`` are facts of the tokenizer (:meth:`of` reads them)."""

    model: nn.Module
    tokenizer: Any
    settings: GenerationSettings
    pad_id: int
    stop_ids: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any, settings: GenerationSettings) -> Runner:
        """Pads with the pad token (eos where there is none); stops at eos and any end-of-turn token."""
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, tokenizer, settings, pad_id, prompts.stop_ids(tokenizer))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def continuations(self, sequences: Sequence[Sequence[int]], max_new_tokens: int, **options: Any) -> list[list[int]]:
        """Continuation ids of left-padded ``sequences`` from one ``generate`` call (``options``: greedy
        or sampling), each cut at its first stop token."""
        ids, mask = left_pad(sequences, self.pad_id)
        device = model_device(self.model)
        output = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=list(self.stop_ids),
            **options,
        )
        return [cut_at_stop(row, self.stop_ids) for row in output[:, ids.shape[1] :].tolist()]


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token."""
    stop = next((i for i, token in enumerate(ids) if token in stop_ids), len(ids))
    return list(ids[:stop])
