"""Export to and import from llama.cpp's control-vector GGUF (the format repeng also writes).

A control-vector GGUF has ``general.architecture = "controlvector"``, a ``controlvector.model_hint``
string, ``controlvector.layer_count``, and one float32 tensor ``direction.<L>`` of length
``hidden_size`` per steered layer. llama.cpp adds ``direction.<L>`` (times its
``--control-vector-scaled`` factor) to the output of layer ``L`` at every position, and ignores
``direction.0``; so only ``add``-mode entries at layers ≥ 1 can be exported, with their strength
folded into the vector. Entries at the same layer are summed, as llama.cpp does with several files.

    lm-eval-steer gguf export fmt.safetensors fmt.gguf [--entries NAME ...]
    lm-eval-steer gguf import fmt.gguf fmt.safetensors --num-layers 30 [--instruction-id ID]
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lm_eval_steer.atomic import atomic_write
from lm_eval_steer.console import fail
from lm_eval_steer.runtime.vectorfile import (
    AppliesTo,
    SteeringEntry,
    VectorFile,
    VectorFileError,
    load_vector_file,
    save_vector_file,
)

ARCHITECTURE = "controlvector"
DIRECTION = re.compile(r"^direction\.(\d+)$")


def control_vectors(vector_file: VectorFile, names: Sequence[str] | None = None) -> dict[int, np.ndarray]:
    """``{layer: Σ s·v}`` over the chosen ``add`` entries (all of them by default)."""
    chosen = [vector_file.entry(name) for name in names] if names else list(vector_file.entries)
    where = vector_file.path or "<vector file>"
    per_layer: dict[int, torch.Tensor] = {}
    for entry in chosen:
        if entry.mode != "add":
            raise VectorFileError(f"{where}: entry {entry.name!r}: llama.cpp control vectors are added to the residual stream, so '{entry.mode}' mode cannot be exported (choose add-mode entries with --entries)")
        if entry.layer == 0:
            raise VectorFileError(f"{where}: entry {entry.name!r}: llama.cpp ignores direction.0, so layer 0 cannot be exported")
        per_layer[entry.layer] = per_layer.get(entry.layer, torch.zeros_like(entry.vector)) + entry.strength * entry.vector
    return {layer: vector.numpy().astype(np.float32) for layer, vector in sorted(per_layer.items())}


def export_gguf(source: str | os.PathLike[str], target: str | os.PathLike[str], names: Sequence[str] | None = None) -> dict[int, np.ndarray]:
    """Writes the chosen add-mode entries of a vector file as a control-vector GGUF (atomically)."""
    import gguf

    vector_file = load_vector_file(source)
    directions = control_vectors(vector_file, names)

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


def import_gguf(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    num_layers: int,
    instruction_id: str | None = None,
    model: str | None = None,
) -> VectorFile:
    """Turns a control-vector GGUF into a vector file: one ``add`` entry (strength 1) per direction."""
    import gguf

    where = str(source)
    try:
        reader = gguf.GGUFReader(where)
    except (OSError, ValueError) as error:
        raise VectorFileError(f"{where}: not a readable GGUF file ({error})") from None
    architecture = reader.get_field("general.architecture")
    if architecture is None or architecture.contents() != ARCHITECTURE:
        raise VectorFileError(f"{where}: general.architecture is {architecture.contents() if architecture else None!r}, expected {ARCHITECTURE!r}")
    hint = reader.get_field(f"{ARCHITECTURE}.model_hint")
    entries = []
    for tensor in reader.tensors:
        match = DIRECTION.match(tensor.name)
        if match is None:
            raise VectorFileError(f"{where}: unexpected tensor {tensor.name!r} (expected direction.<layer>)")
        vector = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).reshape(-1).copy())
        applies_to = AppliesTo(instruction_id) if instruction_id else None
        entries.append(SteeringEntry(tensor.name, vector, int(match.group(1)), "add", 1.0, "all", applies_to))
    if not entries:
        raise VectorFileError(f"{where}: no direction.<layer> tensors")
    hidden_sizes = {len(entry.vector) for entry in entries}
    if len(hidden_sizes) != 1:
        raise VectorFileError(f"{where}: directions have different lengths {sorted(hidden_sizes)}")
    return save_vector_file(
        target,
        sorted(entries, key=lambda entry: entry.layer),
        model=model or (hint.contents() if hint else "") or Path(where).stem,
        hidden_size=hidden_sizes.pop(),
        num_layers=num_layers,
        extra_metadata={"imported_from": Path(where).name},
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="vector file -> llama.cpp control-vector GGUF")
    export.add_argument("source", help="lm-eval-steer vector file (.safetensors)")
    export.add_argument("target", help="GGUF file to write")
    export.add_argument("--entries", nargs="+", help="add-mode entries to export (default: all)")
    imported = actions.add_parser("import", help="llama.cpp / repeng control-vector GGUF -> vector file")
    imported.add_argument("source", help="control-vector GGUF file")
    imported.add_argument("target", help="vector file to write (.safetensors)")
    imported.add_argument("--num-layers", type=int, required=True, help="decoder layer count of the model it is for")
    imported.add_argument("--instruction-id", help="route it to documents with this IFEval instruction id (default: every document)")
    imported.add_argument("--model", help="model name to record (default: the GGUF's model_hint)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "export":
            directions = export_gguf(args.source, args.target, args.entries)
            print(f"wrote {args.target}: layers {', '.join(map(str, directions))}")
        else:
            vector_file = import_gguf(args.source, args.target, args.num_layers, args.instruction_id, args.model)
            print(f"wrote {args.target}: {len(vector_file.entries)} add-mode entries")
    except (VectorFileError, KeyError) as error:
        return fail("gguf", error)
    return 0
