"""``lm-eval-steer compare``: a leaderboard (Markdown, CSV, PNG) from lm-eval results.

    lm-eval-steer compare runs/base runs/steered.json [--baseline runs/base] --out leaderboard/

One row per run (model + steering configuration; ``--label`` names them, and runs of one
configuration over different tasks, e.g. split ``--samples`` runs, share a row), one column per
task x metric, each cell the score with its stderr and the delta against the baseline row. Runs of
several models go on one leaderboard with one ``--baseline`` per model: each run's delta is then
against the baseline of its own model. Runs that differ in task version,
``--limit``, generation settings or chat template, and runs that reused unsteered answers
(``unsteered_from=``) from another baseline than the one they are compared with, are listed under
"Warnings" instead of being compared silently. When samples were logged (``--log_samples``), a per-instruction breakdown follows.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_steer.analysis.results import (
    MetricValue,
    ResultsError,
    Run,
    incompatibilities,
    load_runs,
    pick_baseline,
    read_samples,
    reuse_description,
    reuse_mismatches,
    select_metrics,
    steering_description,
)
from lm_eval_steer.analysis.tables import combined_stderr, format_value, markdown_table
from lm_eval_steer.atomic import atomic_write, write_text
from lm_eval_steer.console import fail

Column = tuple[str, str]  # (task, metric id)

CSV_FIELDS = ("run", "is_baseline", "task", "metric", "value", "stderr", "delta", "delta_stderr", "results_file")


@dataclass(frozen=True)
class Cell:
    """One run's score on one column and its difference to the baseline (None where missing)."""

    value: float | None
    stderr: float | None
    delta: float | None
    delta_stderr: float | None


# --------------------------------------------------------------------------- pure computations


def make_cell(current: MetricValue | None, baseline: MetricValue | None) -> Cell:
    """The cell for ``current`` with its delta against ``baseline`` (``current - baseline``)."""
    if current is None:
        return Cell(None, None, None, None)
    if baseline is None:
        return Cell(current.value, current.stderr, None, None)
    return Cell(
        current.value,
        current.stderr,
        current.value - baseline.value,
        combined_stderr(current.stderr, baseline.stderr),
    )


def columns_for(runs: Sequence[Run], metrics: Sequence[str], requested_tasks: Sequence[str] | None = None) -> list[Column]:
    """Task x metric columns present in at least one run: the ``requested_tasks`` (checked to exist) or
    every task in order of appearance, then metrics."""
    tasks = list(dict.fromkeys(task for run in runs for task in run.tasks))
    if requested_tasks:
        unknown = [task for task in requested_tasks if task not in tasks]
        if unknown:
            raise ResultsError(f"--tasks: {', '.join(unknown)} not in any input; available: {', '.join(tasks)}")
        tasks = list(dict.fromkeys(requested_tasks))
    return [
        (task, metric)
        for task in tasks
        for metric in metrics
        if any(metric in run.metrics.get(task, {}) for run in runs)
    ]


def lookup(run: Run, column: Column) -> MetricValue | None:
    task, metric = column
    return run.metrics.get(task, {}).get(metric)


def pick_baselines(runs: list[Run], specs: Sequence[str] | None) -> list[Run]:
    """The runs named by ``--baseline`` (the first run when none is named), at most one per model."""
    baselines = [pick_baseline(runs, spec) for spec in specs] if specs else [runs[0]]
    by_model: dict[str, Run] = {}
    for baseline in baselines:
        other = by_model.setdefault(baseline.model, baseline)
        if other is not baseline:
            raise ResultsError(
                f"--baseline: {other.label!r} and {baseline.label!r} are both runs of {baseline.model}; give one baseline per model"
            )
    return list(by_model.values())


def baseline_of(run: Run, baselines: Sequence[Run]) -> Run | None:
    """The baseline ``run`` is compared with: the only one, else the one of its own model (None when
    its model has none)."""
    if len(baselines) == 1:
        return baselines[0]
    return next((baseline for baseline in baselines if baseline.model == run.model), None)


