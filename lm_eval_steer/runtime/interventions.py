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


def answer_window_mask(attention_mask: torch.Tensor, prompt_length: torch.Tensor, chunk_length: int, stop_after_tokens: torch.Tensor) -> torch.Tensor:
    """Where a ``stop_after_tokens`` rule still lets a row be steered, as ``[batch, chunk_length]`` bool.

    Column ``t`` of row ``b`` (``attention_mask [batch, total]``, the chunk its last ``chunk_length``
    columns) is steered iff ``t < prompt_length[b] + n[b] − 1`` with ``n = stop_after_tokens [batch]``
    (at least 1). Column ``prompt_length[b] + j`` reads the answer's token ``j`` and computes token
    ``j + 1``, so the answer's first ``n[b]`` tokens are computed under steering and the pass that reads
    token ``n[b] − 1`` is the first one left alone. Prompt columns are always inside the window. The
    rule depends on column numbers only, so it is the same with or without the KV cache.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    columns = torch.arange(total - chunk_length, total, device=device)
    ends = prompt_length.to(device) + stop_after_tokens.to(device) - 1
    return columns[None, :] < ends[:, None]
