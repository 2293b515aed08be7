"""Whether steering vectors fit a model: the one check that the runtime (before any weights load),
the builder (its build model against its search model), ``merge`` (each file against the first) and
``gguf import`` (the directions against a local model directory) all use.

Vectors move between models of one shape, e.g. an instruct model and its base model: a different
hidden size or decoder-layer count is an error, a different name only a warning, or an error where
the caller must record one name for all (``merge`` writes one ``model`` field).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lm_eval_steer.core.errors import brief
from lm_eval_steer.runtime.hooks import decoder_config, find_decoder_layers, text_config
from lm_eval_steer.runtime.vectorfile import VectorFile, VectorFileError


class ModelMismatchError(VectorFileError):
    """Vectors and a model (or two vector files) of different shapes; the message names both."""


@dataclass(frozen=True)
class ModelShape:
    """What a vector must fit. ``None`` for a size means "unknown here, not checked"."""

    name: str
    hidden_size: int | None
    num_layers: int | None

    @classmethod
    def of_file(cls, vector_file: VectorFile) -> ModelShape:
        """The model a vector file says it was built on."""
        return cls(vector_file.model, vector_file.hidden_size, vector_file.num_layers)

    @classmethod
    def of_config(cls, config: Any, name: str = "") -> ModelShape | None:
        """The decoder's shape in a transformers config, or in its ``config.json`` read as a dict (a
        multimodal config keeps the decoder in ``text_config``); None when it does not give both sizes
        as integers."""
        decoder = (config.get("text_config") or config) if isinstance(config, dict) else decoder_config(config)
        read = decoder.get if isinstance(decoder, dict) else lambda key: getattr(decoder, key, None)
        hidden, layers = read("hidden_size"), read("num_hidden_layers")
        if all(isinstance(size, int) and not isinstance(size, bool) for size in (hidden, layers)):
            return cls(name, hidden, layers)
        return None

    @classmethod
    def of_model(cls, model: nn.Module, name: str) -> ModelShape:
        """A loaded model: its decoder's hidden size and the decoder layers the hooks would steer."""
        return cls(name, int(text_config(model).hidden_size), len(find_decoder_layers(model)))

    @classmethod
    def of_model_dir(cls, model: str | None) -> ModelShape | None:
        """The shape in the ``config.json`` of a local model directory; None when ``model`` is not one."""
        config_path = Path(model) / "config.json" if model else None
        if config_path is None or not config_path.is_file():
            return None
        try:
            shape = cls.of_config(json.loads(config_path.read_text(encoding="utf-8")), str(model))
        except (OSError, ValueError, AttributeError) as error:
            raise VectorFileError(f"{config_path}: not a readable config ({brief(str(error), 80)})") from None
        if shape is None:
            raise VectorFileError(f"{config_path}: no integer hidden_size/num_hidden_layers")
        return shape


def same_model_name(built_on: str, applied_to: str) -> bool:
    """Whether two model names plausibly name one model: the built-on name's last path part appears in
    the other, case-insensitively (a GGUF load is named after its folder and file, a hub model after
    its repository). An unknown (empty) name matches anything."""
    return not built_on or not applied_to or built_on.split("/")[-1].lower() in applied_to.lower()


def check_compatible(vectors: VectorFile | ModelShape, model: ModelShape, *, same_name: bool = False, source: str | None = None) -> None:
    """Raises :class:`ModelMismatchError` unless ``vectors`` (a vector file, or the shape of the model
    they are built on) fit ``model``: equal hidden size and layer count wherever both are known. A
    different name (:func:`same_model_name`) warns; with ``same_name`` the names must be equal.
    ``source`` names the vectors in messages (default: the file's path, or the model they are built on)."""
    built_on = ModelShape.of_file(vectors) if isinstance(vectors, VectorFile) else vectors
    if source is None:
        source = str(vectors.path) if isinstance(vectors, VectorFile) and vectors.path else f"vectors built on {built_on.name!r}"
    target = model.name or "the model"
    if None not in (built_on.hidden_size, model.hidden_size) and built_on.hidden_size != model.hidden_size:
        raise ModelMismatchError(f"{source}: built for hidden_size {built_on.hidden_size}, but {target} has hidden_size {model.hidden_size}")
    if None not in (built_on.num_layers, model.num_layers) and built_on.num_layers != model.num_layers:
        raise ModelMismatchError(f"{source}: built for {built_on.num_layers} layers, but {target} has {model.num_layers} layers")
    if same_name and built_on.name != model.name:
        raise ModelMismatchError(f"{source}: built on {built_on.name!r}, not on {model.name!r}")
    if not same_model_name(built_on.name, model.name):
        warnings.warn(f"{source}: built on {built_on.name!r}, applied to {model.name!r} (fine for a base/instruct pair with the same shapes; check this is intended)", stacklevel=2)
