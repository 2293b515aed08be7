"""Experiment (not part of the package): a learned vector trained at one layer against a set of vectors
trained jointly at several layers, on the same training targets, each validated like a build does (the
builder's 8 validation questions without the instruction, then the same 8 with it; greedy, 256 tokens,
IFEval's loose checker, the 4-gram looping measure).

Targets as ``lm-eval-steer build --method learned`` makes them at ``--target-max-tokens 256`` (the told
model's answers, sampled or repaired until they pass), or with ``own`` the repairs of the model's own
answers to the plain questions. Training as the builder's (Adam, lr 0.08, batches of 4, held-out loss
every 10 steps, patience 2, the best held-out step kept), with up to 60 steps. Vectors are saved as
``OUT.<variant>.safetensors`` (tensor name = layer).

With ``KL=beta`` in the environment (session 17), training adds a fluency term: beta times the mean
KL(p_unsteered || p_steered) of the next-token distributions at the response positions the target does
not constrain (where the unsteered model's own greedy choice, given the same prefix, is the target's
token), to the loss and to the held-out loss that picks the kept step.

usage: python joint_layers.py MODEL_ARGS INSTRUCTION_ID OUT_JSON [JOINT_LAYERS [own]]
       (VARIANTS=joint in the environment skips the one-layer vector)
"""

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.runtime.hooks import steering, text_config
from lm_eval_steer.runtime.vectorfile import SteeringEntry
from vector_builder import prompts
from vector_builder.activations import positions_from_mask
from vector_builder.cli import load_model
from vector_builder.methods.learned import targets as T
from vector_builder.methods.learned.stage import examples_from
from vector_builder.methods.learned.training import IGNORE, batch_tensors, frozen
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.scoring import loose_follows
from vector_builder.search import generate

model_dir, instruction, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
joint_layers = [int(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "2,6,10,14,18,22").split(",")]
own = len(sys.argv) > 5 and sys.argv[5] == "own"  # targets: repairs of the model's own untold greedy answers
model, tok, _ = load_model(f"{model_dir},dtype=float32")
runner = Runner.of(model, tok, GenerationSettings(batch_size=16, seed=0, max_new_tokens=256))
train_q, val_q = prompts.split_queries(prompts.load_queries(), 32, 8, 0)
specs, targets_ = prompts.plan([instruction])
spec, target = specs[0], targets_[0]

cache = out.with_suffix(".targets.json")
if cache.exists():
    responses = [T.TargetResponse(**item) for item in json.loads(cache.read_text())]
else:
    t0 = time.time()
    if own:
        from vector_builder.scoring import strict_follows
        instructed = prompts.training_prompts(spec, train_q, 0)
        untold = [a[0] for a in T.generate_texts(runner, [p.text for p in instructed], T.TargetSettings(max_tokens=256), sample=False, desc="own")]
        repair = T.REPAIRS[instruction]
        responses = []
        for p, a in zip(instructed, untold):
            fixed = repair(a, p.kwargs, p.text)
            if fixed is not None and strict_follows(instruction, p.kwargs, p.checker_prompt, fixed):
                responses.append(T.TargetResponse(query=p.text, kwargs=p.kwargs, response=fixed, source="own-repaired"))
    else:
        responses, _ = T.collect(runner, spec, train_q, T.TargetSettings(max_tokens=256))
    cache.write_text(json.dumps([item.__dict__ for item in responses]))
    print(f"targets {len(responses)} in {time.time() - t0:.0f}s", flush=True)
examples = examples_from(tok, responses)
held = max(1, math.ceil(len(examples) * 0.25))
heldout, train_set = examples[:held], examples[held:]


KL_WEIGHT = float(os.environ.get("KL", "0"))


def loss_of(batch, vectors, layers):
    ids, mask, labels, scored = batch_tensors(batch, runner.pad_id)
    entries = [SteeringEntry(name=f"v{L}", vector=vectors[i], layer=L, mode="add", strength=1.0, positions="all") for i, L in enumerate(layers)]
    forward = lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False, logits_to_keep=scored + 1).logits  # noqa: E731
    with steering(model, [entries] * len(batch), skip_first_token=True):
        logits = forward()
    predicted = logits[:, :-1].float()
    wanted = labels[:, -scored:]
    loss = nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), wanted.reshape(-1), ignore_index=IGNORE)
    if not KL_WEIGHT:
        return loss
    with torch.no_grad():
        unsteered = forward()[:, :-1].float().log_softmax(-1)
    free = (wanted != IGNORE) & (unsteered.argmax(-1) == wanted)  # the target does not constrain these tokens
    kl = (unsteered.exp() * (unsteered - predicted.log_softmax(-1))).sum(-1)
    return loss + KL_WEIGHT * (kl * free).sum() / free.sum().clamp(min=1)


