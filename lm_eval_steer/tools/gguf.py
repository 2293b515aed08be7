"""Export to and import from llama.cpp's control-vector GGUF (the format repeng also writes).

A control-vector GGUF has ``general.architecture = "controlvector"``, a ``controlvector.model_hint``
string, ``controlvector.layer_count``, and one 1-D float32 tensor ``direction.<L>`` of length
``hidden_size`` per steered layer. llama.cpp adds ``direction.<L>`` (times its
``--control-vector-scaled`` factor) to the output of layer ``L`` at every position of every prompt,
and refuses a file that holds ``direction.0`` (its layer numbers start at 1).

Export is exact or refused: a control vector is one fixed vector per layer for every document and
position, so only ``add``-mode entries at layers >= 1 with ``positions=all`` and no answer-window rule (``stop_after``, ``stop_after_tokens``, ``start_after_tokens``)
export, with their strength folded in. What would silently change meaning needs an explicit choice: an entry with a
``strength_rule`` needs ``--strength S``; several entries (summed per layer, as llama.cpp sums
several files) need ``--sum`` when they share a layer or are routed to different documents.
``--entry NAME`` takes a set of vectors trained jointly whole: ``NAME`` and its ``NAME@L<layer>``
entries (:mod:`lm_eval_steer.runtime.entrysets`), one layer each.
(``steered-hf`` leaves each row's first token alone by default; llama.cpp steers it too.)

Import is at least as strict as llama.cpp: ``direction.<L>`` names with ``L >= 1`` only, 1-D float32
tensors of one length, which must match ``--hidden-size`` (or the ``config.json`` of a ``--model``
directory) when given; a truncated or malformed GGUF is a one-line :class:`VectorFileError`.

    lm-eval-steer gguf export fmt.safetensors fmt.gguf [--entry NAME ...] [--strength S] [--sum]
    lm-eval-steer gguf import fmt.gguf fmt.safetensors --num-layers 30 [--hidden-size 576] [--instruction-id ID]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lm_eval_steer.core.atomic import atomic_write
from lm_eval_steer.core.console import fail
from lm_eval_steer.core.errors import brief
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.vectorfile import (
    FLOAT32_MAX,
    AppliesTo,
    SteeringEntry,
    VectorFile,
    VectorFileError,
    load_vector_file,
    save_vector_file,
)

ARCHITECTURE = "controlvector"
DIRECTION = re.compile(r"^direction\.(\d+)$")


def _chosen(vector_file: VectorFile, names: Sequence[str] | None) -> list[SteeringEntry]:
    where = vector_file.path or "<vector file>"
    known = {entry.name: entry for entry in vector_file.entries}
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise VectorFileError(f"{where}: no entry named {brief(unknown[0])} (it has {len(known)}: {brief(list(known), 120)})")
    if not names:
        return list(vector_file.entries)
    # a name takes its entry and, for a jointly trained set, the set's further layers
    picked = {entry.name: entry for name in names for entry in vector_file.entries if name in (entry.name, set_name(entry.name))}
    return list(picked.values())


def control_vectors(vector_file: VectorFile, names: Sequence[str] | None = None, strength: float | None = None, sum_entries: bool = False) -> dict[int, np.ndarray]:
    """``{layer: Σ s·v}`` over the chosen entries (all by default), refusing what llama.cpp would
    apply differently (see the module docstring); ``strength`` replaces every chosen entry's."""
    chosen = _chosen(vector_file, names)
    where = vector_file.path or "<vector file>"
    for entry in chosen:
        problem = (
            f"'{entry.mode}' mode cannot be exported: llama.cpp control vectors are added (choose add-mode entries with --entry)" if entry.mode != "add"
            else "layer 0 cannot be exported: llama.cpp refuses direction.0" if entry.layer == 0
            else f"positions={entry.positions} cannot be exported: llama.cpp steers every position" if entry.positions != "all"
            else "stop_after cannot be exported: llama.cpp steers to the end of the answer" if entry.stop_after
            else "stop_after_tokens cannot be exported: llama.cpp steers to the end of the answer" if entry.stop_after_tokens is not None
            else "start_after_tokens cannot be exported: llama.cpp steers from the first prompt token on" if entry.start_after_tokens is not None
            else "its strength follows a strength_rule, which llama.cpp cannot: give one --strength S" if strength is None and entry.applies_to and entry.applies_to.strength_rule
            else None
        )
        if problem:
            raise VectorFileError(f"{where}: entry {brief(entry.name)}: {problem}")
    layers = [entry.layer for entry in chosen]
    routes = {json.dumps(entry.applies_to.to_json() if entry.applies_to else None, sort_keys=True) for entry in chosen}
    if len(chosen) > 1 and not sum_entries and (len(set(layers)) < len(layers) or len(routes) > 1):
        raise VectorFileError(
            f"{where}: {len(chosen)} entries {'share a layer' if len(set(layers)) < len(layers) else 'are routed to different documents'}; "
            "a control vector would apply their sum to every document: pick one with --entry NAME, or pass --sum to export the sum"
        )
    per_layer: dict[int, torch.Tensor] = {}
    for entry in chosen:
        scaled = (entry.strength if strength is None else strength) * entry.vector
        per_layer[entry.layer] = per_layer.get(entry.layer, torch.zeros_like(entry.vector)) + scaled
    return {layer: vector.numpy().astype(np.float32) for layer, vector in sorted(per_layer.items())}


