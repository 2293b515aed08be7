"""The ``steered-hf`` model arguments, parsed strictly and the same way from every caller.

Values arrive typed by whoever parsed ``--model_args``: the ``lm_eval`` CLI turns ``true``/``false``
into bools, digits into ints, ``1.5``/``nan`` into floats and ``None`` into None; the Python API
(``simple_evaluate(model_args="...")``, ``handle_arg_string``) does the same and also turns ``none``
into None; Python callers pass objects. Each argument accepts exactly the spellings below in every
typed form, so the CLI and the API mean the same thing, and every refusal is one
:class:`ModelArgError` line that names the argument: ``steered-hf: scale='abc' is not a number``.

Arguments that are not steering arguments go on to the harness's ``HFLM`` and from there to
``from_pretrained``, which accepts many names; one that is a near miss of a steering argument
(``vector=``, ``Layer=``, ``stop-after=``) is refused instead of failing deep in the loader
(:func:`check_near_misses`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval_steer.core.errors import UserError, brief
from lm_eval_steer.core.paths import resolve_vectors
from lm_eval_steer.runtime.routing import ROUTES, Overrides
from lm_eval_steer.runtime.vectorfile import FLOAT32_MAX, MAX_LAYERS, MODES, POSITIONS

logger = logging.getLogger(__name__)

MODEL = "steered-hf"
# Separates several vector files in ``vectors=``: lm-eval splits model_args on commas, and ``+``
# needs no shell quoting. Existing files are never split, so ``a+b.safetensors`` works.
VECTOR_FILE_SEPARATOR = "+"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_INTEGER = re.compile(r"^[+-]?\d{1,9}$")
#: The model arguments ``steered-hf`` adds to ``HFLM``'s.
STEERING_ARGS = ("vectors", "layer", "scale", "mode", "positions", "stop_rules", "route", "skip_first_token", "unsteered_from", "steered_from")
#: Old spellings of steering arguments -> their names now (refused with the new name, never guessed).
RENAMED_ARGS = {"stop_after": "stop_rules"}


class ModelArgError(UserError, ValueError):
    """A ``steered-hf`` model argument that cannot be used; the message names it."""


def _refuse(name: str, value: Any, problem: str) -> ModelArgError:
    return ModelArgError(f"{MODEL}: {name}={brief(value)} {problem}")


def _split_paths(text: str) -> list[str]:
    """``text`` split at ``+``, except inside the longest run of parts that names an existing path."""
    parts = text.split(VECTOR_FILE_SEPARATOR)
    paths, start = [], 0
    while start < len(parts):
        end = next((end for end in range(len(parts), start, -1) if os.path.exists(VECTOR_FILE_SEPARATOR.join(parts[start:end]))), start + 1)
        paths.append(VECTOR_FILE_SEPARATOR.join(parts[start:end]))
        start = end
    return paths


def parse_vector_paths(vectors: Any) -> list[str]:
    """``vectors=``: nothing (None or ""), a path or packaged file name, several joined with ``+``, or a list."""
    if vectors is None or vectors == "":
        return []
    if isinstance(vectors, str):
        paths = _split_paths(vectors)
    elif isinstance(vectors, (list, tuple)) and all(isinstance(path, (str, os.PathLike)) for path in vectors):
        paths = [os.fspath(path) for path in vectors]
    else:
        raise _refuse("vectors", vectors, "is not a vector file path (give .safetensors files joined with +)")
    if not all(path.strip() for path in paths):
        raise _refuse("vectors", vectors, f"has an empty path (paths are joined with a single {VECTOR_FILE_SEPARATOR})")
    paths = [resolve_vectors(path) for path in paths]  # a packaged file's name stands for its path
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            warnings.warn(f"{MODEL}: vectors= names {brief(path, 200)} twice: its entries are applied twice", stacklevel=3)
        seen[real] = path
    return paths


def parse_choice(name: str, value: Any, choices: Sequence[str], none_means: str | None) -> str | None:
    """One of ``choices``; None (``none`` through the Python API, ``None`` on the CLI) means ``none_means``."""
    if value is None:
        return none_means
    if isinstance(value, str) and value in choices:
        return value
    raise _refuse(name, value, f"is not one of {', '.join(choices)}")


def parse_layer(value: Any) -> int | None:
    """An integer (``1.5`` and ``true`` are refused, not truncated; the CLI types ``-1`` as the float
    ``-1.0``, so a whole float counts); None keeps each entry's layer."""
    if value is None:
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER.match(value.strip()):
        number = int(value)
    if number is None:
        raise _refuse("layer", value, "is not an integer")
    if abs(number) > MAX_LAYERS:
        raise _refuse("layer", value, "is out of range")
    return number


def parse_scale(value: Any) -> float:
    """A number that is finite in float32 (``nan`` and ``inf`` would make every answer empty)."""
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
        except OverflowError:  # an int of hundreds of digits
            number = math.inf
    if number is None:
        raise _refuse("scale", value, "is not a number")
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise _refuse("scale", value, "is not a finite number")
    return number


