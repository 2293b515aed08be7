"""Last-prompt-token residual activations of every decoder layer, as running sums.

One forward pass per batch records the output of *all* decoder layers at the last prompt token (a
forward hook per layer keeps only that ``[batch, hidden]`` slice, so nothing of size
``seq × layers`` is retained). The sums are kept in float64 per group of prompts, so memory depends
on ``layers × hidden`` and the batch, never on how many prompts are processed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lm_eval_steer.runtime.hooks import find_decoder_layers, text_config


@dataclass
class RunningSum:
    """``total[L] = Σ_i h_i[L]`` over ``count`` prompts (float64), for layers ``L = 0..n-1``."""

    total: torch.Tensor  # [layers, hidden], float64
    count: int = 0

    @classmethod
    def zeros(cls, num_layers: int, hidden_size: int) -> RunningSum:
        return cls(torch.zeros(num_layers, hidden_size, dtype=torch.float64))

    def add(self, states: torch.Tensor) -> None:
        """Adds ``states [n, layers, hidden]``."""
        self.total += states.to(torch.float64).sum(0)
        self.count += states.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("mean of an empty running sum")
        return self.total / self.count


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (left padding)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``position_ids = cumsum(mask) − 1`` (pads clamped to 0), as ``generate`` computes them, so a
    left-padded row sees the same positions as it would alone."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_for_hooks(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
    """One forward pass of a left-padded batch whose activations hooks read: positions as ``generate``
    computes them, no cache, and logits only at the last ``logits_to_keep`` positions (returned; the LM
    head over every position would cost more than the activations wanted)."""
    device = model_device(model)
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=positions_from_mask(attention_mask).to(device),
        use_cache=False,
        logits_to_keep=logits_to_keep,
    )
    return output.logits


@torch.no_grad()
def last_columns_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] | None = None, columns: int = 1
) -> torch.Tensor:
    """``[batch, columns, len(layers), hidden]``: output of each decoder layer at the last ``columns``
    columns (under left padding, every row's last tokens), from ONE forward pass. ``layers`` defaults
    to all of them."""
    decoder_layers = find_decoder_layers(model)
    wanted = list(range(len(decoder_layers))) if layers is None else list(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[index] = hidden[:, -columns:, :].detach().to("cpu", torch.float32)

        return hook

    handles = [decoder_layers[index].register_forward_hook(make_hook(index)) for index in wanted]
    try:
        forward_for_hooks(model, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[index] for index in wanted], dim=2)


def last_token_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, len(layers), hidden]``: output of each decoder layer at the last column (the last
    prompt token under left padding), from ONE forward pass. ``layers`` defaults to all of them."""
    return last_columns_states(model, input_ids, attention_mask, layers)[:, -1]


def collect(
    model: nn.Module,
    prompts: Mapping[str, Sequence[Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "activations",
) -> dict[str, RunningSum]:
    """Running sums of last-token states per group: ``prompts[group]`` is a list of token-id lists.

    A prompt shared by several groups (the query-alone half of every pair) is run once and added to
    each of them. Unique prompts are processed longest first so each batch pads little.
    """
    owners: dict[tuple[int, ...], list[str]] = {}
    for group, sequences in prompts.items():
        for seq in sequences:
            owners.setdefault(tuple(seq), []).append(group)
    unique = sorted(owners, key=lambda seq: (-len(seq), seq))
    num_layers = len(find_decoder_layers(model))
    hidden_size = int(text_config(model).hidden_size)
    sums = {group: RunningSum.zeros(num_layers, hidden_size) for group in prompts}
    with tqdm(total=len(unique), desc=desc, unit="prompt") as bar:
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            ids, mask = left_pad(batch, pad_id)
            states = last_token_states(model, ids, mask)
            for row, seq in enumerate(batch):
                for group in owners[seq]:
                    sums[group].add(states[row : row + 1])
            bar.update(len(batch))
    return sums
