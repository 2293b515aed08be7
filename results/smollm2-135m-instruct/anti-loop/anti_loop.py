"""Experiment: is there a direction that stops SmolLM2 looping? (study record, not product code)

1. Unsteered greedy answers (256 tokens) to the first 64 of the builder's writing tasks
   (``vector_builder/data/writing_tasks.jsonl``; no IFEval prompt is used).
2. Per layer, the answers' residual states (output of decoder layer L, teacher-forced) at answer
   tokens 16+: ``d = mean(states of repeating tokens in looping answers) - mean(states of tokens in
   answers that do not loop)``; a token repeats when the 4-gram ending at it appeared earlier in
   its answer. The entry clamps the component along d/|d| to its mean over the fluent tokens
   (``project`` mode, applied to every document and position).
3. Held-out: the next 32 writing tasks, unsteered and with each layer's entry: looping answers,
   mean length, and mean token NLL of the answer under the unsteered model.

    OMP_NUM_THREADS=1 python anti_loop.py "$M" OUT_DIR 6,12,18,24
    OMP_NUM_THREADS=1 python anti_loop.py "$M" OUT_DIR 12,18 add 0.5,1   # then: x <- x - m·d, answer tokens only
    OMP_NUM_THREADS=1 python anti_loop.py "$M" OUT_DIR 10,14,18 noclamp  # directions and unsteered answers only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.runtime.vectorfile import SteeringEntry, load_vector_file, save_vector_file
from vector_builder import prompts
from vector_builder.activations import left_pad, positions_from_mask
from vector_builder.cli import load_model
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.search import generate

NGRAM, SKIP = 4, 16


def repeating(answer: list[int]) -> list[bool]:
    seen: set[tuple[int, ...]] = set()
    flags = []
    for j in range(len(answer)):
        gram = tuple(answer[max(0, j - NGRAM + 1) : j + 1])
        flags.append(j >= NGRAM - 1 and gram in seen)
        seen.add(gram)
    return flags


@torch.no_grad()
def states(model, prompt_ids, answers, layers, batch=8):
    """Per answer: [len(answer), len(layers), hidden] states at the answer's tokens."""
    out = []
    for start in range(0, len(answers), batch):
        seqs = [p + a for p, a in zip(prompt_ids[start : start + batch], answers[start : start + batch])]
        ids, mask = left_pad(seqs, 0)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), output_hidden_states=True).hidden_states
        stack = torch.stack([hidden[layer + 1] for layer in layers], dim=2)  # [b, seq, L, h]
        for row, answer in enumerate(answers[start : start + batch]):
            out.append(stack[row, ids.shape[1] - len(answer) :].float())
    return out


@torch.no_grad()
def mean_nll(model, prompt_ids, answers, batch=8):
    total, count = 0.0, 0
    for start in range(0, len(answers), batch):
        chunk = answers[start : start + batch]
        seqs = [p + a for p, a in zip(prompt_ids[start : start + batch], chunk)]
        ids, mask = left_pad(seqs, 0)
        logp = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.float().log_softmax(-1)
        for row, answer in enumerate(chunk):
            if not answer:
                continue
            n = len(answer)
            pred = logp[row, ids.shape[1] - n - 1 : ids.shape[1] - 1]
            total -= pred.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            count += n
    return total / max(count, 1)


def held_out(runner, model, test_ids, candidates):
    """Per candidate (label, entry or None): looping answers, mean length, NLL under the unsteered model."""
    held = {}
    for label, entry in candidates:
        got = generate(runner, test_ids, [() if entry is None else (entry,)] * len(test_ids))
        held[label] = {"looping": sum(is_degenerate(a) for a in got), "mean_tokens": sum(map(len, got)) / len(got),
                       "nll_under_unsteered": mean_nll(model, test_ids, got), "texts": [runner.decode(a) for a in got]}
        print(label, {k: v for k, v in held[label].items() if k != "texts"}, flush=True)
    return held