def heldout_loss(vectors, layers):
    with torch.no_grad():
        total = tokens = 0
        for s in range(0, len(heldout), 4):
            chunk = heldout[s : s + 4]
            n = sum(len(e.response) for e in chunk)
            total += float(loss_of(chunk, vectors, layers)) * n
            tokens += n
    return total / tokens


def train(layers, lr=0.08, steps=60, eval_every=10, patience=2):
    hidden = int(text_config(model).hidden_size)
    vectors = torch.zeros(len(layers), hidden, requires_grad=True)
    opt = torch.optim.Adam([vectors], lr=lr)
    best, best_vec, best_step, stale = heldout_loss(vectors.detach(), layers), vectors.detach().clone(), 0, 0
    curve = [(0, best)]
    order, rng = [], random.Random(0)
    t0 = time.time()
    with frozen(model):
        for step in range(1, steps + 1):
            if len(order) < 4:
                order += rng.sample(range(len(train_set)), len(train_set))
            batch = [train_set[i] for i in order[:4]]
            del order[:4]
            loss = loss_of(batch, vectors, layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every:
                continue
            cur = heldout_loss(vectors.detach(), layers)
            curve.append((step, cur))
            print(f"  {layers} step {step} train {loss.item():.3f} heldout {cur:.3f} ({time.time() - t0:.0f}s)", flush=True)
            if cur < best:
                best, best_vec, best_step, stale = cur, vectors.detach().clone(), step, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    return best_vec, {"curve": curve, "best_step": best_step, "seconds": time.time() - t0, "norms": [float(v.norm()) for v in best_vec]}


val = prompts.validation_prompts(target, val_q, 0, True)
val_ids = [prompts.chat_ids(tok, p.text) for p in val]


def validate(vectors, layers, multiplier):
    rows = []
    for _ in val:
        rows.append([] if vectors is None else [
            SteeringEntry(name=f"v{L}", vector=vectors[i] / vectors[i].norm(), layer=L, mode="add", strength=float(vectors[i].norm()) * multiplier, positions="all")
            for i, L in enumerate(layers) if vectors[i].norm() > 0
        ])
    answers = []
    for s in range(0, len(val), 16):
        answers += generate(runner, val_ids[s : s + 16], rows[s : s + 16])
    texts = [runner.decode(a) for a in answers]
    follows = [loose_follows(instruction, p.kwargs, p.checker_prompt, t) for p, t in zip(val, texts)]
    loops = [is_degenerate(a) for a in answers]
    return {"untold": sum(follows[:8]), "told": sum(follows[8:]), "untold_fluent": sum(f and not d for f, d in zip(follows[:8], loops[:8])),
            "told_fluent": sum(f and not d for f, d in zip(follows[8:], loops[8:])), "loops": loops, "follows": follows, "texts": texts}


results = {"instruction": instruction, "targets": len(examples), "sources": {}, "kl_weight": KL_WEIGHT}
for r in responses:
    results["sources"][r.source] = results["sources"].get(r.source, 0) + 1
results["none"] = validate(None, [], 0)
print("none", results["none"]["untold"], results["none"]["told"], flush=True)
from safetensors.torch import save_file
variants = [v for v in (("single", [6]), ("joint", joint_layers)) if v[0] in os.environ.get("VARIANTS", "single,joint").split(",")]
for name, layers in variants:
    vec, info = train(layers)
    save_file({str(L): vec[i].contiguous() for i, L in enumerate(layers)}, str(out.with_suffix(f".{name}.safetensors")))
    results[name] = {"layers": layers, **info, "validation": {}}
    for m in (0.5, 1.0, 1.5) if name == "single" else (0.5, 0.75, 1.0):
        v = validate(vec, layers, m)
        results[name]["validation"][str(m)] = v
        print(name, m, "untold", v["untold"], "told", v["told"], "loops", sum(v["loops"]), flush=True)
    out.write_text(json.dumps(results, indent=1))
print("done")
