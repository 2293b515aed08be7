"""Merge vector files into one: keep the best entries of several builds.

Files are read in order; an entry of a later file replaces the earlier file's entry of the same
name (a rebuild of some instructions overrides the old vectors for exactly those). A set of vectors
trained jointly (entries ``<name>``, ``<name>@L<layer>`` ..., see
:mod:`lm_eval_steer.runtime.entrysets`) is replaced as one unit: a later file's ``<name>`` or
``<name>@L<layer>`` removes every earlier entry of the set, so no stale layer of an old set is left
beside a new vector. All files must be for the same model, hidden size and layer count. Entries with
different names that are routed to the same documents (the same ``applies_to``, whatever their
``not_with`` lists) would both steer
those documents, which is almost never what a merge means, so that is refused unless ``--stack``
allows it (the entries of one set are meant to steer together and pass, and so do entries that one
source file already stacks).

The merged file records where each entry came from, as ``merged_from`` metadata: per source file
its path, sha256, the entries taken from it and its own metadata (a builder's settings and training
curves stay with the vectors they describe).

    lm-eval-steer merge old.safetensors rebuilt.safetensors --out best.safetensors
    lm-eval-steer merge smollm2-135m-instruct rebuilt.safetensors --out best.safetensors   # a packaged file by name

A source may be narrowed to the entries whose names match a glob, written after ``#``:
``keywords.safetensors#keywords:forbidden_words:*`` takes only that file's exclusion entries. A
source ending in ``*M`` (a number above 0; after a glob that ends in ``*``, write ``#GLOB**M``) takes its
entries at ``M`` times their strength
(:meth:`~lm_eval_steer.runtime.vectorfile.SteeringEntry.scaled`: what the runtime's ``scale=M`` does,
made permanent for those entries only); ``merged_from`` records the scale.

    lm-eval-steer merge smollm2-135m-instruct 'lowercase.safetensors*1.25' --out stronger.safetensors
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lm_eval_steer.core.paths import resolve_vectors
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.vectorfile import ScaleError, SteeringEntry, VectorFile, VectorFileError, load_vector_file, save_vector_file, split_scale


def _check_not_stacked(chosen: dict[str, tuple[SteeringEntry, int]]) -> None:
    """Refuses two differently named entries from *different* source files that are routed to the
    same documents; entries one source file already stacks (the packaged files' entries against
    looping beside their instructions' own) were stacked on purpose and pass."""
    routed: dict[str, list[tuple[str, int]]] = {}
    for name, (entry, index) in chosen.items():
        # not_with only narrows the documents: entries that differ in it alone still meet on the rest
        applies_to = None if entry.applies_to is None else replace(entry.applies_to, not_with=()).to_json()
        key = json.dumps(applies_to, sort_keys=True)
        for other, other_index in routed.get(key, []):
            if other_index != index and set_name(other) != set_name(name):
                raise VectorFileError(
                    f"entries {other!r} and {name!r} are routed to the same documents ({key}) and would both steer them; "
                    "give them the same name to replace one with the other, or pass --stack"
                )
        routed.setdefault(key, []).append((name, index))


@dataclass(frozen=True)
class Source:
    """One command-line source: ``FILE[#GLOB][*SCALE]``."""

    path: str
    pattern: str = "*"
    scale: float | None = None

    @property
    def label(self) -> str:
        """The path, with `` ×SCALE`` when the source is scaled."""
        return self.path if self.scale is None else f"{self.path} ×{self.scale:g}"


def split_source(source: str) -> Source:
    """``FILE#GLOB*SCALE`` -> Source(FILE, GLOB, SCALE); without ``#GLOB`` every entry is taken (``*``),
    without ``*SCALE`` (a number) each at its own strength. ``FILE`` may be a packaged file's name
    (:func:`~lm_eval_steer.core.paths.resolve_vectors`)."""
    try:
        rest, scale = split_scale(source)
    except ScaleError as error:
        raise VectorFileError(f"{source}: {error}") from None
    path, _, pattern = rest.partition("#")
    if not path or (rest.count("#") and not pattern):
        raise VectorFileError(f"{source}: write a source as FILE, FILE#GLOB (entry names matching GLOB) or either with *SCALE")
    return Source(resolve_vectors(path, argument=""), pattern or "*", scale)


def merge(sources: Sequence[str], out: str, stack: bool = False) -> tuple[VectorFile, dict[str, str]]:
    """Writes the merged file; returns it and, per entry name, the source it was taken from (its path,
    and its scale if it has one)."""
    selected = [split_source(source) for source in sources]
    files = [load_vector_file(source.path) for source in selected]
    for other in files[1:]:  # the merged file records one model
        check_compatible(other, ModelShape.of_file(files[0]), same_name=True)
    chosen: dict[str, tuple[SteeringEntry, int]] = {}  # name -> (entry, index of its source)
    for index, (vector_file, source) in enumerate(zip(files, selected)):
        taken = [entry for entry in vector_file.entries if fnmatch.fnmatchcase(entry.name, source.pattern)]
        if not taken:
            hint = "" if source.scale is None else " (the number after the last * was read as a scale; write #GLOB**SCALE for a glob ending in *)"
            raise VectorFileError(f"{vector_file.path}: no entry name matches {source.pattern!r}{hint}")
        if source.scale is not None:
            taken = [entry.scaled(source.scale) for entry in taken]
        replaced = {set_name(entry.name) for entry in taken}
        for name in [name for name in chosen if set_name(name) in replaced]:
            del chosen[name]  # a replaced entry (or set) moves to its new file's place in the order
        chosen.update((entry.name, (entry, index)) for entry in taken)
    if not stack:
        _check_not_stacked(chosen)
    records = [
        {
            "path": vector_file.path,
            "sha256": vector_file.sha256,
            "entries": [name for name, (_, taken_from) in chosen.items() if taken_from == index],
            **({} if source.scale is None else {"scale": source.scale}),  # unscaled merges record what they always did
            "metadata": dict(vector_file.extra_metadata),
        }
        for index, (vector_file, source) in enumerate(zip(files, selected))
    ]
    merged = save_vector_file(
        out,
        [entry for entry, _ in chosen.values()],
        model=files[0].model,
        hidden_size=files[0].hidden_size,
        num_layers=files[0].num_layers,
        extra_metadata={"merged_from": json.dumps(records)},
    )
    return merged, {name: selected[index].label for name, (_, index) in chosen.items()}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="vector files (.safetensors) or packaged names, each optionally FILE#GLOB to take only the entries whose names match, and/or ending in *SCALE to take them at SCALE times their strength; a later file's entry replaces an earlier one of the same name")
    parser.add_argument("--out", required=True, help="merged vector file to write (atomically)")
    parser.add_argument("--stack", action="store_true", help="allow differently named entries routed to the same documents (they add up)")


def run(args: argparse.Namespace) -> int:
    if Path(args.out).resolve() in {Path(split_source(source).path).resolve() for source in args.files}:
        raise VectorFileError(f"--out {args.out}: is one of the input files; write the merge to a new file")
    merged, taken_from = merge(args.files, args.out, args.stack)
    for name, source in taken_from.items():
        print(f"{name}\t<- {source}")
    print(f"wrote {args.out}: {len(merged.entries)} entries from {len(set(taken_from.values()))} of {len(args.files)} files")
    return 0
