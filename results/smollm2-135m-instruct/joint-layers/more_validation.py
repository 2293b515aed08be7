"""Validation of the lowercase joint set at x0.75 / x1 and of the packaged lowercase entry on 24 further
builder-style questions (the 24 after the builder's 8 validation questions), untold and told."""
import dataclasses
import json
import sys

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.runtime.vectorfile import load_vector_file
from vector_builder import prompts
from vector_builder.cli import load_model
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.scoring import loose_follows
from vector_builder.search import generate

model_args, joint_file, packaged, out = sys.argv[1:5]  # usage: more_validation.py MODEL_ARGS JOINT_FILE PACKAGED_FILE OUT_JSON
LOWER = "change_case:english_lowercase"
model, tok, _ = load_model(f"{model_args},dtype=float32")
runner = Runner.of(model, tok, GenerationSettings(batch_size=16, seed=0, max_new_tokens=256))
queries = prompts.load_queries()
_, val = prompts.split_queries(queries, 32, 32, 0)
fresh = val[8:]  # the builder's validation questions are val[:8]
_, targets = prompts.plan([LOWER])
items = prompts.validation_prompts(targets[0], fresh, 0, True)
ids = [prompts.chat_ids(tok, p.text) for p in items]
joint = load_vector_file(joint_file).entries
shipped = [e for e in load_vector_file(packaged).entries if e.name == LOWER]
scaled = lambda entries, m: [dataclasses.replace(e, strength=e.strength * m) for e in entries]  # noqa: E731
candidates = {"none": [], "packaged L6": shipped, "joint x0.75": scaled(joint, 0.75), "joint x1": joint}
result = {}
for name, entries in candidates.items():
    answers = []
    for s in range(0, len(ids), 16):
        answers += generate(runner, ids[s : s + 16], [entries] * len(ids[s : s + 16]))
    texts = [runner.decode(a) for a in answers]
    follows = [loose_follows(LOWER, p.kwargs, p.checker_prompt, t) for p, t in zip(items, texts)]
    loops = [is_degenerate(a) for a in answers]
    result[name] = {"follows": follows, "loops": loops, "texts": texts}
    n = len(fresh)
    base = result["none"]["loops"]
    print(name, "untold", sum(follows[:n]), "told", sum(follows[n:]), "of", n, "loops", sum(loops), "new", sum(l and not b for l, b in zip(loops, base)), flush=True)
    json.dump(result, open(out, "w"), indent=1)