def variants(runner, model, test_ids, out_dir, layers, multipliers):
    """Second pass: ``x <- x - m·d`` (d the unnormalised difference) at generated positions only."""
    candidates = []
    for layer in layers:
        saved = load_vector_file(out_dir / f"anti-loop-L{layer}.safetensors").entries[0]
        norm = json.loads((out_dir / "anti-loop.json").read_text())["layers"][str(layer)]["norm"]
        for m in multipliers:
            candidates.append((f"L{layer} add -{m}", SteeringEntry(f"anti-loop-add@L{layer}", saved.vector, layer, "add", -m * norm, "generated")))
    result = held_out(runner, model, test_ids, candidates)
    (out_dir / "anti-loop-add.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    model_args, out_dir, layer_text = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    layers = [int(x) for x in layer_text.split(",")]
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, name = load_model(model_args)
    runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=16, max_new_tokens=256))
    tasks = prompts.load_queries(str(prompts.DEFAULT_QUERIES.parent / "writing_tasks.jsonl"))
    train_q, test_q = tasks[:64], tasks[64:96]
    train_ids = [prompts.chat_ids(tokenizer, q) for q in train_q]
    test_ids = [prompts.chat_ids(tokenizer, q) for q in test_q]
    if sys.argv[4:5] == ["add"]:  # "add 0.5,1": the subtraction variants of already saved directions
        variants(runner, model, test_ids, out_dir, layers, [float(x) for x in sys.argv[5].split(",")])
        return

    answers = generate(runner, train_ids, [()] * len(train_ids))
    loops = [is_degenerate(a) for a in answers]
    per_answer = states(model, train_ids, answers, layers)
    rep_sum = torch.zeros(len(layers), model.config.hidden_size)
    flu_sum = torch.zeros_like(rep_sum)
    n_rep = n_flu = 0
    for answer, loop, h in zip(answers, loops, per_answer):
        flags = repeating(answer)
        for j in range(SKIP, len(answer)):
            if loop and flags[j]:
                rep_sum += h[j]
                n_rep += 1
            elif not loop:
                flu_sum += h[j]
                n_flu += 1
    direction = rep_sum / n_rep - flu_sum / n_flu
    summary = {"train_loops": sum(loops), "train_answers": len(answers), "repeating_tokens": n_rep, "fluent_tokens": n_flu, "layers": {}}
    entries = {}
    for i, layer in enumerate(layers):
        unit = direction[i] / direction[i].norm()
        flu_proj = torch.cat([h[SKIP:, i] @ unit for h, loop in zip(per_answer, loops) if not loop and len(h) > SKIP])
        rep_proj = torch.cat([h[SKIP:, i][torch.tensor(repeating(a)[SKIP:])] @ unit for a, h, loop in zip(answers, per_answer, loops) if loop and len(a) > SKIP])
        strength = float(flu_proj.mean())
        summary["layers"][layer] = {"norm": float(direction[i].norm()), "fluent_mean": strength, "fluent_std": float(flu_proj.std()),
                                     "repeating_mean": float(rep_proj.mean()), "repeating_std": float(rep_proj.std())}
        entry = SteeringEntry(f"anti-loop@L{layer}", unit, layer, "project", strength)
        entries[layer] = entry
        save_vector_file(out_dir / f"anti-loop-L{layer}.safetensors", [entry], model=name, hidden_size=model.config.hidden_size,
                         num_layers=model.config.num_hidden_layers, extra_metadata={"provenance": "anti_loop.py: repeating minus fluent tokens, writing tasks 0-63"})
    print(json.dumps(summary, indent=1), flush=True)

    clamps = [] if sys.argv[4:] == ["noclamp"] else [(f"L{layer}", entries[layer]) for layer in layers]
    summary["held_out"] = held_out(runner, model, test_ids, [("unsteered", None), *clamps])
    summary["train_texts"] = [runner.decode(a) for a in answers]
    (out_dir / "anti-loop.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
