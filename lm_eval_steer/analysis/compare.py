"""``lm-eval-steer compare``: a leaderboard (Markdown, CSV, PNG) from lm-eval results.

    lm-eval-steer compare runs/base runs/steered.json [--baseline runs/base] --out leaderboard/

One row per run (model + steering configuration; ``--label`` names them, and runs of one
configuration over different tasks, e.g. split ``--samples`` runs, share a row), one column per
task x metric, each cell the score with its stderr and the delta against the baseline row. Runs of
several models go on one leaderboard with one ``--baseline`` per model: each run's delta is then
against the baseline of its own model. Runs that differ in task version,
``--limit``, generation settings or chat template, and runs that reused unsteered answers
(``unsteered_from=``) from another baseline than the one they are compared with, are listed under
"Warnings" instead of being compared silently. When samples were logged (``--log_samples``), a per-instruction breakdown follows, and for
steered runs the accuracy of the instructions that share a steered prompt without an entry of their
own (:mod:`~lm_eval_steer.analysis.unserved`).

No accuracy without its cost: from the logged answers (:mod:`~lm_eval_steer.analysis.fluency`),
every accuracy cell also shows the run's degenerate share on its task and the change against the
baseline in percentage points (``0.826 ± 0.041 (Δ +0.640 ± 0.058) · loop 51.2% (+18.6)``), and each
task's first column is its **fluent pass rate**: the share of documents that pass and whose answer
does not loop. Runs without logged samples, or whose tokenizer cannot be loaded, show "—" there and a
warning; ``--no-degeneracy`` leaves both out.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lm_eval_steer.analysis.fluency import Fluency, NotMeasured, ReadSamples, Tokenizers, degenerate_rise, measure, parse_tokenizer_args, task_pass_metric
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
from lm_eval_steer.analysis.unserved import RecordedRouting, compare_unserved, outcomes_by_document, unserved_outcomes
from lm_eval_steer.core.atomic import atomic_write, write_text
from lm_eval_steer.core.console import fail

Column = tuple[str, str]  # (task, metric id)
Shown = tuple[str, str | None]  # a table column: (task, metric id), or (task, None) for the task's fluent pass rate

#: The degeneracy fields of a CSV row (empty where not measured): fractions, the deltas against the baseline.
COST_FIELDS = (
    "fluent_pass",
    "fluent_pass_stderr",
    "fluent_pass_delta",
    "fluent_pass_delta_stderr",
    "fluent_pass_metric",
    "degenerate_share",
    "degenerate_share_delta",
)
CSV_FIELDS = ("run", "is_baseline", "task", "metric", "value", "stderr", "delta", "delta_stderr", *COST_FIELDS, "results_file")


@dataclass(frozen=True)
class Cell:
    """One run's score on one column and its difference to the baseline (None where missing)."""

    value: float | None
    stderr: float | None
    delta: float | None
    delta_stderr: float | None


EMPTY_CELL = Cell(None, None, None, None)


@dataclass(frozen=True)
class TaskCost:
    """One run's degenerate share on one task (a fraction; None where not measured), its change against
    the baseline in percentage points, and its fluent pass rate as a cell."""

    loop: float | None
    loop_delta: float | None
    fluent: Cell


NOT_MEASURED = TaskCost(None, None, EMPTY_CELL)


@dataclass(frozen=True)
class Costs:
    """The degeneracy part of a leaderboard: each task's pass metric, what was measured per
    (run label, task), why the rest was not, and which tokenizer measured it."""

    pass_metrics: dict[str, str | None]
    measured: dict[tuple[str, str], Fluency]
    warnings: list[str]
    tokenizer: str


# --------------------------------------------------------------------------- pure computations


def make_cell(current: MetricValue | None, baseline: MetricValue | None) -> Cell:
    """The cell for ``current`` with its delta against ``baseline`` (``current - baseline``)."""
    if current is None:
        return EMPTY_CELL
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


def column_tasks(columns: Sequence[Column]) -> list[str]:
    """The tasks of ``columns``, in order, each once."""
    return list(dict.fromkeys(task for task, _ in columns))


def run_costs(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column], costs: Costs | None) -> Sequence[dict[str, TaskCost] | None]:
    """:func:`task_costs` over the tasks of ``columns``; None per run without ``costs``."""
    if costs is None:
        return [None] * len(runs)
    return task_costs(runs, baselines, column_tasks(columns), costs.measured)


def make_cost(current: Fluency | None, baseline: Fluency | None) -> TaskCost:
    """``current``'s degenerate share with ``100 × (share − share_baseline)``, and its fluent pass rate
    with ``rate − rate_baseline`` ± the combined stderr (no deltas without a measured baseline)."""
    if current is None:
        return NOT_MEASURED
    if baseline is None:
        return TaskCost(current.degenerate_share, None, make_cell(current.fluent_rate, None))
    return TaskCost(current.degenerate_share, degenerate_rise(current, baseline), make_cell(current.fluent_rate, baseline.fluent_rate))


