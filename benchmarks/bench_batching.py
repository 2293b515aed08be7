"""Route groups batched together: one harness pass in full batches vs a pass per route (not a test).

IFEval's no-instruction keyword documents share questions but not their words. ``steered-hf`` used
to give a prompt asked under several routes one pass of the harness's ``generate_until`` per route,
whose tail passes ran as small batches; it now runs every route in one pass. Both run here in one
process on the same requests, interleaved round after round (the order rotated each round), on the
packaged SmolLM2-135M-Instruct with the shipped vector file and the ``keywords_include``
no-instruction documents (chat template applied):

- ``merged``: one ``generate_until`` of every request (ceil(n / batch size) batches)
- ``per route``: the old passes, from outside: the requests split first fit so that each prompt has
  one route per pass, one ``generate_until`` per pass (what ``steered-hf`` did inside)

Every request generates exactly ``--new-tokens`` tokens (``min_new_tokens``), so neither way wins or
loses time by where answers stop. Both wall and CPU seconds (of this process) are measured; on a
shared machine the CPU seconds are the steadier measure. Ratios are per round (per-route seconds /
merged seconds), then the median.

    python benchmarks/bench_batching.py --out benchmarks/results/batching.json
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_steering import smollm2_model_args
from lm_eval.api.instance import Instance

from lm_eval_steer.core.atomic import write_json
from lm_eval_steer.core.ifeval import subset_docs
from lm_eval_steer.runtime.model import SteeredHFLM, prompt_passes
from lm_eval_steer.runtime.routing import route_key

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "vectors" / "smollm2-135m-instruct.safetensors"


def keyword_requests(model: SteeredHFLM, subset: str, limit: int | None, new_tokens: int) -> list[Instance]:
    generation = {"until": [], "max_gen_toks": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    docs = subset_docs(subset, noinst=True)[:limit]
    return [
        Instance("generate_until", doc, (model.apply_chat_template([{"role": "user", "content": doc["prompt_without_instruction"]}]), dict(generation)), i)
        for i, doc in enumerate(docs)
    ]


def per_route(model: SteeredHFLM, requests: list[Instance]) -> list[str]:
    answers = [""] * len(requests)
    for indices in prompt_passes(requests, lambda request: route_key(model.rows_for(request))):
        for index, answer in zip(indices, model.generate_until([requests[i] for i in indices], disable_tqdm=True)):
            answers[index] = answer
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", default="keywords_include")
    parser.add_argument("--limit", type=int, default=None, help="the first N documents only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batching.json"))
    args = parser.parse_args()

    model = SteeredHFLM(**smollm2_model_args(), vectors=str(VECTORS), batch_size=args.batch_size)
    requests = keyword_requests(model, args.subset, args.limit, args.new_tokens)
    passes = [len(indices) for indices in prompt_passes(requests, lambda request: route_key(model.rows_for(request)))]
    ways: dict[str, Any] = {"merged": lambda: model.generate_until(requests, disable_tqdm=True), "per route": lambda: per_route(model, requests)}
    batches = {"merged": math.ceil(len(requests) / args.batch_size), "per route": sum(math.ceil(size / args.batch_size) for size in passes)}
    seconds: dict[str, list[float]] = {label: [] for label in ways}
    cpu_seconds: dict[str, list[float]] = {label: [] for label in ways}
    answers: dict[str, list[str]] = {}
    labels = list(ways)
    for round_index in range(args.rounds):
        for label in labels[round_index % len(labels) :] + labels[: round_index % len(labels)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            answers[label] = ways[label]()
            seconds[label].append(time.perf_counter() - start)
            cpu_seconds[label].append(time.process_time() - cpu_start)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{label} {seconds[label][-1]:.1f}s (CPU {cpu_seconds[label][-1]:.1f}s)" for label in ways), flush=True)

    ratio, cpu_ratio = (statistics.median(old / new for old, new in zip(values["per route"], values["merged"])) for values in (seconds, cpu_seconds))
    same = sum(a == b for a, b in zip(answers["merged"], answers["per route"]))
    routed = sum(bool(model.rows_for(request)) for request in requests)
    print(
        f"\nSmolLM2-135M-Instruct, {args.subset} no-instruction: {len(requests)} requests ({routed} steered, "
        f"{len({request.args[0] for request in requests})} prompts), batch {args.batch_size}, {args.new_tokens} new tokens, "
        f"{args.rounds} interleaved rounds, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"{'way':<10} | {'passes':>6} | {'batches':>7} | {'median s':>8} | {'median CPU s':>12}")
    print("-" * 57)
    for label, count in (("merged", 1), ("per route", len(passes))):
        print(f"{label:<10} | {count:>6} | {batches[label]:>7} | {statistics.median(seconds[label]):>8.1f} | {statistics.median(cpu_seconds[label]):>12.1f}")
    print(f"per-route passes {passes}; per route / merged = {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU; identical answers {same}/{len(requests)}")
    report = {
        "benchmark": "route_batching",
        "subset": args.subset,
        "requests": len(requests),
        "steered_requests": routed,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "per_route_passes": passes,
        "batches": batches,
        "median_seconds": {label: round(statistics.median(values), 2) for label, values in seconds.items()},
        "median_cpu_seconds": {label: round(statistics.median(values), 2) for label, values in cpu_seconds.items()},
        "per_route_vs_merged": round(ratio, 3),
        "per_route_vs_merged_cpu": round(cpu_ratio, 3),
        "identical_answers": same,
        "raw_seconds": seconds,
        "raw_cpu_seconds": cpu_seconds,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
