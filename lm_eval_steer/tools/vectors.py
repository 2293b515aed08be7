"""The vector files packaged with lm-eval-steer, and what any vector file holds.

    lm-eval-steer vectors list                          # the packaged files: name, model, entries
    lm-eval-steer vectors show smollm2-135m-instruct    # one row per entry (a name or a path)
    lm-eval-steer vectors catalog --out vectors/README.md
    lm-eval-steer vectors exclude FILE --entry GLOB --not-with ID,ID --out NEW   # see lm_eval_steer.tools.routes

The recommended file of each model is packaged as ``lm_eval_steer.vectors`` (the repository's
``vectors/`` folder), so ``vectors=<name>`` in ``--model_args`` finds it without a path
(:func:`lm_eval_steer.core.paths.resolve_vectors`). ``show`` reads everything from the file itself: its entries and the provenance
its metadata records (``merged_from`` for a merge, ``builder``/``methods`` for a build).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from lm_eval_steer.analysis.tables import markdown_table
from lm_eval_steer.core.atomic import write_text
from lm_eval_steer.core.paths import packaged_vector_files, resolve_vectors
from lm_eval_steer.runtime.routing import vector_digest
from lm_eval_steer.runtime.vectorfile import SteeringEntry, VectorFile, load_vector_file, metadata_json
from lm_eval_steer.tools.routes import exclude

ENTRY_HEADERS = ("entry", "instruction", "layer", "mode", "strength", "positions", "answer window", "method", "from", "sha256")


# ----------------------------------------------------------------------------- what a file holds


def entry_methods(metadata: Mapping[str, str]) -> dict[str, str]:
    """Entry name -> build method, from a build's ``methods``/``builder`` metadata and, for a merge,
    from the metadata of the file each entry was taken from."""
    methods: dict[str, str] = {}
    for source in metadata_json(metadata, "merged_from") or []:
        if isinstance(source, dict):
            inner = {key: value for key, value in (source.get("metadata") or {}).items() if isinstance(value, str)}
            found = entry_methods(inner)
            methods.update({name: found.get(name, found.get("*", "")) for name in source.get("entries") or []})
    builder = metadata_json(metadata, "builder")
    if isinstance(builder, dict) and isinstance(builder.get("method"), str):
        methods.setdefault("*", builder["method"])
    if "anti_looping" in metadata:  # written by `lm-eval-steer anti-looping`, which records its choice there
        methods.setdefault("*", "anti-looping")
    recorded = metadata_json(metadata, "methods")
    if isinstance(recorded, dict):
        methods.update({str(name): str(method) for name, method in recorded.items()})
    return methods


def entry_sources(metadata: Mapping[str, str]) -> dict[str, str]:
    """Entry name -> name of the file it was built in: the file it was merged from, or, when that file
    was itself a merge, the file that merge took it from, and so on (empty for a file that is not a
    merge). A file merged in steps thus still names where each entry came from."""
    sources: dict[str, str] = {}
    for source in metadata_json(metadata, "merged_from") or []:
        if isinstance(source, dict):
            earlier = entry_sources({key: value for key, value in (source.get("metadata") or {}).items() if isinstance(value, str)})
            name = Path(str(source.get("path", "?"))).name
            sources.update({entry: earlier.get(entry, name) for entry in source.get("entries") or []})
    return sources


def instruction(entry: SteeringEntry) -> str:
    """``keywords:existence keywords=['pie'] (not with punctuation:no_comma)``: the instruction id,
    kwargs filter and exclusions of the documents an entry serves."""
    if entry.applies_to is None:
        return "(every document)"
    kwargs = " ".join(f"{key}={value}" for key, value in entry.applies_to.kwargs.items())
    not_with = f"(not with {', '.join(entry.applies_to.not_with)})" if entry.applies_to.not_with else ""
    return " ".join(part for part in (entry.applies_to.instruction_id, kwargs, not_with) if part)


def strength(entry: SteeringEntry) -> str:
    rule = entry.applies_to.strength_rule if entry.applies_to else None
    if rule is None:
        return f"{entry.strength:.4g}"
    return f"by {rule.kwarg}: " + ", ".join(f"{x:g}→{s:.3g}" for x, s in rule.points)


def window_rule(entry: SteeringEntry) -> str:
    """The entry's answer-window rules in words: ``start_after_tokens``, its ``stop_after`` strings and
    ``stop_after_tokens``."""
    rules = [f"from token {entry.start_after_tokens}"] if entry.start_after_tokens is not None else []
    rules += [", ".join(entry.stop_after)] if entry.stop_after else []
    if entry.stop_after_tokens is not None:
        rules.append(f"after {entry.stop_after_tokens} tokens")
    return "; ".join(rules) or "—"


def entry_rows(vector_file: VectorFile) -> list[list[str]]:
    """One row per entry, in :data:`ENTRY_HEADERS` order."""
    methods, sources = entry_methods(vector_file.extra_metadata), entry_sources(vector_file.extra_metadata)
    return [
        [
            entry.name,
            instruction(entry),
            str(entry.layer),
            entry.mode,
            strength(entry),
            entry.positions,
            window_rule(entry),
            methods.get(entry.name, methods.get("*", "")) or "—",
            sources.get(entry.name, "this file"),
            vector_digest(entry.vector)[:12],
        ]
        for entry in vector_file.entries
    ]


def describe(vector_file: VectorFile) -> str:
    """Header lines (file, sha256, model, shape, provenance) and the entry table, as Markdown."""
    sources = sorted(set(entry_sources(vector_file.extra_metadata).values()))
    builder = metadata_json(vector_file.extra_metadata, "builder")
    provenance = (
        f"merged from {', '.join(sources)}" if sources else
        f"built by lm-eval-steer build (builder version {builder.get('builder_version', '?')})" if isinstance(builder, dict) else
        "not recorded"
    )  # fmt: skip
    header = [
        f"- file: `{Path(str(vector_file.path)).name}`, sha256 `{vector_file.sha256}`",
        f"- model: {vector_file.model} (hidden size {vector_file.hidden_size}, {vector_file.num_layers} layers)",
        f"- entries: {len(vector_file.entries)}; provenance: {provenance}",
    ]
    return "\n".join(header) + "\n\n" + markdown_table(ENTRY_HEADERS, entry_rows(vector_file))


def catalog() -> str:
    """The Markdown page ``vectors/README.md``: every packaged file, listed then shown."""
    files = packaged()
    lines = [
        "# Packaged vector files",
        "",
        "Generated by `lm-eval-steer vectors catalog --out vectors/README.md`; do not edit by hand.",
        "One recommended file per model: pass its name as `vectors=<name>` (no path needed) with the",
        "default `route=auto`, and each document gets the entries of its own instructions.",
        "",
        list_table(files),
    ]
    for name, vector_file in files.items():
        lines += ["", f"## {name}", "", describe(vector_file)]
    return "\n".join(lines) + "\n"


def packaged() -> dict[str, VectorFile]:
    """Every packaged vector file, loaded (and so validated), by name."""
    return {name: load_vector_file(path) for name, path in packaged_vector_files().items()}


def list_table(files: Mapping[str, VectorFile]) -> str:
    """One Markdown row per file: name, model, entry count, the layers its entries steer."""
    rows = [[name, f.model, str(len(f.entries)), ", ".join(map(str, sorted({e.layer for e in f.entries})))] for name, f in files.items()]
    return markdown_table(("name", "model", "entries", "layers used"), rows)


# ----------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the packaged vector files")
    show = actions.add_parser("show", help="one table row per entry of a vector file")
    show.add_argument("file", help="a .safetensors path, or the name of a packaged file (see list)")
    write = actions.add_parser("catalog", help="write the Markdown catalog of the packaged files")
    write.add_argument("--out", required=True, help="where to write it (atomically), e.g. vectors/README.md")
    keep = actions.add_parser("exclude", help="keep entries off documents that also carry other instructions (applies_to.not_with)")
    keep.add_argument("file", help="a .safetensors path, or the name of a packaged file (see list)")
    keep.add_argument("--entry", required=True, metavar="GLOB", help="the entries to change: a name or a glob, e.g. 'keywords:existence:*'")
    keep.add_argument("--not-with", required=True, metavar="ID,ID",
                      help="IFEval instruction ids whose documents the entries skip under route=auto (replaces their list; none clears it)")
    keep.add_argument("--out", required=True, help="the vector file to write (atomically; not the input file)")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(list_table(packaged()))
    elif args.action == "show":
        print(describe(load_vector_file(resolve_vectors(args.file, argument=""))))
    elif args.action == "exclude":
        written, changed = exclude(args.file, args.entry, args.not_with, args.out)
        for entry in written.entries:
            if entry.name in changed:
                print(f"{entry.name}\t{instruction(entry)}")
        print(f"wrote {args.out}: {len(changed)} of {len(written.entries)} entries changed")
    else:
        write_text(args.out, catalog())
        print(f"wrote {args.out}")
    return 0
