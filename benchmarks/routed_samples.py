"""Which documents of each task a set of vector files steers, as an lm-eval ``--samples`` mapping.

    python benchmarks/routed_samples.py --vectors vectors/a.safetensors+vectors/b.safetensors \\
        --tasks ifeval_steer,ifeval_steer_noinst --out runs/routed-samples.json

A document is routed when ``routing.entries_for_document(doc, files, "auto")`` gives it at least one
entry; tasks with no routed documents are left out (their steered run equals the unsteered one).
Pass the file to ``lm_eval --samples "$(cat runs/routed-samples.json)"`` with the same task list as
the file's keys, then derive full-subset scores with ``benchmarks/full_subsets.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lm_eval.tasks import TaskManager

from lm_eval_steer.runtime.modelargs import parse_vector_paths
from lm_eval_steer.runtime.routing import entries_for_document
from lm_eval_steer.atomic import write_json
from lm_eval_steer.runtime.vectorfile import load_vector_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", required=True, help="vector files joined by '+', as in steered-hf's vectors=")
    parser.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    files = [load_vector_file(path) for path in parse_vector_paths(args.vectors)]
    # the plugin's import hook makes every TaskManager index the ifeval_* tasks
    tasks = TaskManager().load(args.tasks.split(","))["tasks"]  # groups expanded
    routed: dict[str, list[int]] = {}
    for name, task in sorted(tasks.items()):
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        indices = [i for i, doc in enumerate(docs) if entries_for_document(doc, files, "auto")]
        print(f"{name}: {len(indices)} of {len(docs)} documents routed")
        if indices:
            routed[name] = indices
    write_json(args.out, routed, indent=None)
    print(f"wrote {args.out} ({sum(map(len, routed.values()))} documents; --tasks {','.join(routed)})")


if __name__ == "__main__":
    main()