def is_baseline(run: Run, baselines: Sequence[Run]) -> bool:
    return any(run is baseline for baseline in baselines)


def leaderboard_cells(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column]) -> list[list[Cell]]:
    """``cells[i][j]``: run i, column j, with deltas against run i's baseline (zero for a baseline itself)."""
    cells = []
    for run in runs:
        baseline = baseline_of(run, baselines)
        cells.append([make_cell(lookup(run, column), lookup(baseline, column) if baseline else None) for column in columns])
    return cells


def comparison_warnings(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column]) -> list[str]:
    """Setup differences against each run's baseline, runs without one, and scores missing from some runs."""
    warnings = []
    for run in runs:
        baseline = baseline_of(run, baselines)
        if baseline is None:
            warnings.append(f"{run.label}: no baseline of model {run.model} among the --baseline runs; no deltas shown")
        elif run is not baseline:
            problems = incompatibilities(baseline, run) + reuse_mismatches(run, baseline)
            warnings.extend(f"{run.label} vs baseline: {problem}" for problem in problems)
    for task, metric in columns:
        missing = [run.label for run in runs if lookup(run, (task, metric)) is None]
        if missing:
            warnings.append(f"{task} {metric}: not reported by {', '.join(missing)}")
    return warnings


def instruction_accuracy(samples: Iterable[dict[str, Any]], metric: str) -> dict[str, tuple[int, int]]:
    """Per IFEval instruction id: (followed, total) from per-sample logs.

    ``metric`` is an instruction-level metric (``inst_level_loose_acc``): each sample holds a list of
    booleans aligned with ``doc["instruction_id_list"]``. Only lines of the metric's filter count,
    because lm-eval logs every document once per filter.
    """
    name, _, filter_name = metric.partition(",")
    wanted_filter = filter_name or "none"
    counts: dict[str, list[int]] = {}
    for sample in samples:
        if sample.get("filter", wanted_filter) != wanted_filter:
            continue
        ids = (sample.get("doc") or {}).get("instruction_id_list") or []
        outcomes = sample.get(name)
        if not isinstance(outcomes, list) or len(outcomes) != len(ids):
            continue
        for instruction, followed in zip(ids, outcomes):
            tally = counts.setdefault(instruction, [0, 0])
            tally[0] += bool(followed)
            tally[1] += 1
    return {instruction: (hits, total) for instruction, (hits, total) in sorted(counts.items())}


def breakdown_metrics(metrics: Sequence[str]) -> list[str]:
    """Instruction-level metrics among those selected; loose accuracy when none was selected."""
    chosen = [metric for metric in metrics if metric.startswith("inst_level_")]
    return chosen or ["inst_level_loose_acc"]


# --------------------------------------------------------------------------- rendering


def short_metric(metric: str) -> str:
    """``prompt_level_strict_acc`` -> ``prompt strict``; other metric ids unchanged."""
    name, comma, filter_name = metric.partition(",")
    for level in ("prompt", "inst"):
        for kind in ("strict", "loose"):
            if name == f"{level}_level_{kind}_acc":
                name = f"{level} {kind}"
    return f"{name} ({filter_name})" if comma else name


def render_cell(cell: Cell, is_baseline: bool) -> str:
    """``0.300 ± 0.046 (Δ +0.050 ± 0.063)``; the baseline row carries no delta."""
    text = format_value(cell.value, cell.stderr)
    if cell.delta is None or is_baseline:
        return text
    return f"{text} (Δ {format_value(cell.delta, cell.delta_stderr, signed=True)})"


def scores_table(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column], cells: list[list[Cell]]) -> str:
    headers = ["run", *(f"{task} · {short_metric(metric)}" for task, metric in columns)]
    rows = [
        [f"{run.label} (baseline)" if is_baseline(run, baselines) else run.label]
        + [render_cell(cell, is_baseline(run, baselines)) for cell in row]
        for run, row in zip(runs, cells)
    ]
    return markdown_table(headers, rows)


