"""Malformed results files and gate options: ``check``, ``compare`` and ``quality`` exit 2 with one
line naming the file, never a traceback, and ``check`` never passes while checking nothing."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lm_eval_steer.analysis import quality
from lm_eval_steer.cli import main
from lm_eval_steer.core.outputs import find_sample_files, read_samples
from results_fixtures import gzip_samples, ifeval_sample, ifeval_scores, results_json, write_run

TASK = "ifeval_format"
SCORES = {TASK: ifeval_scores(0.5, 0.6, 0.55, 0.65)}


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets ``data[k1][k2]...`` (keys joined with '/') to ``value``."""

    def mutate(data: dict) -> None:
        *parents, last = path.split("/")
        for key in parents:
            data = data[key]
        data[last] = value

    return mutate


STRUCTURAL = {
    "top-level list": lambda data: data.clear(),  # replaced below by a list
    "results missing": _set("results", None),
    "results a list": _set("results", [1, 2]),
    "results empty": _set("results", {}),
    "task results a list": _set(f"results/{TASK}", [0.5]),
    "task results a string": _set(f"results/{TASK}", "0.5"),
    "config a string": _set("config", "limit=20"),
    "higher_is_better a list": _set("higher_is_better", []),
    "higher_is_better of a task a string": _set(f"higher_is_better/{TASK}", "yes"),
    "n-samples a list": _set("n-samples", [20]),
    "configs of a task a string": _set(f"configs/{TASK}", "task"),
    "versions a string": _set("versions", "4"),
    "steering a string": _set("config/steering", "vectors=x"),
    "steering vector_files a string": _set("config/steering", {"route": "auto", "vector_files": "x.safetensors"}),
    "steering entry layer a list": _set("config/steering", {"route": "auto", "vector_files": [{"path": "x", "entries": [{"layer": [1]}]}]}),
    "steering overrides a list": _set("config/steering", {"route": "auto", "overrides": [1], "vector_files": []}),
}


