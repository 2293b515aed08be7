"""``lm-eval-steer check``: a CI gate that fails when instruction following regressed.

    lm-eval-steer check out/run --baseline baselines/smollm2.json [--tolerance 0.02 | --sigma 2] [--max-degenerate-increase 2]

Exit status: 0 no metric dropped more than allowed; 1 at least one did (the regressions are listed);
2 the inputs cannot be compared (unreadable file, a baseline task or metric missing from RESULTS,
different task versions / ``--limit`` / generation settings / chat template), or the check would
check nothing: no metric compared, or a gated metric that is not a finite number (a string, NaN).

A metric *drops* by ``baseline - current`` (the other way round for lower-is-better metrics). It is a
regression when the drop exceeds the allowance: ``--tolerance T`` (absolute, default 0.02), or with
``--sigma S``, ``S x sqrt(se_current^2 + se_baseline^2)``. IFEval's instruction-level accuracies
have no stderr in lm-eval's output; under ``--sigma`` those fall back to ``--tolerance``.

``--max-degenerate-increase P`` also gates what an accuracy costs: a gated task whose degenerate
share (answers that loop, :mod:`~lm_eval_steer.analysis.fluency`) rose by more than ``P`` percentage
points, ``100 x (share_current - share_baseline) > P``, is a regression (exit 1). Both runs need logged
samples (``--log_samples``) of every gated task and a loadable tokenizer: without them the rise
cannot be measured, and that is exit 2, never a pass.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lm_eval_steer.analysis.fluency import Fluency, NotMeasured, Tokenizers, degenerate_rise, measure, parse_tokenizer_args, pass_metric
from lm_eval_steer.analysis.results import (
    MetricValue,
    ResultsError,
    Run,
    incompatibilities,
    load_single_run,
    select_metrics,
)
from lm_eval_steer.analysis.tables import combined_stderr, format_value, markdown_table
from lm_eval_steer.core.console import EXIT_USAGE, fail

DEFAULT_TOLERANCE = 0.02

#: Slack on "drop > allowed". Scores are means of 0/1 outcomes and print as short decimals, but
#: 0.50 - 0.48 is 0.020000000000000018 in binary floating point: without the slack a drop of exactly
#: the tolerance would fail. 1e-9 is far below any real score difference (1 / 10^9 documents).
EPSILON = 1e-9

EXIT_OK, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, EXIT_USAGE


@dataclass(frozen=True)
class Verdict:
    """The outcome for one task x metric."""

    task: str
    metric: str
    baseline: MetricValue
    current: MetricValue
    allowed: float
    basis: str  # how ``allowed`` was obtained, shown in the table
    regressed: bool

    @property
    def delta(self) -> float:
        return self.current.value - self.baseline.value


@dataclass(frozen=True)
class LoopVerdict:
    """The outcome for one task's degenerate share under ``--max-degenerate-increase``."""

    task: str
    baseline: Fluency
    current: Fluency
    allowed: float  # percentage points

    @property
    def rise(self) -> float:
        """``100 x (share_current - share_baseline)``, in percentage points."""
        return degenerate_rise(self.current, self.baseline)

    @property
    def regressed(self) -> bool:
        return is_regression(self.rise, self.allowed)


# --------------------------------------------------------------------------- pure math


def drop(baseline: MetricValue, current: MetricValue) -> float:
    """How much worse ``current`` is than ``baseline`` (negative for an improvement)."""
    difference = baseline.value - current.value
    return difference if baseline.higher_is_better else -difference


def allowance(baseline: MetricValue, current: MetricValue, tolerance: float, sigma: float | None) -> tuple[float, str]:
    """The largest acceptable drop and a short description of where it comes from.

    ``sigma`` set: ``sigma * sqrt(se_b^2 + se_c^2)``; without a stderr on either side, ``tolerance``.
    """
    if sigma is not None:
        stderr = combined_stderr(baseline.stderr, current.stderr)
        if stderr is not None:
            return sigma * stderr, f"{sigma:g}σ"
        return tolerance, "tolerance, no stderr"
    return tolerance, "tolerance"


def is_regression(dropped: float, allowed: float) -> bool:
    """``dropped > allowed``, with EPSILON slack so that a drop of exactly ``allowed`` passes."""
    return dropped > allowed + EPSILON


