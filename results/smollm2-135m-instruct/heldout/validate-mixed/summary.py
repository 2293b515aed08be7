"""Does validation on mixed prompts foresee what an entry does on the held-out prompts?

    python results/smollm2-135m-instruct/heldout/validate-mixed/summary.py > results/smollm2-135m-instruct/heldout/validate-mixed/summary.json

Per entry of SmolLM2's packaged file: its ``lm-eval-steer validate --paired-with mixed`` run here
(24 IFEval-like requests from ``ifeval-like-requests.jsonl``, each also asking a second IFEval
instruction in turn; told answers, then untold), the packaged file against the same file with that
entry kept to one-instruction prompts (``alone``), and the committed held-out runs (told) on the
prompts the entry steers (routed by the file those runs used, the packaged file before its
highlighted-sections entry was kept to one-instruction prompts). Loops are counted as ``lm-eval-steer compare`` counts them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from lm_eval_steer.analysis.fluency import load_tokenizer, tokenizer_spec
from lm_eval_steer.analysis.results import parse_model_args
from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.core.paths import models_cache_dir
from lm_eval_steer.runtime.routing import entries_for_document
from lm_eval_steer.runtime.vectorfile import load_vector_file
from lm_eval_steer.tools.models import find, model_args
from vector_builder.search import looping_changes

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
ENTRIES = {
    "no-comma": "punctuation:no_comma",
    "title": "detectable_format:title",
    "lowercase": "change_case:english_lowercase",
    "highlighted": "detectable_format:number_highlighted_sections",
}


def tally(follows: list[bool], loops: list[bool], unsteered_loops: list[bool]) -> dict[str, int]:
    new, cured = looping_changes(loops, unsteered_loops)
    return {"passes": sum(follows), "fluent": sum(f and not l for f, l in zip(follows, loops)), "looping": sum(loops), "new_looping": new, "cured_looping": cured}


def validation(tag: str) -> dict[str, dict[str, dict[str, int]]]:
    """Told and untold tallies per candidate (the validate JSON: untold answers first, then told)."""
    candidates = {c["label"]: c for c in json.loads((HERE / f"validate-{tag}.json").read_text())["candidates"]}
    half = len(candidates["unsteered"]["loops"]) // 2
    out = {}
    for side, part in (("untold", slice(0, half)), ("told", slice(half, None))):
        unsteered = candidates["unsteered"]["loops"][part]
        out[side] = {label: tally(c["follows"][part], c["loops"][part], unsteered) for label, c in candidates.items()}
    return out


def held_out(instruction_id: str, tokenize, vectors) -> dict[str, object]:
    """The committed held-out runs (told) on the prompts where the packaged file routes an entry for ``instruction_id``."""
    folder = HERE.parent / "steered-prompts"

    def samples(side: str) -> dict[int, dict]:
        (path,) = (folder / side).glob("samples_ifeval_heldout_*.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return {row["doc"]["key"]: row for row in map(json.loads, handle)}

    unsteered, steered = samples("unsteered"), samples("steered")
    keys = [k for k, row in unsteered.items() if any(e.applies_to and e.applies_to.instruction_id == instruction_id for e in entries_for_document(row["doc"], [vectors], "auto"))]
    loops = {side: [is_degenerate(tokenize(rows[k]["resps"][0][0])) for k in keys] for side, rows in (("unsteered", unsteered), ("steered", steered))}
    follows = {side: [bool(rows[k]["prompt_level_loose_acc"]) for k in keys] for side, rows in (("unsteered", unsteered), ("steered", steered))}
    return {"prompts": len(keys), **{side: tally(follows[side], loops[side], loops["unsteered"]) for side in ("unsteered", "steered")}}


if __name__ == "__main__":
    vectors = load_vector_file(HERE.parent.parent / "vectors" / "smollm2-135m-instruct-until-highlighted-alone.safetensors")  # the held-out runs' file
    known = find(MODEL)
    tokenize = load_tokenizer(tokenizer_spec(parse_model_args(model_args(known, known.fetch(models_cache_dir())))))
    print(json.dumps({tag: {"instruction": i, "validation": validation(tag), "held_out_told": held_out(i, tokenize, vectors)} for tag, i in ENTRIES.items()}, indent=1))
