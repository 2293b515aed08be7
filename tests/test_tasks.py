"""IFEval subset tasks: documents, no-instruction prompts, scoring, data location, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nltk
import pytest

from lm_eval_steer.core import ifeval as steer
from lm_eval_steer.core import paths

EXPECTED_COUNTS = {
    "format": 163,
    "length": 34,
    "keywords_include": 86,
    "keywords_exclude": 117,
    "composition": 124,
}
HELDOUT_COUNT = 220  # the IFEval prompts none of the subsets above holds (541 in all)
ALL_TASKS = [f"ifeval_{name}{suffix}" for name in EXPECTED_COUNTS for suffix in ("", "_noinst")] + ["ifeval_heldout"]
GROUPS = {
    "ifeval_keywords": ["ifeval_keywords_include", "ifeval_keywords_exclude"],
    "ifeval_steer": [f"ifeval_{name}" for name in EXPECTED_COUNTS],
    "ifeval_steer_noinst": [f"ifeval_{name}_noinst" for name in EXPECTED_COUNTS],
}


@pytest.fixture
def local_data(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged data, with no environment variable; any hub access fails the test."""
    import datasets

    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"hub accessed: {args}")

    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    return paths.PACKAGED_DATA


@pytest.fixture(scope="module")
def our_task_manager():
    """A TaskManager over our tasks only (the registration hook adds our directory)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def doc_with_key(docs: list[dict[str, Any]], key: int) -> dict[str, Any]:
    return next(doc for doc in docs if doc["key"] == key)


def doc_with_instruction(docs: list[dict[str, Any]], instruction_id: str) -> dict[str, Any]:
    return next(doc for doc in docs if doc["instruction_id_list"] == [instruction_id])


def paper_rows(data: Path, name: str) -> list[dict[str, Any]]:
    return steer.read_jsonl(data / "seed" / name)


# ----------------------------------------------------------------------------- documents


@pytest.mark.parametrize("noinst", [False, True])
@pytest.mark.parametrize("subset", list(EXPECTED_COUNTS))
def test_document_counts_and_ifeval_fields(local_data: Path, subset: str, noinst: bool) -> None:
    docs = steer.subset_docs(subset, noinst)
    assert len(docs) == EXPECTED_COUNTS[subset]
    for doc in docs:
        assert isinstance(doc["key"], int)
        assert doc["instruction_id_list"] and all(isinstance(i, str) for i in doc["instruction_id_list"])
        assert len(doc["kwargs"]) == len(doc["instruction_id_list"])
        assert all(isinstance(kwargs, dict) for kwargs in doc["kwargs"])
        assert set(doc["instruction_id_list"]) <= steer.SUBSETS[subset].instructions
        assert ("prompt_without_instruction" in doc) == noinst


def test_format_subset_is_the_papers_format_file(local_data: Path) -> None:
    paper = {int(row["key"]) for row in paper_rows(local_data, "ifeval_single_instr_format.jsonl")}
    assert {doc["key"] for doc in steer.subset_docs("format")} == paper


def test_composition_has_two_or_three_steerable_instructions(local_data: Path) -> None:
    counts = {len(doc["instruction_id_list"]) for doc in steer.subset_docs("composition")}
    assert counts == {2, 3}


def test_heldout_is_every_ifeval_prompt_the_other_subsets_leave_out(local_data: Path) -> None:
    heldout = steer.subset_docs("heldout")
    assert len(heldout) == HELDOUT_COUNT
    used = {doc["key"] for name in ("format", "length", "composition") for doc in steer.subset_docs(name)}
    keys = [doc["key"] for doc in heldout]
    assert len(set(keys)) == len(keys) and not used & set(keys)
    assert used | set(keys) == {int(row["key"]) for row in steer.ifeval_rows()}
    instructions = {i for doc in heldout for i in doc["instruction_id_list"]}
    assert "keywords:existence" in instructions  # single-keyword IFEval prompts are held out
    assert instructions <= steer.subset_instruction_ids("heldout")
    assert "detectable_content:postscript" in steer.subset_instruction_ids("heldout")


@pytest.mark.parametrize("subset", list(EXPECTED_COUNTS))
def test_noinst_docs_match_their_originals_except_the_prompt(local_data: Path, subset: str) -> None:
    """Same documents in the same order, scored against the same instructions and kwargs."""
    originals, stripped = steer.subset_docs(subset), steer.subset_docs(subset, noinst=True)
    for original, doc in zip(originals, stripped, strict=True):
        assert {k: v for k, v in doc.items() if k != "prompt_without_instruction"} == original
        assert doc["prompt_without_instruction"].strip()
        assert doc["prompt_without_instruction"] != doc["prompt"]
        assert len(doc["prompt_without_instruction"]) < len(doc["prompt"])


@pytest.mark.parametrize("subset", ["format", "length", "composition"])
def test_noinst_prompt_is_the_papers_stripped_prompt_for_that_key(local_data: Path, subset: str) -> None:
    paper_file = steer.SUBSETS[subset].paper_file
    field = steer.SUBSETS[subset].stripped_field
    paper = {int(row["key"]): row[field] for row in paper_rows(local_data, paper_file)}
    for doc in steer.subset_docs(subset, noinst=True):
        expected = steer.STRIPPED_FIXES.get(doc["key"], paper[doc["key"]])
        assert doc["prompt_without_instruction"] == expected, doc["key"]


def test_prompts_the_paper_failed_to_strip_are_fixed(local_data: Path) -> None:
    """Where the paper's text still shows the instruction, ours must not."""
    docs = {doc["key"]: doc["prompt_without_instruction"] for doc in steer.subset_docs("format", True)}
    docs |= {doc["key"]: doc["prompt_without_instruction"] for doc in steer.subset_docs("composition", True)}
    assert "<<" not in docs[1802]  # detectable_format:title
    assert "JSON" not in docs[2857]  # detectable_format:json_format
    assert "9 very short bullet points" not in docs[136] and "less than 100 words" not in docs[136]
    assert "original_question" not in docs[136]  # the stripping model's scaffolding
    assert "JSON" not in docs[1148]  # from the format file, which (unlike the other) removed it