def judge(task: str, metric: str, baseline: MetricValue, current: MetricValue, tolerance: float, sigma: float | None) -> Verdict:
    allowed, basis = allowance(baseline, current, tolerance, sigma)
    return Verdict(task, metric, baseline, current, allowed, basis, is_regression(drop(baseline, current), allowed))


def comparability_problems(baseline: Run, current: Run, metrics: Sequence[str]) -> list[str]:
    """Reasons the runs cannot be gated against each other (empty when they can)."""
    problems = list(incompatibilities(baseline, current))
    for task in baseline.tasks:
        wanted = [metric for metric in metrics if metric in baseline.metrics[task]]
        if not wanted:
            continue
        if task not in current.metrics:
            problems.append(f"task {task} is in the baseline but not in the results")
            continue
        missing = [metric for metric in wanted if metric not in current.metrics[task]]
        if missing:
            problems.append(f"task {task}: {', '.join(missing)} in the baseline but not in the results")
    return problems


def unreadable_problems(baseline: Run, current: Run, requested: Sequence[str] | None) -> list[str]:
    """Gated metrics (``--metrics``, else every metric) of the baseline's tasks whose value is not a
    finite number in either file: such a metric would silently go unchecked."""
    return [
        f"{run.path}: task {task}: {metric} is not a finite number"
        for run in (baseline, current)
        for task in baseline.tasks
        for metric in run.unreadable.get(task, ())
        if not requested or metric in requested
    ]


def verdicts_for(baseline: Run, current: Run, metrics: Sequence[str], tolerance: float, sigma: float | None) -> list[Verdict]:
    """One verdict per baseline task x selected metric (both runs must have it)."""
    return [
        judge(task, metric, baseline.metrics[task][metric], current.metrics[task][metric], tolerance, sigma)
        for task in baseline.tasks
        for metric in metrics
        if metric in baseline.metrics[task] and metric in current.metrics.get(task, {})
    ]


def gated_tasks(verdicts: Sequence[Verdict]) -> list[str]:
    """The tasks of the verdicts, in order, each once."""
    return list(dict.fromkeys(verdict.task for verdict in verdicts))


def loop_verdicts(baseline: Run, current: Run, metrics: Sequence[str], tasks: Sequence[str], allowed: float, tokenizers: Tokenizers) -> list[LoopVerdict]:
    """One :class:`LoopVerdict` per gated task; NotMeasured (one line, naming the run and task) when a
    run lacks the task's logged samples, or its answers cannot be measured."""
    missing = [
        f"{run.label} ({role}) has no logged samples for {task}"
        for task in tasks
        for role, run in (("baseline", baseline), ("results", current))
        if task not in run.sample_files
    ]
    if missing:
        raise NotMeasured(f"{'; '.join(missing)}: rerun lm_eval with --log_samples")
    verdicts = []
    for task in tasks:
        metric = pass_metric(baseline.metrics[task], metrics)
        measured = []
        for run in (baseline, current):
            try:
                measured.append(measure(run, task, metric, tokenizers))
            except NotMeasured as reason:
                raise NotMeasured(f"{run.label}: {reason}") from None
        verdicts.append(LoopVerdict(task, measured[0], measured[1], allowed))
    return verdicts


# --------------------------------------------------------------------------- output


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    """task | metric | baseline | current | delta | allowed drop | status."""
    headers = ["task", "metric", "baseline", "current", "delta", "allowed drop", "status"]
    rows = [
        [
            v.task,
            v.metric,
            format_value(v.baseline.value, v.baseline.stderr),
            format_value(v.current.value, v.current.stderr),
            format_value(v.delta, signed=True),
            f"{v.allowed:.4g} ({v.basis})",
            "REGRESSION" if v.regressed else "ok",
        ]
        for v in verdicts
    ]
    return markdown_table(headers, rows)


