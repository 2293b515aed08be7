"""``lm-eval-steer check`` on synthetic results files: every exit code and the tolerance edges.

Values at the tolerance edge are chosen two ways: exactly representable in binary (0.5 -> 0.4375
with tolerance 0.0625) so that "exactly at the tolerance" is exact, and decimal (0.50 -> 0.48 with
tolerance 0.02, a drop of 0.020000000000000018 in floating point) to pin down check.EPSILON's slack.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from results_fixtures import FLUENT, LOOPING, answered_samples, ifeval_scores, table_rows, write_run

from lm_eval_steer.analysis import check
from lm_eval_steer.cli import main
from lm_eval_steer.analysis.results import MetricValue

TASK = "ifeval_format"


def ifeval_run(out: Path, prompt_strict: float = 0.5, *, se: float | None = 0.05, **options) -> Path:
    """A one-task run whose prompt-level strict accuracy is ``prompt_strict``; the rest fixed."""
    return write_run(out, {TASK: ifeval_scores(prompt_strict, 0.625, 0.5, 0.75, se=se)}, **options)


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return ifeval_run(tmp_path / "baseline")


def run_check(results: Path, baseline: Path, *extra: str) -> int:
    return main(["check", str(results), "--baseline", str(baseline), *extra])


# --------------------------------------------------------------------------- pure functions


def test_drop_respects_direction() -> None:
    assert check.drop(MetricValue(0.5, None), MetricValue(0.4, None)) == pytest.approx(0.1)
    assert check.drop(MetricValue(0.5, None), MetricValue(0.6, None)) == pytest.approx(-0.1)
    # lower is better (e.g. perplexity): a rise is the drop
    assert check.drop(MetricValue(10.0, None, False), MetricValue(12.0, None, False)) == pytest.approx(2.0)


def test_allowance_modes() -> None:
    a, b = MetricValue(0.5, 0.03), MetricValue(0.4, 0.04)
    assert check.allowance(a, b, 0.02, None) == (0.02, "tolerance")
    allowed, basis = check.allowance(a, b, 0.02, 2.0)
    assert allowed == pytest.approx(0.1) and basis == "2σ"
    assert check.allowance(MetricValue(0.5, None), b, 0.02, 2.0) == (0.02, "tolerance, no stderr")


def test_is_regression_edges() -> None:
    assert not check.is_regression(0.0625, 0.0625)
    assert not check.is_regression(0.50 - 0.48, 0.02)  # 0.020000000000000018: within EPSILON
    assert check.is_regression(0.50 - 0.47, 0.02)
    assert check.is_regression(0.02 + 1e-6, 0.02)


# --------------------------------------------------------------------------- exit 0


def test_identical_runs_pass_and_print_all_metrics(tmp_path: Path, baseline: Path, capsys) -> None:
    assert run_check(ifeval_run(tmp_path / "current"), baseline) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0] == ["task", "metric", "baseline", "current", "delta", "allowed drop", "status"]
    assert [row[1] for row in rows[1:]] == ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"]
    assert rows[2] == [TASK, "inst_level_strict_acc", "0.625", "0.625", "+0.000", "0.02 (tolerance)", "ok"]
    assert "ok: 4 metric(s)" in out
    assert "REGRESSION" not in out


def test_improvement_passes(tmp_path: Path, baseline: Path, capsys) -> None:
    assert run_check(ifeval_run(tmp_path / "current", 0.75), baseline) == 0
    assert "+0.250" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("base", "current", "tolerance"),
    [(0.5, 0.4375, "0.0625"), (0.50, 0.48, "0.02")],
    ids=["binary-exact", "decimal-within-epsilon"],
)
def test_drop_exactly_at_tolerance_passes(tmp_path: Path, base: float, current: float, tolerance: str) -> None:
    reference = ifeval_run(tmp_path / "baseline", base)
    assert run_check(ifeval_run(tmp_path / "current", current), reference, "--tolerance", tolerance) == 0


def test_sigma_mode_within_allowance(tmp_path: Path) -> None:
    # se 0.03 and 0.04 combine to 0.05; 2 sigma allows 0.10; the drop is 0.09
    reference = ifeval_run(tmp_path / "baseline", 0.5, se=0.03)
    current = ifeval_run(tmp_path / "current", 0.41, se=0.04)
    assert run_check(current, reference, "--sigma", "2") == 0
    assert run_check(current, reference, "--tolerance", "0.02") == 1  # the same drop fails a 0.02 gate


# --------------------------------------------------------------------------- exit 1


def test_drop_beyond_tolerance_fails_with_regression_table(tmp_path: Path, baseline: Path, capsys) -> None:
    assert run_check(ifeval_run(tmp_path / "current", 0.375), baseline, "--tolerance", "0.0625") == 1
    out = capsys.readouterr().out
    assert "1 REGRESSION(S)" in out
    regressions = table_rows(out.split("REGRESSION(S):")[1])
    assert len(regressions) == 2  # header + the one regressed metric
    assert regressions[1] == [TASK, "prompt_level_strict_acc", "0.500 ± 0.050", "0.375 ± 0.050", "-0.125", "0.0625 (tolerance)", "REGRESSION"]


def test_decimal_drop_just_beyond_default_tolerance_fails(tmp_path: Path) -> None:
    reference = ifeval_run(tmp_path / "baseline", 0.50)
    assert run_check(ifeval_run(tmp_path / "current", 0.47), reference) == 1


def test_sigma_mode_regression(tmp_path: Path, capsys) -> None:
    reference = ifeval_run(tmp_path / "baseline", 0.5, se=0.03)
    current = ifeval_run(tmp_path / "current", 0.39, se=0.04)  # drop 0.11 > 0.10
    assert run_check(current, reference, "--sigma", "2") == 1
    assert "0.1 (2σ)" in capsys.readouterr().out


def test_sigma_falls_back_to_tolerance_without_stderr(tmp_path: Path, capsys) -> None:
    reference = write_run(tmp_path / "baseline", {TASK: ifeval_scores(0.5, 0.625, 0.5, 0.75)})
    current = write_run(tmp_path / "current", {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.75)})  # inst strict -0.125
    assert run_check(current, reference, "--sigma", "2", "--tolerance", "0.2") == 0
    assert run_check(current, reference, "--sigma", "2") == 1
    assert "tolerance, no stderr" in capsys.readouterr().out


def test_lower_is_better_metric_rising_is_a_regression(tmp_path: Path) -> None:
    scores = {"word_perplexity": (10.0, None)}
    reference = write_run(tmp_path / "baseline", {"wikitext": scores}, lower_is_better=["word_perplexity"])
    worse = write_run(tmp_path / "current", {"wikitext": {"word_perplexity": (11.0, None)}}, lower_is_better=["word_perplexity"])
    better = write_run(tmp_path / "better", {"wikitext": {"word_perplexity": (9.0, None)}}, lower_is_better=["word_perplexity"])
    assert run_check(worse, reference) == 1
    assert run_check(better, reference) == 0


def test_metrics_option_limits_the_gate(tmp_path: Path, baseline: Path) -> None:
    current = ifeval_run(tmp_path / "current", 0.25)  # only prompt-level strict dropped
    assert run_check(current, baseline) == 1
    assert run_check(current, baseline, "--metrics", "prompt_level_loose_acc", "inst_level_loose_acc") == 0


# --------------------------------------------------------------------------- exit 2


def test_missing_task_is_not_comparable(tmp_path: Path, capsys) -> None:
    reference = write_run(tmp_path / "baseline", {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.5), "ifeval_length": ifeval_scores(0.5, 0.5, 0.5, 0.5)})
    current = write_run(tmp_path / "current", {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.5)})
    assert run_check(current, reference) == 2
    assert "task ifeval_length is in the baseline but not in the results" in capsys.readouterr().err


def test_extra_task_in_results_is_reported_not_checked(tmp_path: Path, baseline: Path, capsys) -> None:
    current = write_run(tmp_path / "current", {TASK: ifeval_scores(0.5, 0.625, 0.5, 0.75), "ifeval_new": ifeval_scores(0, 0, 0, 0)})
    assert run_check(current, baseline) == 0
    assert "not in the baseline, not checked: ifeval_new" in capsys.readouterr().out


def test_missing_metric_is_not_comparable(tmp_path: Path, baseline: Path, capsys) -> None:
    scores = ifeval_scores(0.5, 0.625, 0.5, 0.75)
    del scores["inst_level_loose_acc"]
    assert run_check(write_run(tmp_path / "current", {TASK: scores}), baseline) == 2
    assert "inst_level_loose_acc in the baseline but not in the results" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 10.0}, "--limit 10.0 vs 20.0"),
        ({"versions": {TASK: 5.0}}, "version 5.0 vs 4.0"),
        ({"gen_kwargs": {"max_gen_toks": 32}}, "--gen_kwargs"),
        ({"task_gen_kwargs": {TASK: {"until": [], "do_sample": True}}}, "generation_kwargs"),
        ({"n": 19}, "19 documents vs 20"),
    ],
    ids=["limit", "version", "gen_kwargs", "task-generation-kwargs", "documents"],
)
def test_mismatched_configuration_is_not_comparable(tmp_path: Path, baseline: Path, capsys, options, message) -> None:
    # the scores are identical: only the setup differs, and that alone must stop the gate
    assert run_check(ifeval_run(tmp_path / "current", **options), baseline) == 2
    err = capsys.readouterr().err
    assert "NOT COMPARABLE" in err and message in err


def test_unreadable_results_file_names_the_file(tmp_path: Path, baseline: Path, capsys) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    assert run_check(broken, baseline) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lm-eval-steer check: error: {broken}: not a readable results JSON")
    assert len(err.splitlines()) == 1


def test_json_that_is_not_results_and_missing_paths(tmp_path: Path, baseline: Path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    assert run_check(other, baseline) == 2
    assert "not an lm-eval results file" in capsys.readouterr().err
    assert run_check(tmp_path / "nowhere", baseline) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_check(tmp_path / "empty", baseline) == 2
    assert "no results_*.json" in capsys.readouterr().err


def test_unknown_metric_and_negative_tolerance(tmp_path: Path, baseline: Path, capsys) -> None:
    assert run_check(baseline, baseline, "--metrics", "exact_match") == 2
    assert "exact_match" in capsys.readouterr().err
    assert run_check(baseline, baseline, "--tolerance", "-1") == 2


def test_directory_input_uses_newest_file_and_rejects_several_models(tmp_path: Path, baseline: Path, capsys) -> None:
    out = tmp_path / "current"
    ifeval_run(out, 0.0, date="2025-01-01T09-00-00.000000")  # older: would regress
    newest = ifeval_run(out, 0.5, date="2025-01-02T09-00-00.000000")
    assert run_check(out, baseline) == 0
    assert f"results:  {newest}" in capsys.readouterr().out
    ifeval_run(out, 0.5, model="other/model")
    assert run_check(out, baseline) == 2
    assert "holds results of 2 models" in capsys.readouterr().err


def test_real_subprocess_exit_codes(tmp_path: Path, baseline: Path) -> None:
    """The installed console script, as CI calls it."""
    executable = shutil.which("lm-eval-steer") or str(Path(sys.executable).parent / "lm-eval-steer")
    regressed = ifeval_run(tmp_path / "current", 0.25)
    done = subprocess.run(
        [executable, "check", str(regressed), "--baseline", str(baseline), "--tolerance", "0.02"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "1 REGRESSION(S)" in done.stdout and "prompt_level_strict_acc" in done.stdout


def test_combined_stderr_used_by_sigma_is_hypot() -> None:
    verdict = check.judge(TASK, "m", MetricValue(0.5, 0.03), MetricValue(0.5, 0.04), 0.02, 3.0)
    assert verdict.allowed == pytest.approx(3 * math.hypot(0.03, 0.04))
    assert not verdict.regressed and verdict.delta == 0.0


# --------------------------------------------------------------------------- --max-degenerate-increase


def answered_run(out: Path, answers: list[tuple[bool, str]] | None, tokenizer_dir: Path) -> Path:
    """A one-task run whose logged answers are ``answers`` (None: no samples logged), accuracies equal."""
    samples = {TASK: answered_samples(answers)} if answers is not None else None
    return write_run(out, {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.5)}, n=4, samples=samples, model_args={"pretrained": str(tokenizer_dir)})


QUARTER_LOOPS = [(True, FLUENT), (False, LOOPING), (True, FLUENT), (False, FLUENT)]  # 25% loop
HALF_LOOPS = [(True, FLUENT), (False, LOOPING), (True, LOOPING), (False, FLUENT)]  # 50% loop: +25 points


def test_degenerate_rise_within_the_allowance_passes(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    reference = answered_run(tmp_path / "baseline", QUARTER_LOOPS, tiny_model_dir)
    current = answered_run(tmp_path / "current", HALF_LOOPS, tiny_model_dir)
    assert run_check(current, reference, "--max-degenerate-increase", "25") == 0  # exactly the allowance passes
    out = capsys.readouterr().out
    assert table_rows(out.split("allowed drop")[1])[-1] == [TASK, "25.0% (1/4)", "50.0% (2/4)", "+25.0", "25", "ok"]
    assert "1 task(s) within the allowed loop rise" in out
    assert run_check(reference, reference, "--max-degenerate-increase", "0") == 0


def test_degenerate_rise_beyond_the_allowance_fails(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    reference = answered_run(tmp_path / "baseline", QUARTER_LOOPS, tiny_model_dir)
    current = answered_run(tmp_path / "current", HALF_LOOPS, tiny_model_dir)
    assert run_check(current, reference) == 0  # the same accuracies: without the option, the gate passes
    capsys.readouterr()
    assert run_check(current, reference, "--max-degenerate-increase", "2") == 1
    out = capsys.readouterr().out
    assert "1 LOOP REGRESSION(S)" in out and "REGRESSION(S):" not in out.replace("LOOP REGRESSION(S)", "")
    assert table_rows(out.split("LOOP REGRESSION(S)")[1])[1] == [TASK, "25.0% (1/4)", "50.0% (2/4)", "+25.0", "2", "REGRESSION"]
    # fewer loops is no regression
    assert run_check(reference, current, "--max-degenerate-increase", "0") == 0


@pytest.mark.parametrize("missing", ["baseline", "results"])
def test_degenerate_gate_without_samples_is_not_comparable(tmp_path: Path, tiny_model_dir: Path, capsys, missing: str) -> None:
    reference = answered_run(tmp_path / "baseline", None if missing == "baseline" else QUARTER_LOOPS, tiny_model_dir)
    current = answered_run(tmp_path / "current", None if missing == "results" else QUARTER_LOOPS, tiny_model_dir)
    assert run_check(current, reference, "--max-degenerate-increase", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lm-eval-steer check: error: not comparable: --max-degenerate-increase:")
    assert f"({missing}) has no logged samples for {TASK}" in err and "--log_samples" in err


def test_degenerate_gate_without_a_tokenizer_is_not_comparable(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    reference = answered_run(tmp_path / "baseline", QUARTER_LOOPS, tiny_model_dir)
    current = answered_run(tmp_path / "current", QUARTER_LOOPS, tiny_model_dir)
    missing = tmp_path / "no-such-model"
    assert run_check(current, reference, "--max-degenerate-increase", "2", "--tokenizer_args", f"pretrained={missing}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tokenizer pretrained={missing} could not be loaded" in err
    assert run_check(current, reference, "--max-degenerate-increase", "-1") == 2
    assert "--max-degenerate-increase -1.0 must be a finite number >= 0" in capsys.readouterr().err


def test_loop_verdict_rise_is_in_percentage_points() -> None:
    from lm_eval_steer.analysis.fluency import Fluency

    verdict = check.LoopVerdict(TASK, Fluency(40, 13, 7), Fluency(40, 20, 9), allowed=17.5)
    assert verdict.rise == pytest.approx(17.5) and not verdict.regressed  # 32.5% -> 50%: exactly the allowance
    assert check.LoopVerdict(TASK, Fluency(40, 13, 7), Fluency(40, 21, 9), allowed=17.5).regressed