@pytest.mark.parametrize(("subset", "kwarg"), [("keywords_include", "keywords"), ("keywords_exclude", "forbidden_words")])
def test_noinst_keyword_prompts_no_longer_name_the_keyword(local_data: Path, subset: str, kwarg: str) -> None:
    """The keyword may occur in the question itself, but one mention (the instruction's) is gone."""
    for doc in steer.subset_docs(subset, noinst=True):
        (word,) = doc["kwargs"][0][kwarg]
        before = doc["prompt"].lower().count(word.lower())
        after = doc["prompt_without_instruction"].lower().count(word.lower())
        assert after < before, (doc["key"], word)


# ----------------------------------------------------------------------------- scoring


def score(doc: dict[str, Any], response: str) -> dict[str, Any]:
    return steer.process_results(doc, [response])


ENGLISH_LOWER = "dear friend, i hope you are well. please remember to go and vote in the election next week."


@pytest.mark.parametrize(
    ("subset", "pick", "good", "bad"),
    [
        ("format", lambda d: doc_with_instruction(d, "change_case:english_lowercase"), ENGLISH_LOWER, ENGLISH_LOWER.title()),
        ("format", lambda d: doc_with_instruction(d, "punctuation:no_comma"), "No commas here at all.", "One, two."),
        # 1092: fewer than 300 words.
        ("length", lambda d: doc_with_key(d, 1092), "A short answer. " * 5, "word " * 400),
        # 1268: fewer than 6 sentences.
        ("length", lambda d: doc_with_key(d, 1268), "One. Two.", "One sentence here. " * 12),
        ("keywords_include", lambda d: d[0], "These results are correlated.", "These results are related."),
        ("keywords_exclude", lambda d: d[0], "A ballad about quiet music.", "We rock the night."),
        # 1436: all lowercase English, and none of coop / killings / dead / night.
        ("composition", lambda d: doc_with_key(d, 1436), ENGLISH_LOWER, ENGLISH_LOWER + " at night."),
    ],
)
def test_known_good_and_bad_responses(local_data: Path, subset: str, pick, good: str, bad: str) -> None:
    for noinst in (False, True):  # the stripped prompt must not change how a response is scored
        doc = pick(steer.subset_docs(subset, noinst))
        good_scores, bad_scores = score(doc, good), score(doc, bad)
        for level in ("strict", "loose"):
            assert good_scores[f"prompt_level_{level}_acc"] is True
            assert bad_scores[f"prompt_level_{level}_acc"] is False


