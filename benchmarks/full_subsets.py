"""Full-subset steered scores from a full unsteered run plus runs over the routed documents only.

    python benchmarks/full_subsets.py --full results/smollm2-135m-instruct/baseline.json \\
        --routed-baseline results/smollm2-135m-instruct/routed-baseline.json \\
        --routed-steered results/smollm2-135m-instruct/routed-steered-a.json results/smollm2-135m-instruct/routed-steered-b.json \\
        --out results/smollm2-135m-instruct/full-subsets.json

With ``route=auto`` a document that no vector applies to is generated exactly as by ``hf`` (the
runtime tests and the logged samples of the format study check this), so a steered run over a whole
subset differs from the unsteered one only on the routed documents. Evaluating those alone saves
most of the CPU time, and the full-subset score follows by counting::

    steered_hits = full_unsteered_hits − routed_unsteered_hits + routed_steered_hits

for each prompt-level metric (``hits = accuracy × documents``). A task with no routed documents
keeps its unsteered score. Standard errors are lm-eval's for a mean of 0/1 scores,
``sqrt(p (1 − p) / (n − 1))``. Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lm_eval_steer.analysis.results import Run, load_single_run
from lm_eval_steer.analysis.tables import combined_stderr, format_value, markdown_table
from lm_eval_steer.atomic import write_json

METRICS = ("prompt_level_loose_acc", "prompt_level_strict_acc")


def hits(run: Run, task: str, metric: str) -> tuple[int, int]:
    """(correct documents, documents) of one task in one run."""
    n = run.n_samples[task]
    if not n:
        raise SystemExit(f"{run.path}: no document count for {task}")
    return round(run.metrics[task][metric].value * n), n


def mean_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 − p) / (n − 1))``: the standard error lm-eval reports for a mean of 0/1 scores."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def derive(full: Run, routed_baseline: Run, routed_steered: list[Run]) -> list[dict[str, Any]]:
    steered_by_task = {task: run for run in routed_steered for task in run.n_samples}
    rows = []
    for task in sorted(task for task, n in full.n_samples.items() if n):
        row: dict[str, Any] = {"task": task, "documents": full.n_samples[task], "routed": 0}
        for metric in METRICS:
            full_hits, n = hits(full, task, metric)
            steered_hits = full_hits
            if task in steered_by_task:
                base_hits, routed = hits(routed_baseline, task, metric)
                steer_hits, routed_steered_n = hits(steered_by_task[task], task, metric)
                if routed != routed_steered_n:
                    raise SystemExit(f"{task}: {routed} routed unsteered documents but {routed_steered_n} steered ones")
                steered_hits = full_hits - base_hits + steer_hits
                row["routed"] = routed
            before, after = full_hits / n, steered_hits / n
            row[metric] = {
                "unsteered": before,
                "steered": after,
                "delta": after - before,
                "delta_stderr": combined_stderr(mean_stderr(before, n), mean_stderr(after, n)),
            }
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    headers = ["task", "docs", "routed"]
    for metric in METRICS:
        short = metric.replace("prompt_level_", "").replace("_acc", "")
        headers += [f"{short}: unsteered", f"{short}: steered", f"{short}: Δ"]
    table_rows = []
    for row in rows:
        cells = [row["task"], str(row["documents"]), str(row["routed"])]
        for metric in METRICS:
            m, n = row[metric], row["documents"]
            cells += [
                format_value(m["unsteered"], mean_stderr(m["unsteered"], n)),
                format_value(m["steered"], mean_stderr(m["steered"], n)),
                format_value(m["delta"], m["delta_stderr"], signed=True),
            ]
        table_rows.append(cells)
    return markdown_table(headers, table_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", required=True, help="unsteered results over the full subsets")
    parser.add_argument("--routed-baseline", required=True, help="unsteered results over the routed documents")
    parser.add_argument("--routed-steered", required=True, nargs="+", help="steered results over the routed documents")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    args = parser.parse_args()
    rows = derive(load_single_run(args.full), load_single_run(args.routed_baseline), [load_single_run(p) for p in args.routed_steered])
    print(render(rows))
    report = {"inputs": {"full": args.full, "routed_baseline": args.routed_baseline, "routed_steered": args.routed_steered}, "tasks": rows}
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
