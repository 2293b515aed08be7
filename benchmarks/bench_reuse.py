"""Benchmark of answer reuse: a steered run with ``unsteered_from=`` (and ``steered_from=``) against
the same run without it.

Starts two ``lm_eval`` processes side by side, each with ``--threads`` threads (one each by default,
so that on a 2-core machine they do not fight over cores): the steered run as it is, and the same
run with ``unsteered_from=<baseline>``. The reuse run finishes first; the full run then has the
machine to itself, so the measured ratio errs against reuse. Afterwards it checks that every task's
metrics and every logged response are identical in the two runs; the ratio is only reported as
a result when they are (otherwise the exit status is 1).

    # the unsteered baseline, made once with the README's command (--log_samples, same tasks/args)
    lm_eval --model hf --model_args pretrained=$SMOL,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf \\
      --tasks ifeval_steer,ifeval_steer_noinst --device cpu --apply_chat_template \\
      --gen_kwargs max_gen_toks=256 --batch_size 8 --log_samples --output_path runs/baseline
    python benchmarks/bench_reuse.py --baseline runs/baseline
    # or the committed SmolLM2 baseline, one task group at a time
    python benchmarks/bench_reuse.py --baseline results/smollm2-135m-instruct/baseline/without-instruction \\
      --tasks ifeval_format_noinst,ifeval_keywords_include_noinst
    python benchmarks/bench_reuse.py --baseline runs/baseline-8 --limit 8   # a smoke check
    # a changed vector file, reusing the answers of an earlier steered run where steering is unchanged
    python benchmarks/bench_reuse.py --baseline results/smollm2-135m-instruct/baseline/without-instruction \
      --steered-from results/smollm2-135m-instruct/recommended/without-instruction \
      --vectors changed.safetensors --tasks ifeval_format_noinst --label smollm2-steered

Prints a table and writes ``benchmarks/results/reuse-<label>.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_steer.core.atomic import write_json
from lm_eval_steer.core.outputs import find_results_files, find_sample_files, read_results_json, read_samples
from lm_eval_steer.core.paths import SMOLLM2_GGUF, smollm2_dir

REPO = Path(__file__).resolve().parent.parent
RECOMMENDED = "smollm2-135m-instruct"  # the packaged vector file, by name


@dataclass(frozen=True)
class Finished:
    """One finished ``lm_eval`` process: its wall time and what it wrote."""

    name: str
    seconds: float
    returncode: int
    results_file: Path | None


def lm_eval_command(model_args: str, args: argparse.Namespace, output: Path) -> list[str]:
    command = [
        sys.executable, "-m", "lm_eval", "--model", "steered-hf", "--model_args", model_args,
        "--tasks", args.tasks, "--device", "cpu", "--apply_chat_template",
        "--gen_kwargs", f"max_gen_toks={args.max_gen_toks}", "--batch_size", str(args.batch_size),
        "--log_samples", "--output_path", str(output),
    ]
    return command + (["--limit", str(args.limit)] if args.limit else [])


def run_side_by_side(commands: Mapping[str, list[str]], out_dir: Path, threads: int) -> dict[str, Finished]:
    """Starts every command at once and waits for all; wall time per command from its own start."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started: dict[str, tuple[subprocess.Popen, float]] = {}
    for name, command in commands.items():
        with (out_dir / f"{name}.log").open("w") as log:  # the child keeps its own copy of the handle
            started[name] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
    finished: dict[str, Finished] = {}
    while len(finished) < len(started):
        for name, (process, start) in started.items():
            if name not in finished and process.poll() is not None:
                results = find_results_files(out_dir / name) if process.returncode == 0 else [None]
                finished[name] = Finished(name, time.perf_counter() - start, process.returncode, results[0])
        time.sleep(1)
    return finished


