"""Pure tensor math of steering: per-row interventions on a residual stream, and position masks.

Shapes: ``x`` is ``[batch, seq, hidden]``; per-row parameters are ``vector [batch, hidden]`` and
``strength [batch]``; ``mask [batch, seq]`` is True where a position is steered. A row whose vector
is all zeros is left unchanged by every mode, which is how rows that need nothing at a layer share a
batch with rows that do.
"""

from __future__ import annotations

import torch


def add(x: torch.Tensor, vector: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x <- x + s·v`` at masked positions (``v`` used as stored, not normalised)."""
    delta = (strength[:, None] * vector)[:, None, :]
    return x + mask[..., None].to(x.dtype) * delta.to(x.dtype)


def project(x: torch.Tensor, direction: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x <- x + (s − x·û) û`` at masked positions: the component along unit ``û`` becomes ``s``.

    ``direction`` must already be unit length (or zero for rows to leave alone). The projection is
    computed in float32 so that ``x·û = s`` holds to float32 precision even for half-precision ``x``.
    """
    u = direction.to(torch.float32)[:, None, :]
    component = (x.to(torch.float32) * u).sum(-1, keepdim=True)
    delta = (strength.to(torch.float32)[:, None, None] - component) * u
    return x + (mask[..., None].to(torch.float32) * delta).to(x.dtype)


def ablate(x: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x <- x − (x·û) û`` at masked positions: removes the component along unit ``û``."""
    return project(x, direction, torch.zeros(direction.shape[0], device=direction.device), mask)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` (zero stays zero)."""
    norm = vector.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, vector / norm.clamp_min(torch.finfo(vector.dtype).tiny), vector)


def position_mask(
    attention_mask: torch.Tensor,
    prompt_length: torch.Tensor,
    chunk_length: int,
    positions: str,
    skip_first_token: bool,
) -> torch.Tensor:
    """Which positions of the current forward chunk to steer, as a ``[batch, chunk_length]`` bool tensor.

    ``attention_mask [batch, total]`` covers every position so far (left padding = 0); the chunk is its
    last ``chunk_length`` columns. In row ``b``, column ``t < prompt_length[b]`` is a prompt token,
    later ones are generated. Pad positions are never steered; with ``skip_first_token`` neither is each row's first
    real token (the attention sink, whose huge norm makes ``project`` mode collapse the output).
    """
    total = attention_mask.shape[1]
    real = attention_mask.bool()
    columns = torch.arange(total, device=attention_mask.device)
    keep = real.clone()
    is_prompt = columns[None, :] < prompt_length.to(attention_mask.device)[:, None]
    if positions == "prompt":
        keep &= is_prompt
    elif positions == "generated":
        keep &= ~is_prompt
    elif positions != "all":
        raise ValueError(f"unknown positions {positions!r}")
    if skip_first_token:
        first_real = real.float().argmax(dim=1)  # index of each row's first 1
        keep &= columns[None, :] != first_real[:, None]
    return keep[:, total - chunk_length :]


def answer_window_mask(
    attention_mask: torch.Tensor, prompt_length: torch.Tensor, chunk_length: int, start_after_tokens: torch.Tensor, stop_after_tokens: torch.Tensor
) -> torch.Tensor:
    """Where a row's answer window (``start_after_tokens``, ``stop_after_tokens``) lets it be steered,
    as ``[batch, chunk_length]`` bool.

    Column ``p + j`` of row ``b`` (``p = prompt_length[b]``) reads the answer's token ``j`` and computes
    token ``j + 1``; column ``p − 1`` computes token 0. With ``k = start_after_tokens[b]`` and
    ``n = stop_after_tokens[b]``, column ``t`` is steered iff ``lo ≤ t < p + n − 1``, where
    ``lo = p + k − 1`` for ``k ≥ 1`` and ``lo = 0`` for ``k = 0`` (no delayed start). So the answer's
    tokens ``k .. n − 1`` are computed under steering: the first ``k`` are written as unsteered (their
    passes, and every prompt column, are left alone) and the pass that reads token ``n − 1`` is the first
    one left alone after the window. ``attention_mask [batch, total]`` gives the column numbers (the
    chunk is its last ``chunk_length`` columns); the rule depends on them only, so it is the same with
    or without the KV cache.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    columns = torch.arange(total - chunk_length, total, device=device)
    prompt_length, starts, stops = prompt_length.to(device), start_after_tokens.to(device), stop_after_tokens.to(device)
    lows = torch.where(starts > 0, prompt_length + starts - 1, torch.zeros_like(starts))
    ends = prompt_length + stops - 1
    return (columns[None, :] >= lows[:, None]) & (columns[None, :] < ends[:, None])
