"""Residual-stream hooks: find a model's decoder layers and steer their outputs row by row.

Usage (one ``generate`` or forward call per ``with``)::

    with steering(model, rows=[[fmt_entry], [], [fmt_entry, length_entry]]):
        model.generate(input_ids, attention_mask=mask, ...)

Row ``i`` of the batch is steered with ``rows[i]`` (an empty list leaves it alone), so one batch can
mix documents that need different vectors at different layers. Positions are classified from the
``attention_mask`` the model receives on every forward call, which makes steering correct under
left padding and with the KV cache (each decoding step sees one new column). An entry with
``stop_after`` strings stops steering its row once the generated text contains one
(:mod:`lm_eval_steer.runtime.stopping`; needs ``decode``); one with ``stop_after_tokens`` once that
many answer tokens were computed under it, and one with ``start_after_tokens`` only after that many
answer tokens were written unsteered (:func:`~lm_eval_steer.runtime.interventions.answer_window_mask`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lm_eval_steer.runtime import interventions
from lm_eval_steer.runtime.stopping import Decode, StopTracker
from lm_eval_steer.runtime.vectorfile import SteeringEntry

# Attribute paths of the decoder-layer list in common architectures, tried before the generic search.
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma/Gemma2, Phi-3, SmolLM
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
)


#: ``_Op.windows`` stop of a row without ``stop_after_tokens``: beyond any column.
NO_TOKEN_LIMIT = 1 << 40


class SteeringError(ValueError):
    """The steering configuration does not fit the model or the batch."""


def decoder_config(config: Any) -> Any:
    """The part of a model config that describes the decoder stack (multimodal configs keep it in
    ``text_config``)."""
    return getattr(config, "text_config", None) or config


def text_config(model: nn.Module) -> Any:
    """The config that describes a model's decoder stack (:func:`decoder_config` of its config)."""
    return decoder_config(getattr(model, "config", None))