def task_costs(runs: Sequence[Run], baselines: Sequence[Run], tasks: Sequence[str], measured: dict[tuple[str, str], Fluency]) -> list[dict[str, TaskCost]]:
    """``costs[i][task]``: run i's cost on ``task``, against run i's baseline."""
    costs = []
    for run in runs:
        baseline = baseline_of(run, baselines)
        reference = {task: measured.get((baseline.label, task)) for task in tasks} if baseline else {}
        costs.append({task: make_cost(measured.get((run.label, task)), reference.get(task)) for task in tasks})
    return costs


def missing_samples_warning(runs: Sequence[Run], tasks: Sequence[str]) -> str | None:
    """One line naming the runs without logged samples for some shown task they report (``run``
    alone when it logged none of them, else ``run (task, ...)``); None when every run logged all."""
    parts = []
    for run in runs:
        reported = [task for task in tasks if task in run.metrics]
        missing = [task for task in reported if task not in run.sample_files]
        if missing:
            parts.append(run.label if len(missing) == len(reported) else f"{run.label} ({', '.join(missing)})")
    if not parts:
        return None
    return f"no logged samples (lm_eval --log_samples), so no loop share or fluent pass: {'; '.join(parts)}"


def table_columns(columns: Sequence[Column], with_costs: bool) -> list[Shown]:
    """The scores table's columns in order: per task, its fluent pass rate first (``with_costs``),
    then its metrics."""
    if not with_costs:
        return list(columns)
    return [column for task in column_tasks(columns) for column in [(task, None), *(c for c in columns if c[0] == task)]]


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


# --------------------------------------------------------------------------- measuring logged answers (I/O)


def measure_costs(runs: Sequence[Run], columns: Sequence[Column], tokenizers: Tokenizers, samples: ReadSamples) -> Costs:
    """Reads the logged answers of every run and shown task through ``samples`` and measures them
    (:func:`fluency.measure`); what cannot be measured becomes a warning line (one per run for a
    tokenizer that fails)."""
    tasks = column_tasks(columns)
    pass_metrics = {task: task_pass_metric(runs, task, [m for t, m in columns if t == task]) for task in tasks}
    measured: dict[tuple[str, str], Fluency] = {}
    problems: list[str] = []
    for run in runs:
        for task in (task for task in tasks if task in run.sample_files):
            try:
                measured[(run.label, task)] = found = measure(run, task, pass_metrics[task], tokenizers, samples)
            except NotMeasured as reason:
                problems.append(f"{run.label}: {reason}")
                continue
            if found.fluent is None:
                problems.append(f"{run.label}: {task}: no fluent pass: its samples do not log {pass_metrics[task]} as true/false per document")
    missing = missing_samples_warning(runs, tasks)
    source = f"--tokenizer_args {tokenizers.override}" if tokenizers.override else "each run's own tokenizer (its config.model_args)"
    return Costs(pass_metrics, measured, [*([missing] if missing else []), *dict.fromkeys(problems)], source)


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


def render_loop(cost: TaskCost, is_baseline: bool) -> str:
    """``loop 51.2% (+18.6)``: the degenerate share and its change in percentage points; ``loop —``
    where it was not measured; the baseline row carries no change."""
    if cost.loop is None:
        return "loop —"
    if cost.loop_delta is None or is_baseline:
        return f"loop {cost.loop:.1%}"
    return f"loop {cost.loop:.1%} ({cost.loop_delta:+.1f})"


def column_header(column: Shown, costs: Costs | None) -> str:
    """``task · prompt loose``, or ``task · fluent pass (prompt loose)`` for a fluent pass rate column."""
    task, metric = column
    if metric is not None:
        return f"{task} · {short_metric(metric)}"
    pass_metric = costs.pass_metrics.get(task) if costs else None
    return f"{task} · fluent pass ({short_metric(pass_metric)})" if pass_metric else f"{task} · fluent pass"


def table_cell(column: Shown, cells: dict[Column, Cell], costs: dict[str, TaskCost] | None, is_baseline: bool) -> str:
    """One cell of the scores table: a fluent pass rate, or a score followed (with ``costs``) by its
    task's loop share; a score the run does not report is a bare "—"."""
    task, metric = column
    cost = (costs or {}).get(task, NOT_MEASURED)
    if metric is None:
        return render_cell(cost.fluent, is_baseline)
    cell = cells[(task, metric)]
    score = render_cell(cell, is_baseline)
    return score if costs is None or cell.value is None else f"{score} · {render_loop(cost, is_baseline)}"