def responses(results_file: Path, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: document hash → (logged responses, filtered responses, metrics)."""
    by_task = {}
    for task, path in find_sample_files(results_file, tasks).items():
        by_task[task] = {
            sample["doc_hash"]: (sample["resps"], sample["filtered_resps"], {k: sample.get(k) for k in ("prompt_level_loose_acc", "prompt_level_strict_acc")})
            for sample in read_samples(path)
        }
    return by_task


def differences(full: Path, reuse: Path) -> list[str]:
    """Everything that differs between the two runs' task metrics and logged samples."""
    full_results, reuse_results = read_results_json(full)["results"], read_results_json(reuse)["results"]
    found = [f"{task}: metrics differ" for task in sorted(full_results) if full_results[task] != reuse_results.get(task)]
    tasks = sorted(full_results)
    full_samples, reuse_samples = responses(full, tasks), responses(reuse, tasks)
    if set(full_samples) != set(reuse_samples) or not full_samples:
        found.append(f"logged tasks differ or are missing: {sorted(full_samples)} vs {sorted(reuse_samples)}")
    for task, samples in full_samples.items():
        other = reuse_samples.get(task, {})
        changed = [doc for doc, value in samples.items() if other.get(doc) != value]
        if changed or len(other) != len(samples):
            found.append(f"{task}: {len(changed)} of {len(samples)} logged samples differ ({len(other)} logged with reuse)")
    return found


def request_counts(results_file: Path) -> dict[str, dict[str, int]]:
    """Per task: documents evaluated, requests reused (from either baseline), and requests the
    unsteered baseline lacked."""
    data = read_results_json(results_file)
    steering = data["config"]["steering"]
    documents = {task: counts["effective"] for task, counts in data["n-samples"].items()}
    reused = {task: sum((steering.get(kind) or {}).get("reused_requests", {}).get(task, 0) for kind in ("unsteered_from", "steered_from")) for task in documents}
    return {"documents": documents, "reused": reused, "missing": steering["unsteered_from"]["missing_requests"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the unsteered run's --output_path (made with --log_samples)")
    parser.add_argument("--steered-from", type=Path, default=None, help="an earlier steered run (--log_samples) for steered_from= as well")
    parser.add_argument("--vectors", default=RECOMMENDED, help="vector files or packaged names, joined with '+' (default: SmolLM2's recommended file)")
    parser.add_argument("--model-args", default=None, help="default: the packaged SmolLM2 GGUF")
    parser.add_argument("--tasks", default="ifeval_steer,ifeval_steer_noinst")
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (a smoke check; the baseline must hold them)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1: two processes on 2 cores)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench-reuse")
    parser.add_argument("--label", default="smollm2")
    args = parser.parse_args()

    model_args = args.model_args or f"pretrained={smollm2_dir()},gguf_file={SMOLLM2_GGUF}"
    base = f"{model_args},vectors={args.vectors}"
    steered_from = f",steered_from={args.steered_from.resolve()}" if args.steered_from else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        "full": lm_eval_command(base, args, args.out_dir / "full"),
        "reuse": lm_eval_command(f"{base},unsteered_from={args.baseline.resolve()}{steered_from}", args, args.out_dir / "reuse"),
    }
    finished = run_side_by_side(commands, args.out_dir, args.threads)
    failed = [f"{run.name} exited with {run.returncode} (see {args.out_dir / run.name}.log)" for run in finished.values() if run.returncode]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    full, reuse = finished["full"], finished["reuse"]
    found = differences(full.results_file, reuse.results_file)
    counts = request_counts(reuse.results_file)
    ratio = reuse.seconds / full.seconds
    reuse_label = "`unsteered_from=`, `steered_from=`" if args.steered_from else "`unsteered_from=`"
    print(f"| run | wall time | vs full |\n|---|---:|---:|\n| steered, full | {full.seconds:.0f} s | 1.00× |\n| steered, {reuse_label} | {reuse.seconds:.0f} s | {ratio:.2f}× |")
    print(f"documents: {sum(counts['documents'].values())}, requests reused: {sum(counts['reused'].values())}, "
          f"generated because the baseline lacked them: {sum(counts['missing'].values())}")
    print("identical metrics and logged responses" if not found else "NOT IDENTICAL, the ratio is not a result:\n  " + "\n  ".join(found))
    write_json(REPO / "benchmarks" / "results" / f"reuse-{args.label}.json", {
        "tasks": args.tasks, "vectors": args.vectors, "steered_from": str(args.steered_from) if args.steered_from else None, "limit": args.limit, "threads_per_process": args.threads,
        "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks,
        "seconds": {"full": round(full.seconds, 1), "reuse": round(reuse.seconds, 1)},
        "ratio": round(ratio, 3) if not found else None, "requests": counts, "identical": not found, "differences": found,
    })
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main())
