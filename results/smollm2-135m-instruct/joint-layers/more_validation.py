"""Validation of vector files' entries for one instruction on 24 further builder-style questions (the 24
after the builder's 8 validation questions in the packaged question list), untold and told, greedy, 256
tokens, IFEval's loose checker and the 4-gram looping measure, against the unsteered model.

usage: more_validation.py MODEL_ARGS INSTRUCTION_ID OUT_JSON LABEL=FILE[*MULTIPLIER] ...

Each FILE contributes its entry named INSTRUCTION_ID and, for a set trained jointly, the set's
``INSTRUCTION_ID@L<layer>`` entries; ``*M`` scales their strengths.
"""
import dataclasses
import json
import sys

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.vectorfile import load_vector_file
from vector_builder import prompts
from vector_builder.cli import load_model
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.scoring import loose_follows
from vector_builder.search import generate

model_args, instruction, out, *specs = sys.argv[1:]
candidates = {"none": []}
for spec in specs:
    label, _, source = spec.partition("=")
    path, _, multiplier = source.partition("*")
    entries = [e for e in load_vector_file(path).entries if set_name(e.name) == instruction]
    assert entries, f"{path}: no entry for {instruction}"
    candidates[label] = [dataclasses.replace(e, strength=e.strength * float(multiplier or 1)) for e in entries]
model, tok, _ = load_model(f"{model_args},dtype=float32")
runner = Runner.of(model, tok, GenerationSettings(batch_size=16, seed=0, max_new_tokens=256))
_, val = prompts.split_queries(prompts.load_queries(), 32, 32, 0)
fresh = val[8:]  # the builder's validation questions are val[:8]
_, targets = prompts.plan([instruction])
items = prompts.validation_prompts(targets[0], fresh, 0, True)
ids = [prompts.chat_ids(tok, p.text) for p in items]
result = {}
for name, entries in candidates.items():
    answers = []
    for s in range(0, len(ids), 16):
        answers += generate(runner, ids[s : s + 16], [entries] * len(ids[s : s + 16]))
    texts = [runner.decode(a) for a in answers]
    follows = [loose_follows(instruction, p.kwargs, p.checker_prompt, t) for p, t in zip(items, texts)]
    loops = [is_degenerate(a) for a in answers]
    result[name] = {"follows": follows, "loops": loops, "texts": texts}
    n = len(fresh)
    base = result["none"]["loops"]
    print(name, "untold", sum(follows[:n]), "told", sum(follows[n:]), "of", n, "loops", sum(loops), "new", sum(l and not b for l, b in zip(loops, base)), flush=True)
    json.dump(result, open(out, "w"), indent=1)