def write_results(directory: Path, mutate: Callable[[dict], None] | None = None, raw: str | None = None, **options: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results_2025-01-01T12-00-00.000000.json"
    if raw is None:
        data = results_json(SCORES, **options)
        if mutate is not None:
            mutate(data)
        raw = json.dumps([] if not data else data)
    path.write_text(raw, encoding="utf-8")
    return path


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lm-eval-steer {command}: error: ")
    assert "Traceback" not in err[0] and len(err[0]) <= 300
    return err[0]


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
@pytest.mark.parametrize("command", ["check", "compare", "quality"])
def test_structurally_wrong_results_exit_2_with_one_line_naming_the_file(tmp_path, capsys, monkeypatch, case, command):
    monkeypatch.setattr(quality, "harness_scorer", lambda *a, **k: pytest.fail("the scoring model loaded before the inputs were checked"))
    good = write_results(tmp_path / "good")
    bad = write_results(tmp_path / "bad", STRUCTURAL[case])
    argv = {
        "check": ["check", str(bad), "--baseline", str(good)],
        "compare": ["compare", str(good), str(bad), "--out", str(tmp_path / "out")],
        "quality": ["quality", str(good), str(bad), "--model_args", "pretrained=/nonexistent", "--out", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 2
    assert str(bad) in one_error_line(capsys, command)


@pytest.mark.parametrize(
    "raw",
    ["{", "[]", "null", "\"results\"", "{\"results\": {\"t\": {\"acc,none\": 1" + "0" * 5000 + "}}}", "[" * 100_000 + "]" * 100_000, "\udcff"],
    ids=["truncated", "list", "null", "string", "5000-digit integer", "deeply nested", "not UTF-8"],
)
def test_unreadable_json_exits_2(tmp_path, capsys, raw):
    good = write_results(tmp_path / "good")
    bad = tmp_path / "bad" / "results_x.json"
    bad.parent.mkdir()
    bad.write_bytes(raw.encode("utf-8", "surrogateescape"))
    assert main(["check", str(bad), "--baseline", str(good)]) == 2
    assert str(bad) in one_error_line(capsys, "check")


NOTHING_CHECKED = {
    "all metrics NaN": lambda data: data["results"][TASK].update({k: math.nan for k in data["results"][TASK] if "," in k}),
    "metrics stored as strings": lambda data: data["results"][TASK].update({k: str(v) for k, v in data["results"][TASK].items() if "," in k and "stderr" not in k}),
    "one metric a string": _set(f"results/{TASK}/prompt_level_loose_acc,none", "0.55"),
    "no metrics at all": _set(f"results/{TASK}", {"alias": TASK}),
}


@pytest.mark.parametrize("side", ["baseline", "results"])
@pytest.mark.parametrize("case", sorted(NOTHING_CHECKED))
def test_check_fails_when_a_gated_metric_cannot_be_checked(tmp_path, capsys, case, side):
    good = write_results(tmp_path / "good")
    bad = write_results(tmp_path / "bad", NOTHING_CHECKED[case])
    baseline, results = (bad, good) if side == "baseline" else (good, bad)
    assert main(["check", str(results), "--baseline", str(baseline)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "nothing was checked" in err or "is not a finite number" in err or "in the baseline but not in the results" in err


def test_check_with_an_empty_metric_selection_of_the_baseline_exits_2(tmp_path, capsys):
    baseline = write_results(tmp_path / "baseline", _set(f"results/{TASK}", {"alias": TASK}))
    results = write_results(tmp_path / "results")
    assert main(["check", str(results), "--baseline", str(baseline)]) == 2
    assert "nothing was checked" in one_error_line(capsys, "check")


def test_a_string_metric_outside_metrics_is_not_gated(tmp_path, capsys):
    """``--metrics`` names what is gated: an unreadable metric it leaves out does not fail the gate."""
    good = write_results(tmp_path / "good")
    bad = write_results(tmp_path / "bad", _set(f"results/{TASK}/inst_level_loose_acc,none", "oops"))
    assert main(["check", str(bad), "--baseline", str(good), "--metrics", "prompt_level_loose_acc"]) == 0
    assert main(["check", str(bad), "--baseline", str(good)]) == 2


@pytest.mark.parametrize("option", [["--tolerance", "nan"], ["--tolerance", "-0.1"], ["--tolerance", "inf"], ["--sigma", "nan"], ["--sigma", "-1"]])
def test_check_refuses_nan_negative_or_infinite_allowances(tmp_path, capsys, option):
    good = write_results(tmp_path / "good")
    assert main(["check", str(good), "--baseline", str(good), *option]) == 2
    assert option[0] in one_error_line(capsys, "check")


def test_check_still_passes_and_fails_on_good_files(tmp_path, capsys):
    good = write_results(tmp_path / "good")
    worse = write_results(tmp_path / "worse", _set(f"results/{TASK}/prompt_level_loose_acc,none", 0.3))
    assert main(["check", str(good), "--baseline", str(good)]) == 0
    assert main(["check", str(worse), "--baseline", str(good)]) == 1


def test_quality_checks_every_samples_file_before_loading_the_scoring_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quality, "harness_scorer", lambda *a, **k: pytest.fail("the scoring model loaded before the inputs were checked"))
    sample = {**ifeval_sample(0, {"change_case:english_lowercase": True}), "arguments": [["prompt"]], "filtered_resps": ["answer"]}
    good = write_run(tmp_path / "good", SCORES, samples={TASK: [sample]})
    bad = write_run(tmp_path / "bad", SCORES, samples={TASK: [{**sample, "doc_id": "zero"}]})
    assert main(["quality", str(good), str(bad), "--model_args", "pretrained=/nonexistent", "--out", str(tmp_path / "out")]) == 2
    assert "samples_" in one_error_line(capsys, "quality")


def test_a_fifo_is_named_for_what_it_is_and_never_opened(tmp_path, capsys):
    """Opening a FIFO for reading waits for a writer: it is refused before anything opens it."""
    good = write_results(tmp_path / "good")
    fifo = tmp_path / "results_fifo.json"
    os.mkfifo(fifo)
    assert main(["check", str(fifo), "--baseline", str(good)]) == 2
    assert one_error_line(capsys, "check").endswith(f"{fifo}: is not a regular file")
    # inside an --output_path too: the newest results_*.json of the folder is the FIFO
    folder = tmp_path / "out"
    folder.mkdir()
    write_results(folder)
    os.mkfifo(folder / "results_2099-01-01T00-00-00.000000.json")
    assert main(["check", str(folder), "--baseline", str(good)]) == 2
    assert "results_2099-01-01T00-00-00.000000.json: is not a regular file" in one_error_line(capsys, "check")
    assert main(["check", str(tmp_path / "missing.json"), "--baseline", str(good)]) == 2
    assert "missing.json: no such file or directory" in one_error_line(capsys, "check")


def test_compressed_samples_are_found_and_a_plain_file_wins(tmp_path):
    sample = ifeval_sample(0, {"change_case:english_lowercase": True})
    results = write_run(tmp_path / "run", SCORES, samples={TASK: [sample]})
    (compressed,) = gzip_samples(results)
    assert find_sample_files(results, [TASK]) == {TASK: compressed}
    assert read_samples(compressed) == [sample]
    plain = compressed.with_suffix("")  # samples_<task>_<date>.jsonl beside its .gz
    plain.write_text(json.dumps({**sample, "doc_id": 7}) + "\n", encoding="utf-8")
    assert find_sample_files(results, [TASK]) == {TASK: plain}
    assert read_samples(plain)[0]["doc_id"] == 7


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda good: good[: len(good) // 2], "not a readable samples file"),  # truncated stream
        (lambda good: b"not gzip at all", "not a readable samples file"),
        (lambda good: gzip.compress(b'{"doc_id": 0}\n[1, 2]\n'), "line 2: not a readable samples file ('a JSON list, not an object')"),
        (lambda good: gzip.compress(b"\xff\xfe\n"), "not a readable samples file ("),
    ],
    ids=["truncated", "not gzip", "a list line", "not UTF-8"],
)
def test_a_damaged_compressed_samples_file_exits_2_naming_it(tmp_path, capsys, monkeypatch, content, problem):
    monkeypatch.setattr(quality, "harness_scorer", lambda *a, **k: pytest.fail("the scoring model loaded before the inputs were checked"))
    sample = {**ifeval_sample(0, {"change_case:english_lowercase": True}), "arguments": [["prompt"]], "filtered_resps": ["answer"]}
    results = write_run(tmp_path / "run", SCORES, samples={TASK: [sample]})
    (compressed,) = gzip_samples(results)
    compressed.write_bytes(content(compressed.read_bytes()))
    assert main(["quality", str(results), "--model_args", "pretrained=/nonexistent", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys, "quality")
    assert f"{compressed}" in line and problem in line
