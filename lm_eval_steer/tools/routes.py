"""Keep chosen entries of a vector file off documents that also carry another instruction.

    lm-eval-steer vectors exclude anti-looping.safetensors --entry 'keywords:existence:*' \\
        --not-with punctuation:no_comma --out anti-looping-no-comma-safe.safetensors

A vector acts on the whole answer, so an entry that helps its own instruction can cost a second
instruction of the same prompt (a direction against looping writes prose, and prose has commas).
``lm-eval-steer validate --paired-with ID`` measures that cost on validation questions; where it is
real, this command sets the entries' ``applies_to.not_with`` list, and under ``route=auto`` they no
longer steer a document with another instruction that one of those ids or globs matches
(``--not-with '*'``: any other instruction, for an entry validated on one-instruction questions only).
Every other field of the file is kept; the file's metadata records the change (``rerouted``: source
path and sha256, the entries and their new lists). ``--not-with none`` clears the lists.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lm_eval_steer.core.ifeval import instruction_ids
from lm_eval_steer.core.paths import resolve_vectors
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.vectorfile import SteeringEntry, VectorFile, VectorFileError, load_vector_file, metadata_json, save_vector_file


def keep_off(vector_file: VectorFile, pattern: str, not_with: Sequence[str]) -> tuple[list[SteeringEntry], list[str]]:
    """The file's entries with ``applies_to.not_with = not_with`` on those whose name (or, for a
    jointly trained set, the set's name) matches ``pattern``, and the names changed. Refuses, naming
    the file, a pattern that matches nothing, an entry that serves every document (it has no
    instruction to be kept off), and an id that is the entry's own instruction."""
    where = vector_file.path or "<vector file>"
    picked = [entry for entry in vector_file.entries if fnmatch.fnmatchcase(entry.name, pattern) or fnmatch.fnmatchcase(set_name(entry.name), pattern)]
    if not picked:
        raise VectorFileError(f"{where}: no entry name matches {pattern!r} (it has {len(vector_file.entries)})")
    for entry in picked:
        if entry.applies_to is None:
            raise VectorFileError(f"{where}: entry {entry.name!r} serves every document (no applies_to), so there is no instruction to keep it off")
        if entry.applies_to.instruction_id in not_with:
            raise VectorFileError(f"{where}: entry {entry.name!r}: --not-with {entry.applies_to.instruction_id} is its own instruction; it would serve no document")
    names = {entry.name for entry in picked}
    entries = [
        replace(entry, applies_to=replace(entry.applies_to, not_with=tuple(not_with))) if entry.name in names and entry.applies_to else entry
        for entry in vector_file.entries
    ]
    return entries, [entry.name for entry in picked]


def exclude(source: str, pattern: str, not_with_text: str, out: str) -> tuple[VectorFile, list[str]]:
    """Reads ``source`` (a path or packaged name), writes ``out`` atomically with the matched entries'
    ``not_with`` set to the ids of ``not_with_text`` (``"ID,ID"``; ``"none"`` clears), and returns the
    written file and the changed entry names."""
    path = resolve_vectors(source, argument="")
    if Path(out).resolve() == Path(path).resolve():
        raise VectorFileError(f"--out {out}: is the input file; write the result to a new file")
    clear = not_with_text.strip().lower() == "none"
    not_with = () if clear else instruction_ids(not_with_text, "--not-with", patterns=True)
    if not not_with and not clear:
        raise VectorFileError("--not-with: give IFEval instruction ids or globs separated by commas, or none to clear the lists")
    vector_file = load_vector_file(path)
    entries, changed = keep_off(vector_file, pattern, not_with)
    metadata = dict(vector_file.extra_metadata)
    history = metadata_json(metadata, "rerouted")
    record = {"path": vector_file.path, "sha256": vector_file.sha256, "entries": changed, "not_with": list(not_with)}
    metadata["rerouted"] = json.dumps([*(history if isinstance(history, list) else []), record])
    written = save_vector_file(out, entries, model=vector_file.model, hidden_size=vector_file.hidden_size, num_layers=vector_file.num_layers, extra_metadata=metadata)
    return written, changed