def loop_table(verdicts: Sequence[LoopVerdict]) -> str:
    """task | baseline loop | current loop | rise | allowed rise | status."""
    headers = ["task", "baseline loop", "current loop", "rise (points)", "allowed rise", "status"]
    rows = [
        [
            v.task,
            f"{v.baseline.degenerate_share:.1%} ({v.baseline.degenerate}/{v.baseline.docs})",
            f"{v.current.degenerate_share:.1%} ({v.current.degenerate}/{v.current.docs})",
            f"{v.rise:+.1f}",
            f"{v.allowed:g}",
            "REGRESSION" if v.regressed else "ok",
        ]
        for v in verdicts
    ]
    return markdown_table(headers, rows)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS", help="results_*.json file or lm_eval --output_path directory (one model)")
    parser.add_argument("--baseline", required=True, metavar="BASELINE", help="the reference results file or directory")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest allowed absolute drop (default {DEFAULT_TOLERANCE}); a drop exactly equal passes. "
        "With --sigma: used only for metrics without a stderr",
    )
    parser.add_argument("--sigma", type=float, help="allow a drop of up to SIGMA x sqrt(se_current^2 + se_baseline^2) instead")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC", help="metrics to gate (default: the four IFEval accuracies when present, else all)")
    parser.add_argument(
        "--max-degenerate-increase",
        type=float,
        metavar="POINTS",
        help="also fail when a gated task's share of looping answers rose by more than POINTS percentage points "
        "(needs both runs' --log_samples; a rise exactly equal passes)",
    )
    parser.add_argument(
        "--tokenizer_args",
        metavar="ARGS",
        help="with --max-degenerate-increase: the tokenizer of both runs, e.g. pretrained=DIR,gguf_file=F (default: each run's own, from its config.model_args)",
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 ok, 1 regression, 2 not comparable (see the module docstring)."""
    for flag, value in (("--tolerance", args.tolerance), ("--sigma", args.sigma), ("--max-degenerate-increase", args.max_degenerate_increase)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            return fail("check", f"{flag} {value} must be a finite number >= 0")
    try:
        baseline = load_single_run(args.baseline)
        current = load_single_run(args.results)
        metrics = select_metrics([baseline], args.metrics)
        override = parse_tokenizer_args(args.tokenizer_args) if args.tokenizer_args else None
    except ResultsError as error:
        return fail("check", error)
    unreadable = unreadable_problems(baseline, current, args.metrics)
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        return fail("check", f"{unreadable[0]}{more}: it cannot be checked")
    print(f"baseline: {baseline.path} ({baseline.label})")
    print(f"results:  {current.path} ({current.label})")
    problems = comparability_problems(baseline, current, metrics)
    verdicts = verdicts_for(baseline, current, metrics, args.tolerance, args.sigma)
    if verdicts:
        print("\n" + verdict_table(verdicts))
    unchecked = [task for task in current.tasks if task not in baseline.metrics]
    if unchecked:
        print(f"\nnot in the baseline, not checked: {', '.join(unchecked)}")
    if problems:
        print("\nNOT COMPARABLE:", file=sys.stderr)
        print("\n".join(f"- {problem}" for problem in problems), file=sys.stderr)
        return EXIT_NOT_COMPARABLE
    if not verdicts:
        return fail("check", f"nothing was checked: no metric of {baseline.path} ({', '.join(metrics) or 'none found'}) could be compared")
    loops: list[LoopVerdict] = []
    if args.max_degenerate_increase is not None:
        try:
            loops = loop_verdicts(baseline, current, metrics, gated_tasks(verdicts), args.max_degenerate_increase, Tokenizers(override))
        except (NotMeasured, ResultsError) as reason:
            return fail("check", f"not comparable: --max-degenerate-increase: {reason}")
        print("\n" + loop_table(loops))
    return verdict_status(verdicts, loops)


def verdict_status(verdicts: Sequence[Verdict], loops: Sequence[LoopVerdict]) -> int:
    """Prints the regressions (or the all-clear) and returns exit 1 when there is any, else 0."""
    regressions = [v for v in verdicts if v.regressed]
    loop_regressions = [v for v in loops if v.regressed]
    if regressions:
        print(f"\n{len(regressions)} REGRESSION(S):\n\n{verdict_table(regressions)}")
    if loop_regressions:
        print(f"\n{len(loop_regressions)} LOOP REGRESSION(S): degenerate share rose too much\n\n{loop_table(loop_regressions)}")
    if regressions or loop_regressions:
        return EXIT_REGRESSION
    print(f"\nok: {len(verdicts)} metric(s) within the allowed drop" + (f", {len(loops)} task(s) within the allowed loop rise" if loops else ""))
    return EXIT_OK
