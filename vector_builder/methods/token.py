"""The token method for keyword instructions: the word's own output-embedding row as its direction.

Per-word learned vectors cost minutes per word; the token direction costs nothing to obtain. For a
word ``w`` whose first token is ``t`` (as it is spelled after a space, inside a sentence), every
layer gets the same unit direction

    unit[L] = W_U[t] / ‖W_U[t]‖          (W_U: the model's output embedding, one row per token)

and ``shift[L] = strength[L] = r[L]``, the mean norm of the residual stream at the output of layer
``L`` on the training questions (first token excluded, as steering excludes it). The ``add``
strength ``m × r[L]`` then reads as a fraction ``m`` of the stream's own size, which is what makes
one pooled choice of layer and multiplier carry across words and layers (the raw norms grow
tenfold over SmolLM2's depth). Adding ``W_U[t]`` raises the logit of ``t`` wherever the stream is
read out, so the model says the word; subtracting it (``keywords:forbidden_words``, sign −1) makes
the word less likely. Only the first token of a multi-token word is pushed, so such a direction
records that token's text (:func:`first_piece`): once it is written, pushing on can only repeat it
(``"Argent Argent …"``), and inclusion entries also stop there (``--stop-after-first-token``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lm_eval_steer.runtime.hooks import find_decoder_layers
from vector_builder import prompts
from vector_builder.activations import forward_for_hooks, left_pad
from vector_builder.direction import Direction
from vector_builder.methods import twin_key
from vector_builder.runner import Runner

_PREFIX = "Say"  # a word's first token is taken as it follows this prefix (mid-sentence spelling)
MIN_PIECE = 3  # shortest first-token text that stops an inclusion entry (see first_piece)


class TokenDirectionError(ValueError):
    """The token method was asked for something it cannot steer (a non-keyword instruction)."""


def first_token(tokenizer: Any, word: str) -> int:
    """The id of the first token of ``word`` as it is spelled after a space inside a sentence."""
    prefix = tokenizer.encode(_PREFIX, add_special_tokens=False)
    full = tokenizer.encode(f"{_PREFIX} {word}", add_special_tokens=False)
    if full[: len(prefix)] != prefix or len(full) == len(prefix):
        raise TokenDirectionError(f"keyword {word!r}: cannot find its first token after {_PREFIX!r} in this tokenizer")
    return full[len(prefix)]


def first_piece(tokenizer: Any, word: str) -> str | None:
    """The text of ``word``'s first token (:func:`first_token`, surrounding spaces removed) when the
    word spans several tokens and that text is at least :data:`MIN_PIECE` characters (a shorter one
    would match inside too many other words to mean the word was begun); else None."""
    piece = tokenizer.decode([first_token(tokenizer, word)]).strip()
    return piece if len(piece) >= MIN_PIECE and piece.lower() != word.lower() else None


@torch.no_grad()
def residual_norms(model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> torch.Tensor:
    """``r[L]``: mean over real tokens (the first excluded) of ``‖h_L‖``, the norm of layer ``L``'s output."""
    layers = find_decoder_layers(model)
    batch_norms: dict[int, torch.Tensor] = {}  # layer -> [batch, seq] norms of the current batch

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            batch_norms[index] = hidden.float().norm(dim=-1).cpu()

        return hook

    handles = [layer.register_forward_hook(make_hook(index)) for index, layer in enumerate(layers)]
    totals, count = torch.zeros(len(layers), dtype=torch.float64), 0
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[start : start + batch_size], pad_id)
            real = mask.to(torch.float32)
            real[torch.arange(len(real)), mask.argmax(dim=1)] = 0  # each row's first real token: the attention sink
            forward_for_hooks(model, ids, mask)
            for index, norms in batch_norms.items():
                totals[index] += float((norms * real).sum())
            count += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(count, 1)).to(torch.float32)


def token_direction(key: str, unembedding_row: torch.Tensor, norms: torch.Tensor, piece: str | None = None) -> Direction:
    """``unit[L] = e / ‖e‖`` at every layer, ``shift[L] = strength[L] = r[L]`` (see the module docstring);
    ``piece``: the pushed token's text when the word is longer (its ``first_piece``)."""
    unit = (unembedding_row.float() / unembedding_row.float().norm()).expand(len(norms), -1).clone()
    return Direction(key=key, unit=unit, strength=norms.clone(), baseline=torch.zeros_like(norms), shift=norms.clone(), count=0, first_piece=piece)


def token_directions(runner: Runner, specs: Sequence[prompts.DirectionSpec], train: Sequence[str]) -> dict[str, Direction]:
    """One token direction per keyword spec, keyed by the token twin of the spec's key."""
    words: Mapping[str, str] = {spec.key: _keyword(spec) for spec in specs}
    sequences = [prompts.chat_ids(runner.tokenizer, query) for query in train]
    norms = residual_norms(runner.model, sequences, runner.settings.batch_size, runner.pad_id)
    output = runner.model.get_output_embeddings().weight.detach().cpu()
    directions = {}
    for key, word in words.items():
        name = twin_key(key, "token")
        directions[name] = token_direction(name, output[first_token(runner.tokenizer, word)], norms, first_piece(runner.tokenizer, word))
    return directions


def _keyword(spec: prompts.DirectionSpec) -> str:
    words = spec.fixed_kwargs.get("keywords")
    if spec.instruction_id != "keywords:existence" or not isinstance(words, (list, tuple)) or len(words) != 1:
        raise TokenDirectionError(f"--method token steers keyword instructions only; {spec.instruction_id} ({spec.key}) has no single keyword")
    return str(words[0])
