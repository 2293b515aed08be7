"""Benchmark of the learned method (vector_builder.methods.learned.stage.learn_direction) for one instruction.

Measures, on one model, the two costs of a learned vector at one layer: generating and checking the
training targets, and training (wall time, steps, seconds per step), with the process's peak RSS
over the training (reset via ``/proc/self/clear_refs`` just before it). It also checks the "only
``v`` learns" promise: after training no model parameter holds a gradient buffer.

    python benchmarks/bench_learned.py                                   # tiny random Llama (fast)
    OMP_NUM_THREADS=2 python benchmarks/bench_learned.py --model smollm2 --n-train 32 --layer 6

Prints a table and writes ``benchmarks/results/learned-<model>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lm_eval_steer.core.atomic import write_json
from vector_builder import prompts
from vector_builder.methods.learned import LearnedSettings
from vector_builder.methods.learned.stage import learn_direction
from vector_builder.methods.learned.targets import TargetSettings
from vector_builder.runner import GenerationSettings, Runner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import load, peak_rss_mib, reset_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--instruction", default="change_case:english_lowercase")
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--layer", type=int, default=None, help="default: about n_layers/5")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="target generation batch")
    args = parser.parse_args()

    model, tokenizer, label = load(args.model)
    num_layers = model.config.num_hidden_layers
    layer = args.layer if args.layer is not None else max(1, round(num_layers / 5))
    queries, _ = prompts.split_queries(prompts.load_queries(), args.n_train, 1, 0)
    spec = prompts.DirectionSpec(args.instruction, args.instruction)
    runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=args.batch_size))
    settings = LearnedSettings(layers=(layer,), steps=args.steps)

    reset_peak()
    started = time.perf_counter()
    outcome = learn_direction(runner, spec, queries, settings, TargetSettings(max_tokens=128))
    total = time.perf_counter() - started
    trained = outcome.trained.get(layer)
    row = {
        "model": label,
        "instruction": args.instruction,
        "n_train": args.n_train,
        "layer": layer,
        "torch_threads": torch.get_num_threads(),
        "targets": outcome.sources,
        "targets_seconds": round(outcome.targets_seconds, 1),
        "training_seconds": None if trained is None else round(trained.seconds, 1),
        "steps": None if trained is None else len(trained.train_loss),
        "seconds_per_step": None if trained is None else round(trained.seconds / len(trained.train_loss), 2),
        "best_step": None if trained is None else trained.best_step,
        "vector_norm": None if trained is None else round(trained.norm, 2),
        "total_seconds": round(total, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters_with_grad_buffers": sum(parameter.grad is not None for parameter in model.parameters()),
    }
    width = max(len(key) for key in row)
    for key, value in row.items():
        print(f"{key:{width}s}  {value}")
    name = "tiny" if args.model == "tiny" else "smollm2"
    write_json(REPO / "benchmarks" / "results" / f"learned-{name}.json", row)


if __name__ == "__main__":
    main()
