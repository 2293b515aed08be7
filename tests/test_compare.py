"""``lm-eval-steer compare`` on synthetic results files: Markdown, CSV and PNG contents."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from results_fixtures import gzip_samples, ifeval_sample, ifeval_scores, steering_config, table_rows, write_run

from lm_eval_steer.analysis import compare
from lm_eval_steer.cli import main
from lm_eval_steer.analysis.results import MetricValue, load_runs, run_label, steering_description

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_LABEL = "SmolLM2-135M-Instruct"
STEERED_LABEL = "SmolLM2-135M-Instruct [fmt route=auto]"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section of the leaderboard."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """An unsteered ``hf`` run and a steered one that gains 0.25 prompt-level strict accuracy."""
    samples_base = [
        ifeval_sample(0, {"change_case:english_lowercase": False, "punctuation:no_comma": True}),
        ifeval_sample(1, {"change_case:english_lowercase": False}),
    ]
    samples_steered = [
        ifeval_sample(0, {"change_case:english_lowercase": True, "punctuation:no_comma": True}),
        ifeval_sample(1, {"change_case:english_lowercase": False}),
    ]
    base = write_run(
        tmp_path / "base",
        {"ifeval_format": ifeval_scores(0.25, 0.5, 0.375, 0.625, se=0.03)},
        samples={"ifeval_format": samples_base},
    )
    steered = write_run(
        tmp_path / "steered",
        {"ifeval_format": ifeval_scores(0.5, 0.75, 0.375, 0.5, se=0.04)},
        model_type="steered-hf",
        steering=steering_config(layers=(12, 18)),
        samples={"ifeval_format": samples_steered},
    )
    return base, steered


def run_compare(out: Path, *args: str) -> int:
    return main(["compare", *args, "--out", str(out)])


# --------------------------------------------------------------------------- pure functions


def test_make_cell_delta_and_combined_stderr() -> None:
    cell = compare.make_cell(MetricValue(0.5, 0.04), MetricValue(0.25, 0.03))
    assert cell.delta == 0.25 and cell.delta_stderr == pytest.approx(0.05)
    assert compare.make_cell(MetricValue(0.5, None), MetricValue(0.25, 0.03)).delta_stderr is None
    assert compare.make_cell(None, MetricValue(0.25, 0.03)).value is None
    assert compare.make_cell(MetricValue(0.5, 0.04), None).delta is None


def test_instruction_accuracy_counts_each_instruction_and_skips_other_filters() -> None:
    samples = [
        ifeval_sample(0, {"a": True, "b": False}),
        ifeval_sample(1, {"a": False}),
        {**ifeval_sample(2, {"a": True}), "filter": "other"},
    ]
    assert compare.instruction_accuracy(samples, "inst_level_loose_acc") == {"a": (1, 2), "b": (0, 1)}


def test_run_labels_describe_the_steering() -> None:
    assert run_label("m", None) == "m"
    assert run_label("m", {"route": "none"}) == "m [route=none]"
    many = steering_config(vector="a/b/v.safetensors", layers=(8, 10, 12, 14), strength=-11.03125, route="all")
    assert run_label("m", many) == "m [v route=all]"  # short: the file stem and the route
    assert steering_description(many) == "v.safetensors L8..14 c=-11.0312 route=all"  # the details, for the Runs table
    overridden = {**steering_config(), "overrides": {"layer": 9, "scale": 1.5, "positions": "generated"}}
    assert run_label("m", overridden) == "m [fmt L9 x1.5 positions=generated route=auto]"


# --------------------------------------------------------------------------- outputs


def test_markdown_rows_columns_and_deltas(tmp_path: Path, two_runs, capsys) -> None:
    base, steered = two_runs
    out = tmp_path / "board"
    assert run_compare(out, str(base), str(steered)) == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    scores = table_rows(markdown.split("## Runs")[0])
    assert scores[0] == [
        "run",
        "ifeval_format · prompt strict",
        "ifeval_format · inst strict",
        "ifeval_format · prompt loose",
        "ifeval_format · inst loose",
    ]
    assert scores[1] == [f"{BASE_LABEL} (baseline)", "0.250 ± 0.030", "0.500", "0.375 ± 0.030", "0.625"]
    assert scores[2] == [
        STEERED_LABEL,
        "0.500 ± 0.040 (Δ +0.250 ± 0.050)",
        "0.750 (Δ +0.250)",
        "0.375 ± 0.040 (Δ +0.000 ± 0.050)",
        "0.500 (Δ -0.125)",
    ]
    assert len(scores) == 3
    assert "## Warnings" not in markdown  # same setup: nothing to flag
    runs_table = table_rows(section(markdown, "Runs"))
    assert [row[1] for row in runs_table[1:]] == [str(base), str(steered)]
    assert [row[2] for row in runs_table[1:]] == ["", "fmt.safetensors L12,18 c=4.5 route=auto"]
    printed = capsys.readouterr().out
    assert f"using {base}  ->  {BASE_LABEL}" in printed


def test_per_instruction_breakdown_from_samples(tmp_path: Path, two_runs) -> None:
    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs), "--metrics", "inst_level_loose_acc") == 0
    breakdown = section((out / "leaderboard.md").read_text(encoding="utf-8"), "Per-instruction accuracy (from logged samples)")
    assert "### ifeval_format · inst loose" in breakdown
    assert table_rows(breakdown) == [
        ["instruction", f"{BASE_LABEL} (n)", f"{STEERED_LABEL} (n)"],
        ["change_case:english_lowercase", "0.000 (2)", "0.500 (2, Δ +0.500)"],
        ["punctuation:no_comma", "1.000 (1)", "1.000 (1, Δ +0.000)"],
    ]


def test_compressed_samples_give_the_same_breakdown(tmp_path: Path, two_runs) -> None:
    """Baselines are committed with gzip-compressed samples (``samples_<task>_<date>.jsonl.gz``)."""
    plain, compressed = tmp_path / "plain", tmp_path / "compressed"
    assert run_compare(plain, *map(str, two_runs), "--metrics", "inst_level_loose_acc") == 0
    for results in two_runs:
        gzip_samples(results)
    assert run_compare(compressed, *map(str, two_runs), "--metrics", "inst_level_loose_acc") == 0
    board = (compressed / "leaderboard.md").read_text(encoding="utf-8")
    assert "### ifeval_format · inst loose" in board
    assert board == (plain / "leaderboard.md").read_text(encoding="utf-8")


def test_csv_content(tmp_path: Path, two_runs) -> None:
    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs)) == 0
    with (out / "leaderboard.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(compare.CSV_FIELDS)
    assert len(rows) == 8  # 2 runs x 1 task x 4 metrics
    steered = {row["metric"]: row for row in rows if row["run"] == STEERED_LABEL}
    strict = steered["prompt_level_strict_acc"]
    assert (strict["is_baseline"], strict["task"], float(strict["value"]), float(strict["stderr"])) == ("False", "ifeval_format", 0.5, 0.04)
    assert float(strict["delta"]) == 0.25 and math.isclose(float(strict["delta_stderr"]), 0.05)
    assert steered["inst_level_loose_acc"]["stderr"] == "" and float(steered["inst_level_loose_acc"]["delta"]) == -0.125
    assert {row["is_baseline"] for row in rows if row["run"] == BASE_LABEL} == {"True"}


def test_png_is_valid(tmp_path: Path, two_runs) -> None:
    import matplotlib.image

    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs)) == 0
    png = out / "leaderboard.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(out.glob("*.tmp"))  # atomic writes left no temp files behind


def test_baseline_option_by_path_label_and_outside_path(tmp_path: Path, two_runs) -> None:
    base, steered = two_runs
    out = tmp_path / "board"
    assert run_compare(out, str(base), str(steered), "--baseline", str(steered.parent.parent)) == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert f"**{STEERED_LABEL}**" in markdown
    scores = table_rows(markdown.split("## Runs")[0])
    assert [row[0] for row in scores[1:]] == [BASE_LABEL, f"{STEERED_LABEL} (baseline)"]  # not loaded twice
    assert run_compare(out, str(base), str(steered), "--baseline", BASE_LABEL) == 0
    assert f"**{BASE_LABEL}**" in (out / "leaderboard.md").read_text(encoding="utf-8")
    # a baseline that is not among the runs is added as the first row
    assert run_compare(out, str(steered), "--baseline", str(base)) == 0
    scores = table_rows((out / "leaderboard.md").read_text(encoding="utf-8").split("## Runs")[0])
    assert [row[0] for row in scores[1:]] == [f"{BASE_LABEL} (baseline)", STEERED_LABEL]


def test_mismatched_configurations_are_flagged(tmp_path: Path, two_runs, capsys) -> None:
    base, _ = two_runs
    other = write_run(
        tmp_path / "other",
        {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5), "ifeval_length": ifeval_scores(0.5, 0.5, 0.5, 0.5)},
        model="other/model",
        limit=10.0,
        n=10,
        versions={"ifeval_format": 5.0},
        gen_kwargs="max_gen_toks=32",
    )
    out = tmp_path / "board"
    assert run_compare(out, str(base), str(other)) == 0
    warnings = section((out / "leaderboard.md").read_text(encoding="utf-8"), "Warnings")
    assert "model vs baseline: task ifeval_format: version 5.0 vs 4.0" in warnings
    assert "model vs baseline: --limit 10.0 vs 20.0" in warnings
    assert "model vs baseline: --gen_kwargs {'max_gen_toks': '32'} vs None" in warnings
    assert f"ifeval_length prompt_level_strict_acc: not reported by {BASE_LABEL}" in warnings
    assert "warning(s)" in capsys.readouterr().err


def test_same_model_runs_get_distinct_labels(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a", {"t": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, date="2025-01-01T00-00-00.0")
    second = write_run(tmp_path / "b", {"t": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, date="2025-01-02T00-00-00.0")
    labels = [run.label for run in load_runs([first, second, first])]  # the repeated file counts once
    assert labels == [f"{BASE_LABEL} @ 2025-01-01T00-00-00.0", f"{BASE_LABEL} @ 2025-01-02T00-00-00.0"]


def test_non_ifeval_metrics_default_to_all(tmp_path: Path) -> None:
    run = write_run(tmp_path / "ll", {"arc_easy": {"acc": (0.5, 0.01), "acc_norm": (0.625, 0.01)}})
    out = tmp_path / "board"
    assert run_compare(out, str(run)) == 0
    header = table_rows((out / "leaderboard.md").read_text(encoding="utf-8"))[0]
    assert header == ["run", "arc_easy · acc", "arc_easy · acc_norm"]


# --------------------------------------------------------------------------- errors (exit 2)


def test_unreadable_input_exits_2_naming_the_file(tmp_path: Path, two_runs, capsys) -> None:
    broken = tmp_path / "results_broken.json"
    broken.write_bytes(b"\xff\xfe not json")
    out = tmp_path / "board"
    assert run_compare(out, str(two_runs[0]), str(broken)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lm-eval-steer compare: error: {broken}:") and len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_bad_metric_or_baseline_exits_2(tmp_path: Path, two_runs, capsys) -> None:
    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs), "--metrics", "exact_match") == 2
    assert "exact_match" in capsys.readouterr().err
    assert run_compare(out, *map(str, two_runs), "--baseline", "no-such-run") == 2
    assert "--baseline no-such-run" in capsys.readouterr().err


# --------------------------------------------------------------------------- labels and split runs


def test_label_option_names_each_run_in_order(tmp_path: Path, two_runs, capsys) -> None:
    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs), "--label", "unsteered", "--label", "no_comma vector") == 0
    scores = table_rows((out / "leaderboard.md").read_text(encoding="utf-8").split("## Runs")[0])
    assert [row[0] for row in scores[1:]] == ["unsteered (baseline)", "no_comma vector"]
    assert run_compare(out, *map(str, two_runs), "--baseline", "no_comma vector", "--label", "a", "--label", "no_comma vector") == 0
    capsys.readouterr()
    assert run_compare(out, *map(str, two_runs), "--label", "only one") == 2
    err = capsys.readouterr().err.strip()
    assert err == "lm-eval-steer compare: error: --label given 1 times for 2 runs: give one per RUN, in order"


def split_runs(tmp_path: Path, vector: str = "vectors/fmt.safetensors") -> tuple[Path, Path, Path]:
    """An unsteered run over two tasks, and one steered configuration run as two ``--samples`` parts."""
    base = write_run(
        tmp_path / "base",
        {"ifeval_format": ifeval_scores(0.25, 0.5, 0.375, 0.625), "ifeval_length": ifeval_scores(0.5, 0.5, 0.5, 0.5)},
        date="2025-01-01T00-00-00.0",
    )
    steering = steering_config(layers=(12, 18))
    part_a = write_run(tmp_path / "a", {"ifeval_format": ifeval_scores(0.5, 0.75, 0.5, 0.75)}, model_type="steered-hf",
                       steering=steering, date="2025-01-02T00-00-00.0")
    moved = {**steering, "vector_files": [{**steering["vector_files"][0], "path": vector}]}
    part_b = write_run(tmp_path / "b", {"ifeval_length": ifeval_scores(0.75, 0.75, 0.75, 0.75)}, model_type="steered-hf",
                       steering=moved, date="2025-01-03T00-00-00.0")
    return base, part_a, part_b


def test_split_runs_of_one_configuration_share_one_row(tmp_path: Path) -> None:
    base, part_a, part_b = split_runs(tmp_path, vector="elsewhere/fmt.safetensors")  # the same file, moved
    out = tmp_path / "board"
    assert run_compare(out, str(base), str(part_a), str(part_b)) == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    scores = table_rows(markdown.split("## Runs")[0])
    assert [row[0] for row in scores[1:]] == [f"{BASE_LABEL} (baseline)", STEERED_LABEL]
    steered = dict(zip(scores[0], scores[2]))
    assert steered["ifeval_format · prompt strict"].startswith("0.500")
    assert steered["ifeval_length · prompt strict"].startswith("0.750")
    assert "## Warnings" not in markdown  # no half-empty rows
    assert table_rows(section(markdown, "Runs"))[2][1] == f"{part_a}; {part_b}"
    with (out / "leaderboard.csv").open(newline="", encoding="utf-8") as handle:
        steered_rows = [row for row in csv.DictReader(handle) if row["run"] == STEERED_LABEL]
    assert {row["task"] for row in steered_rows} == {"ifeval_format", "ifeval_length"}


def test_runs_that_share_a_task_or_differ_in_steering_stay_apart(tmp_path: Path) -> None:
    base, part_a, _ = split_runs(tmp_path)
    again = write_run(tmp_path / "again", {"ifeval_format": ifeval_scores(0.5, 0.75, 0.5, 0.75)}, model_type="steered-hf",
                      steering=steering_config(layers=(12, 18)), date="2025-01-04T00-00-00.0")
    other = write_run(tmp_path / "other", {"ifeval_length": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, model_type="steered-hf",
                      steering=steering_config(layers=(12, 18), strength=9.0), date="2025-01-05T00-00-00.0")
    labels = [run.label for run in load_runs([base, part_a, again, other])]
    assert labels == [
        BASE_LABEL,
        f"{STEERED_LABEL} @ 2025-01-02T00-00-00.0",  # a repeat of the same task is a second row ...
        f"{STEERED_LABEL} @ 2025-01-04T00-00-00.0",
        f"{STEERED_LABEL} @ 2025-01-05T00-00-00.0",  # ... and other strengths are another configuration
    ]
    # explicit labels decide too: parts given different labels stay apart
    assert [run.label for run in load_runs([part_a, other], ["first", "second"])] == ["first", "second"]


def test_reuse_is_shown_and_a_run_that_reused_another_baseline_is_flagged(tmp_path: Path) -> None:
    from lm_eval_steer.digest import file_sha256

    scores = {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5)}
    base = write_run(tmp_path / "base", scores)
    other = write_run(tmp_path / "other", {"ifeval_format": ifeval_scores(0.4, 0.5, 0.5, 0.5)})

    def reused(name: str, source: Path) -> Path:
        record = {"results_file": str(source), "sha256": file_sha256(source), "reused_requests": {"ifeval_format": 147}, "missing_requests": {}}
        return write_run(tmp_path / name, scores, model_type="steered-hf", steering={**steering_config(), "unsteered_from": record})

    out = tmp_path / "board"
    assert run_compare(out, str(base), str(reused("fair", base)), str(reused("unfair", other)), "--label", "base", "--label", "fair", "--label", "unfair") == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert f"reused 147 unsteered answers from {base.name}" in section(markdown, "Runs")
    warnings = section(markdown, "Warnings")
    assert f"unfair vs baseline: reused unsteered answers from {other}" in warnings
    assert "fair vs baseline" not in warnings.replace("unfair vs baseline", "")


# --------------------------------------------------------------------------- several models


@pytest.fixture
def two_models(tmp_path: Path) -> dict[str, Path]:
    """An unsteered and a steered run of each of two models, with different baseline scores."""
    other = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    return {
        "small base": write_run(tmp_path / "small-base", {"ifeval_format": ifeval_scores(0.25, 0.5, 0.25, 0.5)}),
        "small steered": write_run(
            tmp_path / "small-steered", {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, model_type="steered-hf", steering=steering_config()
        ),
        "other base": write_run(tmp_path / "other-base", {"ifeval_format": ifeval_scores(0.75, 0.5, 0.75, 0.5)}, model=other),
        "other steered": write_run(
            tmp_path / "other-steered",
            {"ifeval_format": ifeval_scores(0.875, 0.5, 0.875, 0.5)},
            model=other,
            model_type="steered-hf",
            steering=steering_config(),
        ),
    }


def test_one_baseline_per_model_gives_each_run_its_own_models_delta(tmp_path: Path, two_models) -> None:
    out = tmp_path / "board"
    runs = [str(path) for path in two_models.values()]
    labels = [arg for name in two_models for arg in ("--label", name)]
    assert run_compare(out, *runs, *labels, "--baseline", "small base", "--baseline", "other base", "--metrics", "prompt_level_strict_acc") == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert "Baselines, one per model" in markdown and "**small base**, **other base**" in markdown
    rows = {row[0]: row[1] for row in table_rows(markdown.split("## Runs")[0])[1:]}
    assert rows["small base (baseline)"] == "0.250 ± 0.050"
    assert rows["other base (baseline)"] == "0.750 ± 0.050"
    assert "(Δ +0.250 ± 0.071)" in rows["small steered"]  # 0.5 - 0.25, against its own model
    assert "(Δ +0.125 ± 0.071)" in rows["other steered"]  # 0.875 - 0.75, not 0.875 - 0.25
    assert "## Warnings" not in markdown  # different chat templates or models are not compared across
    with (out / "leaderboard.csv").open(encoding="utf-8") as handle:
        flagged = {row["run"]: row["is_baseline"] for row in csv.DictReader(handle)}
    assert flagged == {"small base": "True", "small steered": "False", "other base": "True", "other steered": "False"}


def test_a_run_whose_model_has_no_baseline_gets_no_delta_and_a_warning(tmp_path: Path, two_models) -> None:
    out = tmp_path / "board"
    third = write_run(tmp_path / "third", {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, model="org/third-model")
    runs = [*map(str, two_models.values()), str(third)]
    assert run_compare(out, *runs, "--baseline", str(two_models["small base"]), "--baseline", str(two_models["other base"])) == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    third_row = next(row for row in table_rows(markdown.split("## Runs")[0]) if row[0] == "third-model")
    assert not any("Δ" in cell for cell in third_row)
    assert "third-model: no baseline of model third-model among the --baseline runs" in section(markdown, "Warnings")


def test_two_baselines_of_one_model_exit_2(tmp_path: Path, two_models, capsys) -> None:
    runs = [str(path) for path in two_models.values()]
    code = run_compare(tmp_path / "board", *runs, "--baseline", str(two_models["small base"]), "--baseline", str(two_models["small steered"]))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give one baseline per model" in err and "Traceback" not in err
    assert not (tmp_path / "board").exists()


def test_tasks_option_picks_and_orders_columns_and_rejects_unknown_tasks(tmp_path: Path, capsys) -> None:
    scores = ifeval_scores(0.5, 0.5, 0.5, 0.5)
    run = write_run(tmp_path / "run", {"ifeval_format": scores, "ifeval_length": scores, "ifeval_keywords": scores})
    out = tmp_path / "board"
    assert run_compare(out, str(run), "--tasks", "ifeval_length", "ifeval_format", "--metrics", "prompt_level_loose_acc") == 0
    header = table_rows((out / "leaderboard.md").read_text(encoding="utf-8"))[0]
    assert header == ["run", "ifeval_length · prompt loose", "ifeval_format · prompt loose"]
    assert run_compare(out, str(run), "--tasks", "ifeval_lenght") == 2
    err = capsys.readouterr().err
    assert "--tasks: ifeval_lenght not in any input; available: ifeval_format, ifeval_length, ifeval_keywords" in err