def scores_table(
    runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column], cells: list[list[Cell]], costs: Costs | None = None
) -> str:
    """One row per run; per task its fluent pass rate (with ``costs``), then its scores."""
    shown = table_columns(columns, costs is not None)
    per_run = run_costs(runs, baselines, columns, costs)
    rows = []
    for run, row, cost in zip(runs, cells, per_run):
        by_column, base = dict(zip(columns, row)), is_baseline(run, baselines)
        rows.append([f"{run.label} (baseline)" if base else run.label, *(table_cell(column, by_column, cost, base) for column in shown)])
    return markdown_table(["run", *(column_header(column, costs) for column in shown)], rows)


def costs_legend(costs: Costs) -> str:
    """What the fluent pass and loop figures mean and which tokenizer counted the tokens."""
    return (
        "Fluent pass = share of documents that pass (the metric in its header) and whose answer does not loop: "
        "the rate to trust. loop = share of answers that loop (≥ 16 tokens, more than half of the token 4-grams "
        f"repeated), (+x) its change against the baseline in percentage points. Tokens: {costs.tokenizer}."
    )


def breakdown_section(runs: Sequence[Run], baselines: Sequence[Run], metrics: Sequence[str], tasks: Sequence[str], samples: ReadSamples) -> list[str]:
    """Markdown lines: per task (of ``tasks``) and instruction-level metric, accuracy per instruction and
    run, from the lines ``samples`` reads."""
    lines: list[str] = []
    for task in dict.fromkeys(task for run in runs for task in run.sample_files if task in tasks):
        logged = [run for run in runs if task in run.sample_files]
        rows = {run.label: samples(run.sample_files[task]) for run in logged}
        for metric in breakdown_metrics(metrics):
            per_run = {run.label: instruction_accuracy(rows[run.label], metric) for run in logged}
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


def unserved_section(runs: Sequence[Run], baselines: Sequence[Run], metrics: Sequence[str], tasks: Sequence[str], samples: ReadSamples) -> list[str]:
    """Markdown lines: per task and steered run, the instructions of its steered documents that had no
    entry of their own, followed by the run and by its baseline on the same documents
    (:mod:`~lm_eval_steer.analysis.unserved`), from the lines ``samples`` reads; nothing when no run
    has such instructions."""
    rows = []
    for task in dict.fromkeys(tasks):
        for run in runs:
            baseline, routing = baseline_of(run, baselines), RecordedRouting.of(run.steering)
            if is_baseline(run, baselines) or baseline is None or routing is None or task not in run.sample_files or task not in baseline.sample_files:
                continue
            run_samples, baseline_samples = samples(run.sample_files[task]), samples(baseline.sample_files[task])
            for metric in breakdown_metrics(metrics):
                tally = compare_unserved(unserved_outcomes(run_samples, routing, metric), outcomes_by_document(baseline_samples, metric))
                if tally is not None:
                    stderr = "" if tally.delta_stderr is None else f" ± {tally.delta_stderr:.3f}"
                    rows.append(
                        [task, short_metric(metric), run.label, str(tally.documents), str(tally.instructions), f"{tally.baseline_accuracy:.3f}",
                         f"{tally.accuracy:.3f} (Δ {tally.delta:+.3f}{stderr})", f"+{tally.gained} / −{tally.lost}"]
                    )
    if not rows:
        return []
    table = markdown_table(["task", "metric", "run", "steered documents", "unserved instructions", "baseline", "run", "gained / lost"], rows)
    return ["", "## Instructions without an entry, in steered prompts", "", UNSERVED_LEGEND, "", table]


#: What the unserved-instructions table shows, printed above it.
UNSERVED_LEGEND = (
    "A steered document's instructions that no entry of the run serves (routed again from the run's recorded "
    "steering), and how often the run and its baseline follow them on the same documents: the cost of "
    "steering one instruction to the others in its prompt. Δ ± the paired standard error, each instruction "
    "counted as independent; gained / lost: instructions followed by the run and not the baseline, and the reverse."
)


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
    runs: Sequence[Run],
    baselines: Sequence[Run],
    metrics: Sequence[str],
    columns: Sequence[Column],
    warnings: Sequence[str],
    samples: ReadSamples,
    costs: Costs | None = None,
) -> str:
    """The whole ``leaderboard.md``; with ``costs``, fluent pass rates and loop shares beside the scores;
    the per-instruction sections from the lines ``samples`` reads."""
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
        scores_table(runs, baselines, columns, cells, costs),
        *(["", costs_legend(costs)] if costs else []),
        "",
        "## Runs",
        "",
        markdown_table(
            ["run", "results file", "steering", "reuse"],
            [[run.label, results_files(run), steering_description(run.steering), reuse_description(run.reused_from, run.steered_from) or "—"] for run in runs],
        ),
    ]
    if warnings:
        lines += ["", "## Warnings", "", "Not like-for-like; deltas involving these runs are unreliable:", ""]
        lines += [f"- {warning}" for warning in warnings]
    if costs and costs.warnings:
        lines += ["", "## Loop share and fluent pass not measured", "", "Shown as —:", ""]
        lines += [f"- {warning}" for warning in costs.warnings]
    breakdown = breakdown_section(runs, baselines, metrics, [task for task, _ in columns], samples)
    if breakdown:
        lines += ["", "## Per-instruction accuracy (from logged samples)", *breakdown]
    lines += unserved_section(runs, baselines, metrics, [task for task, _ in columns], samples)
    return "\n".join(lines) + "\n"