def test_loose_scoring_ignores_a_preamble_line(local_data: Path) -> None:
    doc = doc_with_instruction(steer.subset_docs("format"), "change_case:english_capital")
    scores = score(doc, "Sure, here it is:\nTHIS IS MY WHOLE ANSWER, WRITTEN IN CAPITAL LETTERS AS REQUESTED.")
    assert scores["prompt_level_strict_acc"] is False
    assert scores["prompt_level_loose_acc"] is True


def test_composition_scores_each_instruction_and_breaks_them_down(local_data: Path) -> None:
    doc = doc_with_key(steer.subset_docs("composition", noinst=True), 1436)
    assert doc["instruction_id_list"] == ["change_case:english_lowercase", "keywords:forbidden_words"]
    scores = score(doc, ENGLISH_LOWER + " the dead of night.")  # lowercase, but says forbidden words
    assert scores["prompt_level_loose_acc"] is False
    assert scores["inst_level_loose_acc"] == [True, False]
    assert scores["inst_level_loose_acc:change_case:english_lowercase"] == 1.0
    assert scores["inst_level_loose_acc:keywords:forbidden_words"] == 0.0
    assert not any(name.startswith("inst_level_loose_acc:detectable") for name in scores)


def test_per_instruction_scores_average_repeated_ids() -> None:
    ids = ["length_constraints:number_words", "length_constraints:number_words", "punctuation:no_comma"]
    assert steer.per_instruction_scores(ids, [True, False, True]) == {
        "inst_level_loose_acc:length_constraints:number_words": 0.5,
        "inst_level_loose_acc:punctuation:no_comma": 1.0,
    }
    with pytest.raises(ValueError):
        steer.per_instruction_scores(ids, [True])


def test_language_detection_is_seeded(local_data: Path) -> None:
    from langdetect import DetectorFactory

    DetectorFactory.seed = None
    steer.prepare_scorer()
    assert DetectorFactory.seed == 0


# ----------------------------------------------------------------------------- data location


def test_every_subset_is_read_from_the_packaged_data_from_any_directory(local_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for subset, count in EXPECTED_COUNTS.items():
        assert len(steer.subset_docs(subset)) == len(steer.subset_docs(subset, noinst=True)) == count
    assert steer.subset_docs("length")[0]["kwargs"] == [{"relation": "at least", "num_words": 400}]


@pytest.mark.parametrize("subset", ["format", "keywords_include"])
def test_a_broken_install_names_the_missing_paper_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subset: str) -> None:
    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "input_data.jsonl").write_bytes((paths.PACKAGED_DATA / steer.IFEVAL_FILE).read_bytes())
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(paths, "PACKAGED_DATA", tmp_path)
    with pytest.raises(steer.DataMissingError) as error:
        steer.subset_docs(subset, noinst=True)
    message = str(error.value)
    assert f"seed/{steer.SUBSETS[subset].paper_file}: packaged data file missing" in message and "reinstall" in message


def test_missing_seed_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "input_data.jsonl").write_bytes((paths.PACKAGED_DATA / steer.IFEVAL_FILE).read_bytes())
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert len(steer.subset_docs("composition")) == EXPECTED_COUNTS["composition"]  # needs no paper file
    with pytest.raises(steer.DataMissingError, match=r"seed/ifeval_wo_instructions\.jsonl: not found \(LM_EVAL_STEER_DATA="):
        steer.subset_docs("composition", noinst=True)


def test_missing_ifeval_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    with pytest.raises(steer.DataMissingError, match=r"ifeval/input_data\.jsonl: not found"):
        steer.subset_docs("format")
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(steer.DataMissingError, match="is not a directory"):
        steer.subset_docs("format")


def test_unknown_subset_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown IFEval subset 'style'"):
        steer.subset_docs("style")


# ----------------------------------------------------------------------------- harness integration


def test_tasks_and_groups_are_registered(our_task_manager) -> None:
    names = set(our_task_manager.all_tasks)
    assert set(ALL_TASKS) | set(GROUPS) <= names
    assert "_ifeval_steer_base" not in names


def test_groups_hold_their_subsets(local_data: Path, our_task_manager) -> None:
    for group, members in GROUPS.items():  # one at a time: the harness refuses overlapping groups
        assert our_task_manager.load([group])["group_map"][group] == members