def export_gguf(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    strength: float | None = None,
    sum_entries: bool = False,
) -> dict[int, np.ndarray]:
    """Writes the chosen add-mode entries of a vector file as a control-vector GGUF (atomically)."""
    import gguf

    vector_file = load_vector_file(source)
    directions = control_vectors(vector_file, names, strength, sum_entries)
    if not all(np.isfinite(vector).all() for vector in directions.values()):
        raise VectorFileError(f"{source}: the exported vectors overflow float32 (strength x vector)")

    def write(temp_path: str) -> None:
        writer = gguf.GGUFWriter(temp_path, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", vector_file.model)
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(directions))
        for layer, vector in directions.items():
            writer.add_tensor(f"direction.{layer}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(target, write)
    return directions


def _directions(reader: object, where: str) -> dict[int, np.ndarray]:
    """``{layer: vector}`` of a control-vector GGUF, checked as strictly as llama.cpp reads it."""
    import gguf

    architecture = reader.get_field("general.architecture")  # type: ignore[attr-defined]
    found = architecture.contents() if architecture is not None else None
    if found != ARCHITECTURE:
        raise VectorFileError(f"{where}: general.architecture is {brief(found)}, expected {ARCHITECTURE!r}")
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:  # type: ignore[attr-defined]
        match = DIRECTION.match(tensor.name)
        if match is None or int(match.group(1)) < 1:
            raise VectorFileError(f"{where}: unexpected tensor {brief(tensor.name)} (expected direction.<layer> with layer >= 1, as llama.cpp requires)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise VectorFileError(f"{where}: tensor {tensor.name}: {tensor.tensor_type.name} of shape {tuple(int(n) for n in tensor.shape)}, expected a 1-D F32 vector")
        layer = int(match.group(1))
        if layer in directions:
            raise VectorFileError(f"{where}: tensor {tensor.name} appears twice")
        directions[layer] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not directions:
        raise VectorFileError(f"{where}: no direction.<layer> tensors")
    return directions


def import_gguf(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    num_layers: int | None = None,
    instruction_id: str | None = None,
    model: str | None = None,
    hidden_size: int | None = None,
) -> VectorFile:
    """Turns a control-vector GGUF into a vector file: one ``add`` entry (strength 1) per direction.

    ``model``: the name to record; a local model directory also gives the expected hidden size and
    layer count (its ``config.json``). ``hidden_size``/``num_layers``: the model's, checked."""
    import gguf

    where = str(source)
    model_dir = ModelShape.of_model_dir(model)
    num_layers = num_layers if num_layers is not None else model_dir.num_layers if model_dir is not None else None
    if num_layers is None:
        raise VectorFileError(f"{where}: give --num-layers (or --model with a local model directory)")
    try:
        reader = gguf.GGUFReader(where)
        hint = reader.get_field(f"{ARCHITECTURE}.model_hint")
        directions = _directions(reader, where)
        hint_text = hint.contents() if hint is not None else ""
    except (OSError, ValueError, IndexError, KeyError, TypeError, struct.error) as error:
        if isinstance(error, VectorFileError):
            raise
        raise VectorFileError(f"{where}: not a readable GGUF file (truncated or malformed: {brief(f'{type(error).__name__}: {error}', 100)})") from None
    lengths = {len(vector) for vector in directions.values()}
    if len(lengths) != 1:
        raise VectorFileError(f"{where}: directions have different lengths {sorted(lengths)}")
    length = lengths.pop()
    imported = ModelShape("", length, num_layers)  # the directions' length, and --num-layers
    for expected in (ModelShape("--hidden-size", hidden_size, None), model_dir):
        if expected is not None:
            check_compatible(imported, expected, source=where)
    applies_to = AppliesTo(instruction_id) if instruction_id else None
    entries = [SteeringEntry(f"direction.{layer}", torch.from_numpy(vector), layer, "add", 1.0, "all", applies_to) for layer, vector in sorted(directions.items())]
    return save_vector_file(
        target,
        entries,
        model=(model if model and model_dir is None else "") or str(hint_text) or Path(where).stem,
        hidden_size=length,
        num_layers=num_layers,
        extra_metadata={"imported_from": Path(where).name},
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="vector file -> llama.cpp control-vector GGUF")
    export.add_argument("source", help="lm-eval-steer vector file (.safetensors)")
    export.add_argument("target", help="GGUF file to write")
    export.add_argument("--entry", "--entries", dest="entries", nargs="+", action="extend", metavar="NAME", help="add-mode entries to export (default: all)")
    export.add_argument("--strength", type=float, help="export every chosen entry at this strength (needed for entries with a strength_rule)")
    export.add_argument("--sum", dest="sum_entries", action="store_true", help="allow several entries per layer or routed to different documents: exported as their sum")
    imported = actions.add_parser("import", help="llama.cpp / repeng control-vector GGUF -> vector file")
    imported.add_argument("source", help="control-vector GGUF file")
    imported.add_argument("target", help="vector file to write (.safetensors)")
    imported.add_argument("--num-layers", type=int, help="decoder layer count of the model it is for (default: from --model's config.json)")
    imported.add_argument("--hidden-size", type=int, help="the model's hidden size: the directions must have this length")
    imported.add_argument("--instruction-id", help="route it to documents with this IFEval instruction id (default: every document)")
    imported.add_argument("--model", help="model name to record, or a local model directory whose config.json is checked (default: the GGUF's model_hint)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "export":
            if args.strength is not None and not abs(args.strength) <= FLOAT32_MAX:
                raise VectorFileError(f"--strength {args.strength} is not finite in float32")
            directions = export_gguf(args.source, args.target, args.entries, args.strength, args.sum_entries)
            print(f"wrote {args.target}: layers {', '.join(map(str, directions))}")
        else:
            vector_file = import_gguf(args.source, args.target, args.num_layers, args.instruction_id, args.model, args.hidden_size)
            print(f"wrote {args.target}: {len(vector_file.entries)} add-mode entries")
    except VectorFileError as error:
        return fail("gguf", error)
    return 0
