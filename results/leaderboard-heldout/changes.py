"""Held-out prompts (``ifeval_heldout``) each packaged file steers: which prompts it gains and loses,
which answers newly loop or stop looping, and the instructions whose entries steered them.

    python results/leaderboard-heldout/changes.py > results/leaderboard-heldout/changes.json

Reads the committed ``steered-prompts`` runs of both models (their samples) and the vector files
those runs used (the packaged Qwen file; SmolLM2's file as it was before its highlighted-sections
entry was kept to one-instruction prompts, kept in ``results/``); loops are counted as
``lm-eval-steer compare`` counts them (same tokenizer and rule).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from lm_eval_steer.analysis.fluency import load_tokenizer, tokenizer_spec
from lm_eval_steer.analysis.results import parse_model_args
from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.core.paths import models_cache_dir, packaged_vector_files
from lm_eval_steer.runtime.routing import entries_for_document
from lm_eval_steer.runtime.vectorfile import load_vector_file
from lm_eval_steer.tools.models import find, model_args

RESULTS = Path(__file__).resolve().parent.parent
# The files the committed held-out runs were made with.
RUN_WITH = {
    "smollm2-135m-instruct": RESULTS / "smollm2-135m-instruct" / "vectors" / "smollm2-135m-instruct-until-highlighted-alone.safetensors",
    "qwen2.5-coder-0.5b-instruct": packaged_vector_files()["qwen2.5-coder-0.5b-instruct"],
}


def samples(folder: Path) -> dict[int, dict]:
    (path,) = folder.glob("samples_ifeval_heldout_*.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return {row["doc"]["key"]: row for row in map(json.loads, handle)}


def changes(model: str) -> dict:
    vectors = load_vector_file(RUN_WITH[model])
    known = find(model)  # as `lm-eval-steer models fetch`: the GGUF whose tokenizer the runs used
    tokenize = load_tokenizer(tokenizer_spec(parse_model_args(model_args(known, known.fetch(models_cache_dir())))))
    folder = RESULTS / model / "heldout" / "steered-prompts"
    unsteered, steered = samples(folder / "unsteered"), samples(folder / "steered")
    loops = lambda row: is_degenerate(tokenize(row["resps"][0][0]))  # noqa: E731
    counts: dict[str, Counter] = {name: Counter() for name in ("gained", "lost", "newly_looping", "no_longer_looping")}
    for key, before in unsteered.items():
        after = steered[key]
        steering = " + ".join(sorted({entry.name.split("@")[0] for entry in entries_for_document(before["doc"], [vectors], "auto")}))
        passed_before, passed_after = bool(before["prompt_level_loose_acc"]), bool(after["prompt_level_loose_acc"])
        loop_before, loop_after = loops(before), loops(after)
        if passed_after and not passed_before:
            counts["gained"][f"{steering} ({'loops' if loop_after else 'fluent'})"] += 1
        if passed_before and not passed_after:
            counts["lost"][steering] += 1
        if loop_after and not loop_before:
            counts["newly_looping"][steering] += 1
        if loop_before and not loop_after:
            counts["no_longer_looping"][steering] += 1
    return {"prompts": len(unsteered)} | {name: {"total": sum(c.values()), "by_entries": dict(c.most_common())} for name, c in counts.items()}


if __name__ == "__main__":
    print(json.dumps({model: changes(model) for model in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")}, indent=1))