def parse_flag(name: str, value: Any) -> bool:
    """true/false/1/0/yes/no/on/off in any case, or a bool (anything else is refused, never guessed)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise _refuse(name, value, f"is not a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


@dataclass(frozen=True)
class SteeringArgs:
    """The steering model arguments, parsed."""

    vector_paths: tuple[str, ...]
    route: str
    overrides: Overrides
    skip_first_token: bool


def parse_steering_args(
    vectors: Any, layer: Any, scale: Any, mode: Any, positions: Any, route: Any, skip_first_token: Any, stop_rules: Any = True
) -> SteeringArgs:
    """Every steering argument checked (before any weights load); raises :class:`ModelArgError`.

    ``none`` in any case means None for every argument, as the Python API's parser makes it (the
    CLI's parser keeps it a string)."""
    vectors, layer, scale, mode, positions, route, skip_first_token, stop_rules = (
        None if isinstance(value, str) and value.strip().lower() == "none" else value
        for value in (vectors, layer, scale, mode, positions, route, skip_first_token, stop_rules)
    )
    return SteeringArgs(
        vector_paths=tuple(parse_vector_paths(vectors)),
        route=str(parse_choice("route", route, ROUTES, none_means="none")),
        overrides=Overrides(
            layer=parse_layer(layer),
            scale=parse_scale(scale),
            mode=parse_choice("mode", mode, MODES, none_means=None),
            positions=parse_choice("positions", positions, POSITIONS, none_means=None),
            stop_rules=parse_flag("stop_rules", stop_rules),
        ),
        skip_first_token=parse_flag("skip_first_token", skip_first_token),
    )


def edit_distance(first: str, second: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn ``first`` into ``second``."""
    previous2: list[int] = []
    previous = list(range(len(second) + 1))
    for i, a in enumerate(first, 1):
        current = [i]
        for j, b in enumerate(second, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b))
            if i > 1 and j > 1 and a == second[j - 2] and first[i - 2] == b:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def near_miss(name: str) -> str | None:
    """The steering argument ``name`` was probably meant to be, or None.

    Case and ``-`` for ``_`` are ignored; then one edit is a near miss of a short name (``mode``,
    ``layer``, ``scale``, ``route``) and two of a longer one. Short names get one only: two edits
    turn ``layer`` into ``n_layer``, a config attribute a user may mean to override."""
    normal = name.strip().lower().replace("-", "_")
    scored = [(edit_distance(normal, known), known) for known in STEERING_ARGS]
    distance, known = min(scored)
    return known if distance <= (1 if len(known) <= 5 else 2) else None


def check_near_misses(names: Iterable[str], passed_on: Collection[str]) -> None:
    """Refuses a model argument that would go on to ``HFLM`` but is an old spelling
    (:data:`RENAMED_ARGS`) or a near miss of a steering argument. ``passed_on`` holds the names that are never refused: those ``HFLM`` itself takes,
    and the model config's own attributes (``from_pretrained`` overrides them: GPT-2's
    ``n_positions`` is two edits from ``positions``)."""
    for name in names:
        if name in RENAMED_ARGS:
            raise ModelArgError(f"{MODEL}: {name}= is now called {RENAMED_ARGS[name]}= (on|off)")
        if not isinstance(name, str) or name in passed_on or name in STEERING_ARGS:
            continue
        meant = near_miss(name)
        if meant is not None:
            raise ModelArgError(f"{MODEL}: unknown argument {brief(name)}: did you mean {meant}=?")


def check_local_model(pretrained: Any, where: str = MODEL) -> None:
    """A ``pretrained=`` written as a local path (absolute, ``./``, ``~``, or more than one ``/``)
    must be a directory; hub ids (``org/name``) are left to the loader."""
    if not isinstance(pretrained, str) or not (pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1):
        return
    if not os.path.isdir(os.path.expanduser(pretrained)):
        raise ModelArgError(f"{where}: pretrained={brief(pretrained, 200)}: no such model directory")


def check_layer_override(layer: int | None, num_layers: int) -> None:
    """``layer=`` must name one of the model's decoder layers."""
    if layer is not None and not 0 <= layer < num_layers:
        raise _refuse("layer", layer, f"is out of range for a {num_layers}-layer model (0..{num_layers - 1})")


def config_before_loading(pretrained: Any, kwargs: dict[str, Any]) -> Any | None:
    """The model config, read as ``HFLM`` reads it but before any weights load (for a GGUF file, only
    its metadata); None when it cannot be read here: ``HFLM``'s own load then reports why, and the
    checks that need the config run on the loaded model instead."""
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)  # an already loaded model
    from transformers import AutoConfig

    try:
        # The very arguments HFLM._get_config passes, so this reads nothing HFLM would not.
        return AutoConfig.from_pretrained(
            pretrained,
            revision=str(kwargs.get("revision", "main")),
            trust_remote_code=kwargs.get("trust_remote_code", False),
            gguf_file=kwargs.get("gguf_file"),
            subfolder=kwargs.get("subfolder", ""),
        )
    except Exception as error:  # noqa: BLE001 - an early read that fails must change nothing about the load
        logger.debug("model config not readable before loading (%s); checking the loaded model instead", error)
        return None