def test_built_tasks_show_the_right_prompt_and_report_per_instruction_metrics(local_data: Path, our_task_manager) -> None:
    tasks = our_task_manager.load(["ifeval_length", "ifeval_length_noinst"])["tasks"]
    with_inst, without = tasks["ifeval_length"], tasks["ifeval_length_noinst"]
    assert len(with_inst.test_docs()) == len(without.test_docs()) == EXPECTED_COUNTS["length"]
    doc = without.test_docs()[0]
    assert without.doc_to_text(doc) == doc["prompt_without_instruction"]
    assert with_inst.doc_to_text(with_inst.test_docs()[0]) == doc["prompt"]
    assert set(doc["kwargs"][0]) >= {"relation", "num_words"}  # IFEval's kwargs shape survives
    metrics = set(without.aggregation())
    assert {"prompt_level_strict_acc", "inst_level_loose_acc"} <= metrics
    assert {f"inst_level_loose_acc:{i}" for i in steer.LENGTH_INSTRUCTIONS} <= metrics
    assert without.higher_is_better()["inst_level_loose_acc:length_constraints:number_words"] is True


def test_heldout_task_reports_every_ifeval_instruction_it_holds(local_data: Path, our_task_manager) -> None:
    task = our_task_manager.load(["ifeval_heldout"])["tasks"]["ifeval_heldout"]
    docs = task.test_docs()
    assert len(docs) == HELDOUT_COUNT
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"]
    metrics = set(task.aggregation())
    assert {f"inst_level_loose_acc:{i}" for doc in docs for i in doc["instruction_id_list"]} <= metrics


def test_missing_punkt_fails_when_the_task_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, our_task_manager) -> None:
    """Before any generation: building the task is the first thing the harness does."""
    (tmp_path / "ifeval").mkdir()  # local data without nltk/
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-here")])
    with pytest.raises(steer.PunktMissingError) as error:
        our_task_manager.load(["ifeval_format"])
    assert "punkt_tab" in str(error.value) and paths.DATA_ENV in str(error.value)


def test_local_nltk_folder_is_used(local_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nltk.data, "path", [])
    steer.prepare_scorer()
    assert nltk.data.path == [str(local_data / "nltk")]


def test_lm_eval_cli_end_to_end_on_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != paths.DATA_ENV} | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # The plain harness CLI: our tasks are found without --include_path.
    command = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "hf",
        "--model_args", f"pretrained={tiny_model_dir}",
        "--device", "cpu",
        "--tasks", "ifeval_format,ifeval_keywords_exclude_noinst",
        "--limit", "2",
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=8",
        "--batch_size", "2",
        "--log_samples",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    for task in ("ifeval_format", "ifeval_keywords_exclude_noinst"):
        assert 0.0 <= results[task]["prompt_level_loose_acc,none"] <= 1.0
        assert isinstance(results[task]["prompt_level_loose_acc_stderr,none"], float)
    assert "inst_level_loose_acc:keywords:forbidden_words,none" in results["ifeval_keywords_exclude_noinst"]
    (samples_file,) = (tmp_path / "out").rglob("samples_ifeval_keywords_exclude_noinst_*.jsonl")
    samples = steer.read_jsonl(samples_file)
    assert len(samples) == 2
    for sample in samples:
        doc = sample["doc"]
        assert {"key", "instruction_id_list", "kwargs"} <= set(doc)
        shown = sample["arguments"]["gen_args_0"]["arg_0"]
        assert doc["prompt_without_instruction"] in shown and doc["prompt"] not in shown


@pytest.mark.parametrize("layout", ["no-ifeval", "no-nltk"])
def test_missing_data_through_the_lm_eval_cli_is_one_line_and_exit_2(tiny_model_dir: Path, tmp_path: Path, layout: str) -> None:
    data = tmp_path / "data"
    (data / "ifeval").mkdir(parents=True)
    if layout == "no-nltk":  # every task file there, but no punkt_tab anywhere NLTK looks
        (data / "ifeval" / "input_data.jsonl").write_bytes((paths.PACKAGED_DATA / steer.IFEVAL_FILE).read_bytes())
    else:
        shutil.copytree(paths.PACKAGED_DATA / "nltk", data / "nltk")
    env = os.environ | {paths.DATA_ENV: str(data), "NLTK_DATA": str(tmp_path / "none"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu", "--tasks", "ifeval_format", "--limit", "1"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert ": error: " in last
    assert ("punkt_tab" in last) if layout == "no-nltk" else ("input_data.jsonl" in last)
