"""Merge vector files into one: keep the best entries of several builds.

Files are read in order; an entry of a later file replaces the earlier file's entry of the same
name (a rebuild of some instructions overrides the old vectors for exactly those). A set of vectors
trained jointly (entries ``<name>``, ``<name>@L<layer>`` ..., see
:mod:`lm_eval_steer.runtime.entrysets`) is replaced as one unit: a later file's ``<name>`` or
``<name>@L<layer>`` removes every earlier entry of the set, so no stale layer of an old set is left
beside a new vector. All files must be for the same model, hidden size and layer count. Entries with
different names that are routed to the same documents (the same ``applies_to``) would both steer
those documents, which is almost never what a merge means, so that is refused unless ``--stack``
allows it (the entries of one set are meant to steer together and pass).

The merged file records where each entry came from, as ``merged_from`` metadata: per source file
its path, sha256, the entries taken from it and its own metadata (a builder's settings and training
curves stay with the vectors they describe).

    lm-eval-steer merge old.safetensors rebuilt.safetensors --out best.safetensors
    lm-eval-steer merge smollm2-135m-instruct rebuilt.safetensors --out best.safetensors   # a packaged file by name

A source may be narrowed to the entries whose names match a glob, written after ``#``: 
``keywords.safetensors#keywords:forbidden_words:*`` takes only that file's exclusion entries.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

from lm_eval_steer.core.paths import resolve_vectors
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.vectorfile import SteeringEntry, VectorFile, VectorFileError, load_vector_file, save_vector_file


def _check_not_stacked(chosen: dict[str, tuple[SteeringEntry, VectorFile]]) -> None:
    routed: dict[str, str] = {}
    for name, (entry, _) in chosen.items():
        key = json.dumps(None if entry.applies_to is None else entry.applies_to.to_json(), sort_keys=True)
        if key in routed and set_name(routed[key]) != set_name(name):
            raise VectorFileError(
                f"entries {routed[key]!r} and {name!r} are routed to the same documents ({key}) and would both steer them; "
                "give them the same name to replace one with the other, or pass --stack"
            )
        routed.setdefault(key, name)


def split_source(source: str) -> tuple[str, str]:
    """``FILE#GLOB`` -> (FILE, GLOB); a plain ``FILE`` takes every entry (``*``). ``FILE`` may be a
    packaged file's name (:func:`~lm_eval_steer.core.paths.resolve_vectors`)."""
    path, _, pattern = source.partition("#")
    if not path or (source.count("#") and not pattern):
        raise VectorFileError(f"{source}: write a source as FILE or FILE#GLOB (entry names matching GLOB)")
    return resolve_vectors(path, argument=""), pattern or "*"


def merge(sources: Sequence[str], out: str, stack: bool = False) -> tuple[VectorFile, dict[str, str]]:
    """Writes the merged file; returns it and, per entry name, the source path it was taken from."""
    selected = [split_source(source) for source in sources]
    files = [load_vector_file(path) for path, _ in selected]
    for other in files[1:]:  # the merged file records one model
        check_compatible(other, ModelShape.of_file(files[0]), same_name=True)
    chosen: dict[str, tuple[SteeringEntry, VectorFile]] = {}
    for vector_file, (_, pattern) in zip(files, selected):
        taken = [entry for entry in vector_file.entries if fnmatch.fnmatchcase(entry.name, pattern)]
        if not taken:
            raise VectorFileError(f"{vector_file.path}: no entry name matches {pattern!r}")
        replaced = {set_name(entry.name) for entry in taken}
        for name in [name for name in chosen if set_name(name) in replaced]:
            del chosen[name]  # a replaced entry (or set) moves to its new file's place in the order
        chosen.update((entry.name, (entry, vector_file)) for entry in taken)
    if not stack:
        _check_not_stacked(chosen)
    sources = [
        {
            "path": vector_file.path,
            "sha256": vector_file.sha256,
            "entries": [name for name, (_, source) in chosen.items() if source is vector_file],
            "metadata": dict(vector_file.extra_metadata),
        }
        for vector_file in files
    ]
    merged = save_vector_file(
        out,
        [entry for entry, _ in chosen.values()],
        model=files[0].model,
        hidden_size=files[0].hidden_size,
        num_layers=files[0].num_layers,
        extra_metadata={"merged_from": json.dumps(sources)},
    )
    return merged, {name: str(source.path) for name, (_, source) in chosen.items()}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="vector files (.safetensors), each optionally FILE#GLOB to take only the entries whose names match; a later file's entry replaces an earlier one of the same name")
    parser.add_argument("--out", required=True, help="merged vector file to write (atomically)")
    parser.add_argument("--stack", action="store_true", help="allow differently named entries routed to the same documents (they add up)")


def run(args: argparse.Namespace) -> int:
    if Path(args.out).resolve() in {Path(split_source(source)[0]).resolve() for source in args.files}:
        raise VectorFileError(f"--out {args.out}: is one of the input files; write the merge to a new file")
    merged, taken_from = merge(args.files, args.out, args.stack)
    for name, source in taken_from.items():
        print(f"{name}\t<- {source}")
    print(f"wrote {args.out}: {len(merged.entries)} entries from {len(set(taken_from.values()))} of {len(args.files)} files")
    return 0