def breakdown_section(runs: Sequence[Run], baselines: Sequence[Run], metrics: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """Markdown lines: per task (of ``tasks``) and instruction-level metric, accuracy per instruction and run."""
    lines: list[str] = []
    for task in dict.fromkeys(task for run in runs for task in run.sample_files if task in tasks):
        logged = [run for run in runs if task in run.sample_files]
        samples = {run.label: read_samples(run.sample_files[task]) for run in logged}
        for metric in breakdown_metrics(metrics):
            per_run = {run.label: instruction_accuracy(samples[run.label], metric) for run in logged}
            if any(per_run.values()):
                table = breakdown_table(logged, baselines, per_run)
                lines += ["", f"### {task} · {short_metric(metric)}", "", table]
    return lines


def breakdown_table(logged: Sequence[Run], baselines: Sequence[Run], per_run: dict[str, dict[str, tuple[int, int]]]) -> str:
    """One row per instruction id, one column per run that logged samples; deltas vs each run's baseline."""
    references = {run.label: _reference_counts(run, baselines, per_run) for run in logged}
    instructions = sorted({instruction for counts in per_run.values() for instruction in counts})
    rows = [
        [instruction]
        + [
            _breakdown_cell(per_run[run.label].get(instruction), references[run.label].get(instruction), is_baseline(run, baselines))
            for run in logged
        ]
        for instruction in instructions
    ]
    return markdown_table(["instruction", *(f"{run.label} (n)" for run in logged)], rows)


def _reference_counts(run: Run, baselines: Sequence[Run], per_run: dict[str, dict[str, tuple[int, int]]]) -> dict[str, tuple[int, int]]:
    """The per-instruction counts of ``run``'s baseline (empty when it has none or it logged no samples)."""
    baseline = baseline_of(run, baselines)
    return per_run.get(baseline.label, {}) if baseline else {}


def _breakdown_cell(counts: tuple[int, int] | None, reference: tuple[int, int] | None, is_baseline: bool) -> str:
    """``0.500 (4)`` or ``0.750 (4, Δ +0.250)``: accuracy, number of instances, delta."""
    if counts is None:
        return "—"
    accuracy = counts[0] / counts[1]
    if is_baseline or reference is None:
        return f"{accuracy:.3f} ({counts[1]})"
    return f"{accuracy:.3f} ({counts[1]}, Δ {accuracy - reference[0] / reference[1]:+.3f})"


def render_markdown(
    runs: Sequence[Run], baselines: Sequence[Run], metrics: Sequence[str], columns: Sequence[Column], warnings: Sequence[str]
) -> str:
    """The whole ``leaderboard.md``."""
    cells = leaderboard_cells(runs, baselines, columns)
    if len(baselines) == 1:
        heading = f"Baseline: **{baselines[0].label}**."
    else:
        heading = f"Baselines, one per model (each run is compared with its own model's): {', '.join(f'**{b.label}**' for b in baselines)}."
    lines = [
        "# Leaderboard",
        "",
        f"{heading} Cells: score ± stderr; Δ = run − baseline ± sqrt(stderr² + stderr_baseline²).",
        "",
        scores_table(runs, baselines, columns, cells),
        "",
        "## Runs",
        "",
        markdown_table(
            ["run", "results file", "steering", "reuse"],
            [[run.label, results_files(run), steering_description(run.steering), reuse_description(run.reused_from) or "—"] for run in runs],
        ),
    ]
    if warnings:
        lines += ["", "## Warnings", "", "Not like-for-like; deltas involving these runs are unreliable:", ""]
        lines += [f"- {warning}" for warning in warnings]
    breakdown = breakdown_section(runs, baselines, metrics, [task for task, _ in columns])
    if breakdown:
        lines += ["", "## Per-instruction accuracy (from logged samples)", *breakdown]
    return "\n".join(lines) + "\n"


def results_files(run: Run) -> str:
    """The run's results file, or the files of the split runs merged into it."""
    return "; ".join(str(path) for path in run.paths)


def csv_rows(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column]) -> list[dict[str, Any]]:
    """Long-format rows (one per run x task x metric), ready for pandas or a spreadsheet pivot."""
    cells = leaderboard_cells(runs, baselines, columns)
    return [
        {
            "run": run.label,
            "is_baseline": is_baseline(run, baselines),
            "task": task,
            "metric": metric,
            "value": cell.value,
            "stderr": cell.stderr,
            "delta": cell.delta,
            "delta_stderr": cell.delta_stderr,
            "results_file": results_files(run),
        }
        for run, row in zip(runs, cells)
        for (task, metric), cell in zip(columns, row)
        if cell.value is not None
    ]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def write_chart(path: Path, runs: Sequence[Run], columns: Sequence[Column]) -> None:
    """Grouped bars: one group per task x metric, one bar per run, stderr as error bars."""
    # Figure + Agg canvas instead of pyplot: no global backend switch, no GUI, no figure leaks.
    from matplotlib.figure import Figure

    width = 0.8 / max(len(runs), 1)
    # Room per group grows with the number of bars; the legend (long steering labels, one line per
    # run) goes below the axes, where constrained layout reserves space for it.
    size = (max(6.0, 1.5 + len(columns) * (0.6 + 0.4 * len(runs))), 4.5 + 0.25 * len(runs))
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots()
    for index, run in enumerate(runs):
        values = [lookup(run, column) for column in columns]
        positions = [j + (index - (len(runs) - 1) / 2) * width for j in range(len(columns))]
        axes.bar(
            positions,
            [v.value if v else 0.0 for v in values],
            width,
            # NaN draws no error bar: a missing stderr (IFEval's instruction-level metrics) is not zero
            yerr=[v.stderr if v and v.stderr is not None else math.nan for v in values],
            capsize=3,
            label=run.label,
        )
    labels = [f"{task}\n{short_metric(metric)}" for task, metric in columns]
    axes.set_xticks(range(len(columns)), labels, fontsize=8, rotation=30, ha="right")
    axes.set_ylabel("score (± stderr)")
    axes.set_title("lm-eval-steer leaderboard")
    figure.legend(fontsize=7, loc="outside lower center")
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=120))


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="results_*.json file or lm_eval --output_path directory")
    parser.add_argument(
        "--baseline",
        action="append",
        metavar="RUN",
        help="baseline run: a label, a RUN path, or another results path (default: the first RUN); "
        "repeat it, once per model, to compare runs of several models each against its own model's baseline",
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="LABEL",
        help="row label of each RUN, repeated once per RUN in order (default: model [vector file stems, route])",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="writes DIR/leaderboard.{md,csv,png}")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to show, in this order (default: every task of the runs)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="metrics to show (default: the four IFEval accuracies when present, else every metric); "
        "use metric,filter for a filter other than 'none'",
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the leaderboard was written, 2 when inputs are unreadable or unusable."""
    try:
        runs = load_runs(args.runs, args.label)
        baselines = pick_baselines(runs, args.baseline)
        metrics = select_metrics(runs, args.metrics)
        columns = columns_for(runs, metrics, args.tasks)
        warnings = comparison_warnings(runs, baselines, columns)
        markdown = render_markdown(runs, baselines, metrics, columns, warnings)
    except ResultsError as error:
        return fail("compare", error)
    for item in runs:
        print(f"using {results_files(item)}  ->  {item.label}")
    out: Path = args.out
    write_text(out / "leaderboard.md", markdown)
    write_csv(out / "leaderboard.csv", csv_rows(runs, baselines, columns))
    write_chart(out / "leaderboard.png", runs, columns)
    print(f"wrote {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'leaderboard.png'}")
    if warnings:
        print(f"{len(warnings)} warning(s): runs are not like-for-like, see the Warnings section", file=sys.stderr)
    return 0