def results_files(run: Run) -> str:
    """The run's results file, or the files of the split runs merged into it."""
    return "; ".join(str(path) for path in run.paths)


def cost_fields(cost: TaskCost | None, pass_metric: str | None) -> dict[str, Any]:
    """:data:`COST_FIELDS` of one run and task (all None without ``cost``); the delta as a fraction."""
    if cost is None:
        return dict.fromkeys(COST_FIELDS)
    fluent = cost.fluent
    return {
        "fluent_pass": fluent.value,
        "fluent_pass_stderr": fluent.stderr,
        "fluent_pass_delta": fluent.delta,
        "fluent_pass_delta_stderr": fluent.delta_stderr,
        "fluent_pass_metric": pass_metric if fluent.value is not None else None,
        "degenerate_share": cost.loop,
        "degenerate_share_delta": None if cost.loop_delta is None else cost.loop_delta / 100,
    }


def csv_rows(runs: Sequence[Run], baselines: Sequence[Run], columns: Sequence[Column], costs: Costs | None = None) -> list[dict[str, Any]]:
    """Long-format rows (one per run x task x metric), ready for pandas or a spreadsheet pivot; each
    carries its task's fluent pass rate and degenerate share (:data:`COST_FIELDS`)."""
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
            **cost_fields((cost or {}).get(task), costs.pass_metrics.get(task) if costs else None),
            "results_file": results_files(run),
        }
        for run, row, cost in zip(runs, cells, run_costs(runs, baselines, columns, costs))
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
    parser.add_argument("--label", action="append", metavar="LABEL", help="row label of each RUN, repeated once per RUN in order (default: model [vector file stems, route])")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="writes DIR/leaderboard.{md,csv,png}")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to show, in this order (default: every task of the runs)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="metrics to show (default: the four IFEval accuracies when present, else every metric); "
        "use metric,filter for a filter other than 'none'",
    )
    parser.add_argument(
        "--tokenizer_args",
        metavar="ARGS",
        help="the tokenizer that counts the tokens of every run's answers, e.g. pretrained=DIR,gguf_file=F "
        "(keys: pretrained, gguf_file, tokenizer, revision; default: each run's own, from its config.model_args)",
    )
    parser.add_argument(
        "--no-degeneracy",
        dest="degeneracy",
        action="store_false",
        help="leave out the loop shares and fluent pass rates (no tokenizer is loaded)",
    )


def shared_samples() -> ReadSamples:
    """:func:`read_samples` that parses each file once and hands every later reader the same lines
    (which no reader modifies): the loop shares, the per-instruction breakdown and the unserved
    section all read the same files, the unserved section the baseline's once per steered run."""
    return cache(read_samples)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the leaderboard was written, 2 when inputs are unreadable or unusable."""
    try:
        runs = load_runs(args.runs, args.label)
        baselines = pick_baselines(runs, args.baseline)
        metrics = select_metrics(runs, args.metrics)
        columns = columns_for(runs, metrics, args.tasks)
        warnings = comparison_warnings(runs, baselines, columns)
        samples = shared_samples()
        costs = None
        if args.degeneracy:
            override = parse_tokenizer_args(args.tokenizer_args) if args.tokenizer_args else None
            costs = measure_costs(runs, columns, Tokenizers(override), samples)
        markdown = render_markdown(runs, baselines, metrics, columns, warnings, samples, costs)
    except ResultsError as error:
        return fail("compare", error)
    for item in runs:
        print(f"using {results_files(item)}  ->  {item.label}")
    out: Path = args.out
    write_text(out / "leaderboard.md", markdown)
    write_csv(out / "leaderboard.csv", csv_rows(runs, baselines, columns, costs))
    write_chart(out / "leaderboard.png", runs, columns)
    print(f"wrote {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'leaderboard.png'}")
    if warnings:
        print(f"{len(warnings)} warning(s): runs are not like-for-like, see the Warnings section", file=sys.stderr)
    for warning in costs.warnings if costs else []:
        print(f"warning: {warning}", file=sys.stderr)
    return 0