def _num_layers(model: nn.Module) -> int | None:
    config = text_config(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (whose outputs are the residual stream after each layer).

    Known attribute paths first; otherwise the shallowest ``nn.ModuleList`` whose length equals the
    config's layer count and whose members share one class.
    """
    expected = _num_layers(model)
    for path in KNOWN_LAYER_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and (expected is None or len(module) == expected):
            return module
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (expected is None or len(module) == expected)
        and len({type(layer) for layer in module}) == 1
    ]
    if not candidates:
        raise SteeringError(f"cannot find the decoder layers of {type(model).__name__} (expected {expected} layers)")
    return min(candidates, key=lambda item: (item[0], item[1]))[2]


def _layer_placement(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    for parameter in layer.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


@dataclass
class _Op:
    """One intervention at one layer for the whole batch (zero vectors for rows it does not touch)."""

    mode: str
    positions: str
    vectors: torch.Tensor  # [rows, hidden]: s·v for add (strength folded in), unit û otherwise
    strengths: torch.Tensor  # [rows]: ones for add, s for project, zeros for ablate
    stops: list[tuple[str, ...]]  # per row: the entry's stop_after strings (empty: never stops)
    # [rows, 2]: per row (start_after_tokens or 0, stop_after_tokens or NO_TOKEN_LIMIT); None: no row has either
    windows: torch.Tensor | None = None


def compile_rows(rows: Sequence[Sequence[SteeringEntry]], hidden_size: int) -> dict[int, list[_Op]]:
    """Turns per-row entry lists into per-layer batched ops.

    Add-mode entries of one row at the same layer and positions are summed (addition commutes);
    each project/ablate entry, and each entry steered in part of the answer only (``stop_after``,
    ``stop_after_tokens`` or ``start_after_tokens``), gets its own op slot, applied in the order the
    entries are given.
    """
    slots: dict[tuple[int, str, str, bool, int], _Op] = {}
    for row, entries in enumerate(rows):
        used: dict[tuple[int, str, str, bool], int] = {}
        for entry in entries:
            if entry.vector.shape != (hidden_size,):
                raise SteeringError(f"entry {entry.name!r} has shape {tuple(entry.vector.shape)}, the model's hidden size is {hidden_size}")
            group = (entry.layer, entry.mode, entry.positions, entry.has_window)
            slot = 0 if entry.mode == "add" and not entry.has_window else used.get(group, 0)
            used[group] = slot + 1
            key = (*group, slot)
            if key not in slots:
                slots[key] = _Op(
                    mode=entry.mode,
                    positions=entry.positions,
                    vectors=torch.zeros(len(rows), hidden_size),
                    strengths=torch.ones(len(rows)) if entry.mode == "add" else torch.zeros(len(rows)),
                    stops=[()] * len(rows),
                )
            op = slots[key]
            op.stops[row] = entry.stop_after
            if entry.stop_after_tokens is not None or entry.start_after_tokens is not None:
                if op.windows is None:
                    op.windows = torch.tensor([[0, NO_TOKEN_LIMIT]]).repeat(len(rows), 1)
                op.windows[row] = torch.tensor([entry.start_after_tokens or 0, entry.stop_after_tokens or NO_TOKEN_LIMIT])
            vector = entry.vector.to("cpu", torch.float32)  # ops are compiled on the CPU, placed per layer later
            if entry.mode == "add":
                op.vectors[row] += entry.strength * vector
            else:
                op.vectors[row] = interventions.unit(vector)
                op.strengths[row] = entry.strength if entry.mode == "project" else 0.0
    by_layer: dict[int, list[_Op]] = {}
    for (layer, *_), op in slots.items():
        by_layer.setdefault(layer, []).append(op)
    return by_layer


class _BatchState:
    """What every layer hook needs to know about the current forward call."""

    def __init__(self, num_rows: int, prompt_lengths: Sequence[int] | None, skip_first_token: bool, stops: StopTracker | None) -> None:
        self.num_rows = num_rows
        self.stops = stops  # None when no entry can stop
        self.prompt_lengths = None if prompt_lengths is None else torch.tensor(list(prompt_lengths))
        self.skip_first_token = skip_first_token
        self.attention_mask: torch.Tensor | None = None
        self.batch_prompt_lengths: torch.Tensor | None = None  # per batch row (rows repeated), this forward call
        self.chunk_length = 0
        self.repeat = 1
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}

    def begin_forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int) -> None:
        """A forward call of ``tokens`` (ids or embeddings) that follows ``past_length`` cached columns
        (used only without an attention mask, which ``generate`` leaves out when nothing is padded)."""
        batch, chunk_length, device = tokens.shape[0], tokens.shape[1], tokens.device
        if batch % self.num_rows:
            raise SteeringError(f"steering was set up for {self.num_rows} rows but the model got a batch of {batch}")
        self.repeat = batch // self.num_rows  # generate() repeats rows for beams / num_return_sequences
        if attention_mask is None or attention_mask.dim() != 2:
            attention_mask = torch.ones(batch, past_length + chunk_length, dtype=torch.long, device=device)
        if self.prompt_lengths is None:
            self.prompt_lengths = torch.full((self.num_rows,), attention_mask.shape[1])
        self.attention_mask = attention_mask
        self.batch_prompt_lengths = self.prompt_lengths.repeat_interleave(self.repeat)
        self.chunk_length = chunk_length
        self._masks = {}
        if self.stops is not None:
            if tokens.dim() != 2:  # embeddings are [batch, seq, hidden]
                raise SteeringError("an entry with stop_after needs the model's input_ids (it was given inputs_embeds)")
            self.stops.observe(tokens.cpu(), attention_mask.cpu(), self.batch_prompt_lengths)

    def mask(self, op: _Op, device: torch.device) -> torch.Tensor:
        """Where ``op`` steers in this chunk: its positions, less the rows' stopped columns (by a
        ``stop_after`` string) and the columns outside their answer window (``start_after_tokens``,
        ``stop_after_tokens``)."""
        mask = self._position_mask(op.positions, device)
        if self.stops is not None and any(op.stops):
            mask = mask & self.stops.steered(op.stops, self.chunk_length).to(device)
        if op.windows is not None:
            assert self.attention_mask is not None and self.batch_prompt_lengths is not None
            window = interventions.answer_window_mask(self.attention_mask, self.batch_prompt_lengths, self.chunk_length, op.windows[:, 0], op.windows[:, 1])
            mask = mask & window.to(device)
        return mask

    def _position_mask(self, positions: str, device: torch.device) -> torch.Tensor:
        key = (positions, device)
        if key not in self._masks:
            assert self.attention_mask is not None and self.batch_prompt_lengths is not None
            mask = interventions.position_mask(
                self.attention_mask,
                self.batch_prompt_lengths,
                self.chunk_length,
                positions,
                self.skip_first_token,
            )
            self._masks[key] = mask.to(device)
        return self._masks[key]


def past_length(forward_kwargs: dict[str, Any]) -> int:
    """How many columns precede a forward call's chunk, for calls without an attention mask: the first
    position id (no mask means no padding), else the cache position, else the KV cache's length; a
    call with none of them reads a whole sequence."""
    for name in ("position_ids", "cache_position"):
        value = forward_kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.numel():
            return int(value.reshape(-1)[0])
    cache = forward_kwargs.get("past_key_values")
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


def _apply_ops(hidden: torch.Tensor, ops: list[_Op], state: _BatchState) -> torch.Tensor:
    for op in ops:
        mask = state.mask(op, hidden.device)
        if op.mode == "add":
            hidden = interventions.add(hidden, op.vectors, op.strengths, mask)
        elif op.mode == "project":
            hidden = interventions.project(hidden, op.vectors, op.strengths, mask)
        else:
            hidden = interventions.ablate(hidden, op.vectors, mask)
    return hidden


def _placed_ops(ops: list[_Op], device: torch.device, dtype: torch.dtype, repeat: int) -> list[_Op]:
    # Vectors live on their layer's device; add vectors also take its dtype (project math stays fp32).
    return [
        _Op(
            mode=op.mode,
            positions=op.positions,
            vectors=op.vectors.repeat_interleave(repeat, 0).to(device, dtype if op.mode == "add" else torch.float32),
            strengths=op.strengths.repeat_interleave(repeat, 0).to(device, torch.float32),
            stops=[stop for stop in op.stops for _ in range(repeat)],
            windows=None if op.windows is None else op.windows.repeat_interleave(repeat, 0).to(device),
        )
        for op in ops
    ]


@contextmanager
def steering(
    model: nn.Module,
    rows: Sequence[Sequence[SteeringEntry]],
    *,
    skip_first_token: bool = True,
    prompt_lengths: Sequence[int] | None = None,
    decode: Decode | None = None,
) -> Iterator[None]:
    """Steers row ``i`` of the next forward/generate call with ``rows[i]`` (see the module docstring).

    ``prompt_lengths`` (per row, in padded columns) tells where generated positions start; by default
    everything in the first forward call is prompt. With ``skip_first_token`` the first real token of
    every row is left unsteered. ``decode`` (token ids to text, e.g. the tokenizer's) is needed when
    an entry has ``stop_after``.
    """
    layers = find_decoder_layers(model)
    hidden_size = int(getattr(text_config(model), "hidden_size", 0) or 0)
    if not hidden_size:
        hidden_size = next((len(entry.vector) for entries in rows for entry in entries), 0)
    by_layer = compile_rows(rows, hidden_size)
    for layer in by_layer:
        if not 0 <= layer < len(layers):
            raise SteeringError(f"layer {layer} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    if not by_layer:
        yield
        return

    stopping = [entry.name for entries in rows for entry in entries if entry.stop_after]
    if stopping and decode is None:
        raise SteeringError(f"entry {stopping[0]!r} has stop_after, which needs the tokenizer's decode (none was given)")
    state = _BatchState(len(rows), prompt_lengths, skip_first_token, StopTracker(decode) if stopping and decode else None)
    placed: dict[tuple[int, int], list[_Op]] = {}

    def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        state.begin_forward(tokens, kwargs.get("attention_mask"), past_length(kwargs))

    def make_layer_hook(layer: int):
        device, dtype = _layer_placement(layers[layer])

        def after_layer(module: nn.Module, args: tuple, output: Any) -> Any:
            key = (layer, state.repeat)
            if key not in placed:
                placed[key] = _placed_ops(by_layer[layer], device, dtype, state.repeat)
            if isinstance(output, tuple):
                return (_apply_ops(output[0], placed[key], state), *output[1:])
            return _apply_ops(output, placed[key], state)

        return after_layer

    handles = [model.register_forward_pre_hook(before_forward, with_kwargs=True)]
    try:
        handles += [layers[layer].register_forward_hook(make_layer_hook(layer)) for layer in by_layer]
        yield
    finally:
        for handle in handles:
            handle.remove()
