"""vector_builder.validate (``lm-eval-steer validate``) on the tiny random Llama: candidates parsed as
LABEL=FILE[*SCALE], the questions that follow a build's, entries routed and scaled as ``steered-hf``
routes them, the counts of passes and looping answers, and one-line refusals."""

from __future__ import annotations

import json
import math
import re
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file
from vector_builder import prompts
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.search import generate
from vector_builder.validate import (
    CandidateError,
    Outcome,
    load_candidate,
    parse_candidate,
    questions_after_build,
    report,
    checks_for,
    MIXED,
    paired_instructions,
    rows_for,
    shipping_problems,
    summary_table,
    targets_for,
    validate,
)

INSTRUCTION = "punctuation:no_comma"
pytestmark = pytest.mark.usefixtures("one_thread")


@given(
    label=st.text(st.characters(blacklist_characters="=", blacklist_categories=("Cs",)), min_size=1).filter(lambda s: s.strip() and s.strip() != "unsteered"),
    path=st.text(st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), min_size=1).filter(str.strip),
    scale=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
)
def test_a_candidate_reads_back_its_label_file_and_scale(label, path, scale):
    assert parse_candidate(f"{label}={path}*{scale!r}") == (label.strip(), path, scale)
    assert parse_candidate(f"{label}={path}") == (label.strip(), path, 1.0)


@pytest.mark.parametrize("text", ["noequals.safetensors", "=v.safetensors", "a=", "a=v.safetensors*", "a=v.safetensors*x", "a=v.safetensors*0",
                                  "a=v.safetensors*-1", "a=v.safetensors*nan", "a=v.safetensors*inf", "a=*2", "unsteered=v.safetensors"])
def test_a_malformed_candidate_is_refused_in_one_line(text):
    with pytest.raises(CandidateError) as error:
        parse_candidate(text)
    assert "\n" not in str(error.value) and repr(text) in str(error.value)


def test_the_questions_are_the_ones_after_the_builds_and_none_it_saw():
    queries = [f"question {i}" for i in range(60)]
    train, seen = prompts.split_queries(queries, 32, 8, 0)
    later = questions_after_build(queries, 32, 8, 12, 0)
    assert len(later) == 12 and not set(later) & (set(train) | set(seen))
    # a longer validation list of the same split starts with the build's questions, then these
    assert prompts.split_queries(queries, 32, 20, 0)[1] == seen + later
    with pytest.raises(ValueError, match="need 32 \\+ 100 queries"):
        questions_after_build(queries, 32, 8, 92, 0)


def test_counts_compare_each_answer_with_the_unsteered_answer_to_the_same_prompt():
    outcome = Outcome("x", follows=[True, False, True, True], loops=[True, False, False, True], texts=["a", "b", "c", "d"])
    assert outcome.counts([False, False, True, True]) == {
        "passes_untold": 1, "passes_told": 2,   # the first half is untold
        "fluent_untold": 0, "fluent_told": 1,   # a pass that loops is not fluent
        "looping": 2, "new_looping": 1, "cured_looping": 1,
    }


@pytest.fixture
def vector_path(tiny, tmp_path):
    """One entry routed to no_comma (layer 1, strength 4) and one routed to another instruction."""
    model, _ = tiny
    torch.manual_seed(1)
    entries = [
        SteeringEntry(name=INSTRUCTION, vector=torch.randn(64), layer=1, mode="add", strength=4.0, applies_to=AppliesTo(INSTRUCTION)),
        SteeringEntry(name="startend:quotation", vector=torch.randn(64), layer=2, mode="add", strength=3.0, applies_to=AppliesTo("startend:quotation")),
    ]
    path = tmp_path / "v.safetensors"
    save_vector_file(path, entries, model="tiny", hidden_size=64, num_layers=model.config.num_hidden_layers)
    return path


def test_candidates_are_routed_and_scaled_as_steered_hf_does_and_answer_like_generate(tiny, vector_path):
    model, tokenizer = tiny
    strong = load_candidate(f"strong={vector_path}*8", INSTRUCTION)
    questions = ["What is a cat?", "Name a colour."]
    _, targets = prompts.plan([INSTRUCTION])
    items = prompts.validation_prompts(targets[0], questions, 0, also_with_instruction=True)
    checks = checks_for(targets[:1], questions, 0)
    assert [(c.text, c.instructions, c.checker_prompt) for c in checks] == [(i.text, ((INSTRUCTION, i.kwargs),), i.checker_prompt) for i in items]
    rows = rows_for(strong, checks)
    assert [[(e.name, e.layer, e.strength) for e in row] for row in rows] == [[(INSTRUCTION, 1, 32.0)]] * 4  # only its own entry, × 8
    assert rows_for(None, checks) == [()] * 4

    runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=3, seed=0, max_new_tokens=6))
    scorer = lambda instruction_id, kwargs, prompt, response: "," not in response  # noqa: E731
    outcomes = validate(runner, checks, [strong], scorer=scorer)
    assert [o.label for o in outcomes] == ["unsteered", "strong"] and all(len(o.texts) == 4 for o in outcomes)
    ids = [prompts.chat_ids(tokenizer, item.text) for item in items]
    # batches of 3 here against one call of 4 there: same answers (left padding is masked)
    assert outcomes[0].texts == [runner.decode(a) for a in generate(runner, ids, [()] * 4)]
    assert outcomes[1].texts == [runner.decode(a) for a in generate(runner, ids, rows)]
    assert outcomes[1].texts != outcomes[0].texts  # steering at × 8 changes the tiny model's answers
    assert outcomes[1].follows == ["," not in text for text in outcomes[1].texts]


def test_a_file_without_an_entry_for_the_instruction_is_named(vector_path):
    with pytest.raises(CandidateError, match=f"{vector_path}: no entry is routed to change_case:english_lowercase"):
        load_candidate(f"c={vector_path}", "change_case:english_lowercase")


def test_the_command_writes_every_answer_and_prints_the_table(tiny_model_dir, tmp_path, capsys):
    from lm_eval_steer.cli import main

    model_dir = str(tiny_model_dir)
    torch.manual_seed(2)
    entry = SteeringEntry(name=INSTRUCTION, vector=torch.randn(64), layer=1, mode="add", strength=20.0, applies_to=AppliesTo(INSTRUCTION))
    save_vector_file(tmp_path / "v.safetensors", [entry], model="tiny", hidden_size=64, num_layers=4)
    out = tmp_path / "answers.json"
    code = main(["validate", "--model_args", f"pretrained={model_dir},dtype=float32,device=cpu,name=tiny", "--instruction", INSTRUCTION,
                 "--questions", "2", "--max-new-tokens", "4", "--batch-size", "4", f"one={tmp_path / 'v.safetensors'}", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "| unsteered | " in table and "| one | " in table and "of 4 |" in table
    assert re.search(r"validate: 100%\|.*\| 8/8 ", captured.err)  # the progress bar counted every answer of both runs
    saved = json.loads(out.read_text())
    assert [c["label"] for c in saved["candidates"]] == ["unsteered", "one"]
    assert all(len(c["texts"]) == 4 and set(c["counts"]) >= {"new_looping", "fluent_told"} for c in saved["candidates"])
    assert saved["settings"]["instruction"] == INSTRUCTION and math.isclose(saved["settings"]["questions"], 2)
    asked = saved["prompts"]  # the prompts, in the answers' order: two questions untold, then told
    assert len(asked) == 4 and all([i["id"] for i in p["instructions"]] == [INSTRUCTION] for p in asked)
    assert asked[2]["text"].startswith(asked[0]["text"]) and len(asked[2]["text"]) > len(asked[0]["text"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--instruction", "no:such_id", "a=x.safetensors"], "--instruction 'no:such_id': not an IFEval instruction id"),
        (["--instruction", "keywords:existence", "a=x.safetensors"], "--instruction keywords:existence: give the words to ask for with --keywords"),
        (["--instruction", INSTRUCTION, "a=x.safetensors*0"], "finite number above 0"),
        (["--instruction", INSTRUCTION, "--questions", "0", "a=x.safetensors"], "--questions, --max-new-tokens and --batch-size must be at least 1"),
        (["--instruction", INSTRUCTION, "a=no-such-name"], "no packaged vector file of that name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, arguments, message):
    from lm_eval_steer.cli import main

    code = main(["validate", "--model_args", f"pretrained={tiny_model_dir},dtype=float32,device=cpu", "--out", str(tmp_path / "o.json"), *arguments])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "o.json").exists()


def test_a_file_built_for_another_model_shape_is_refused_before_the_weights_load(tiny_model_dir, tmp_path, capsys):
    from lm_eval_steer.cli import main

    entry = SteeringEntry(name=INSTRUCTION, vector=torch.ones(32), layer=1, mode="add", strength=1.0, applies_to=AppliesTo(INSTRUCTION))
    save_vector_file(tmp_path / "v.safetensors", [entry], model="tiny", hidden_size=32, num_layers=4)
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the files were checked")):
        code = main(["validate", "--model_args", f"pretrained={tiny_model_dir},name=tiny", "--out", str(tmp_path / "o.json"),
                     "--instruction", INSTRUCTION, f"a={tmp_path / 'v.safetensors'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.endswith("v.safetensors: built for hidden_size 32, but tiny has hidden_size 64") and "\n" not in error


def counts(fluent_untold=0, fluent_told=0, new_looping=0, passes_told=0):
    return {"passes_untold": 0, "passes_told": passes_told, "fluent_untold": fluent_untold, "fluent_told": fluent_told,
            "looping": 0, "new_looping": new_looping, "cured_looping": 0}


def test_the_shipping_rule_names_every_reason_a_candidate_does_not_replace_the_reference():
    reference = counts(fluent_untold=10, fluent_told=11, new_looping=10, passes_told=14)
    assert shipping_problems(counts(12, 10, 9, 14), reference) == []  # 22 fluent > 21, fewer new loops, as many told passes
    assert shipping_problems(counts(11, 10, 9, 14), reference) == ["fluent passes 21 not above 21"]
    assert shipping_problems(counts(12, 10, 11, 9), reference) == ["new looping 11 above 10", "told passes 9 below 14"]


def test_against_judges_every_other_candidate_in_the_table_and_the_json():
    unsteered = Outcome("unsteered", [False] * 4, [False, False, True, True], ["a"] * 4)
    packaged = Outcome("packaged", [True, False, True, False], [False] * 4, ["b"] * 4)  # 2 fluent, 1 told pass
    better = Outcome("better", [True, True, True, False], [False] * 4, ["c"] * 4)       # 3 fluent, 1 told pass
    worse = Outcome("worse", [True, True, False, False], [True, False, False, False], ["d"] * 4)  # 1 fluent, 1 new loop, 0 told
    outcomes = [unsteered, packaged, better, worse]
    saved = report(outcomes, [], {}, "packaged")["candidates"]
    table = summary_table(saved, "packaged").splitlines()
    assert table[0].endswith("| replaces packaged? |")
    assert table[2].endswith("| — |") and table[3].endswith("| — |") and table[4].endswith("| yes |")
    assert table[5].endswith("| no: fluent passes 1 not above 2; new looping 1 above 0; told passes 0 below 1 |")
    assert table[5].startswith("| worse | 2 + 0 | 1 + 0 | 1 of 4 | 1 | 2 |")  # counts against the unsteered answers, as saved
    assert [c.get("replaces", {}).get("yes") for c in saved] == [None, None, True, False]
    unjudged = report(outcomes, [], {})["candidates"]
    assert "replaces" not in unjudged[2] and "replaces" not in summary_table(unjudged)


@pytest.mark.parametrize(("extra", "message"), [(["--against", "nope"], "--against 'nope': not a candidate label (a, b)"),
                                                ([], "candidate labels must differ")])
def test_a_twice_given_label_or_an_unknown_against_is_refused_before_the_model_loads(tmp_path, capsys, vector_path, extra, message):
    from lm_eval_steer.cli import main

    second = "b" if extra else "a"
    code = main(["validate", "--model_args", f"pretrained={tmp_path / 'no-model'}", "--out", str(tmp_path / "o.json"),
                 "--instruction", INSTRUCTION, f"a={vector_path}", f"{second}={vector_path}*0.5", *extra])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error


def test_paired_prompts_ask_a_second_instruction_and_pass_only_when_both_hold(tiny, vector_path):
    model, tokenizer = tiny
    questions = ["What is a cat?", "Name a colour."]
    _, (target,) = prompts.plan([INSTRUCTION])
    single = checks_for([target], questions, 0)
    paired = checks_for([target], questions, 0, paired_with=["startend:quotation"])
    sentences = [two.text[len(one.text) + 1 :] for one, two in zip(single, paired)]
    assert sentences[:2] == sentences[2:] and all("quot" in sentence for sentence in sentences)  # drawn once per question
    for one, two, sentence in zip(single, paired, sentences):
        assert two.text == f"{one.text} {sentence}" and two.checker_prompt == f"{one.checker_prompt} {sentence}"  # untold and told
        assert [i for i, _ in two.instructions] == [INSTRUCTION, "startend:quotation"] and two.instructions[0] == one.instructions[0]
    both = load_candidate(f"both={vector_path}", INSTRUCTION)
    assert [sorted(e.name for e in row) for row in rows_for(both, paired)] == [[INSTRUCTION, "startend:quotation"]] * 4  # its quotation entry applies too

    runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=4, seed=0, max_new_tokens=4))
    seen = []

    def scorer(instruction_id, kwargs, prompt, response):
        seen.append(instruction_id)
        return instruction_id == INSTRUCTION  # the target always holds, the paired one never
    outcomes = validate(runner, paired, [both], scorer=scorer)
    assert all(not any(o.follows) for o in outcomes) and seen.count("startend:quotation") == 8


def test_mixed_pairs_the_questions_in_turn_with_every_instruction_that_can_share_a_prompt():
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    _, (target,) = prompts.plan(["change_case:english_lowercase"])
    mixed = paired_instructions(target, MIXED)
    conflicting = INSTRUCTION_CONFLICTS["change_case:english_lowercase"]
    assert "change_case:english_capital" in conflicting and mixed == sorted(set(prompts.instruction_registry()) - conflicting)
    questions = [f"Question {i}?" for i in range(len(mixed) + 2)]
    checks = checks_for([target], questions, 0, paired_with=mixed)
    seconds = [check.instructions[1][0] for check in checks]
    expected = [mixed[i % len(mixed)] for i in range(len(questions))]
    assert seconds == expected + expected  # in turn, the told prompt of a question with the untold one's instruction
    same = [check.instructions[1] for check in checks if check.instructions[1][0] != "combination:repeat_prompt"]
    assert same[: len(same) // 2] == same[len(same) // 2 :]  # the same kwargs untold and told
    repeats = [check for check in checks if check.instructions[1][0] == "combination:repeat_prompt"]
    assert len(repeats) == 2 * expected.count("combination:repeat_prompt") > 0 and all(check.instructions[1][1]["prompt_to_repeat"] in check.text for check in repeats)  # the request shown
    assert paired_instructions(target, "startend:quotation, detectable_format:title") == ["startend:quotation", "detectable_format:title"]


@pytest.mark.parametrize(("paired", "message"), [("no:such_id", "--paired-with 'no:such_id': not an IFEval instruction id"),
                                                 (INSTRUCTION, f"--paired-with {INSTRUCTION}: conflicts with --instruction {INSTRUCTION}"),
                                                 ("change_case:english_capital", "conflicts with --instruction change_case:english_lowercase"),
                                                 ("startend:quotation,mixed", "--paired-with 'mixed': not an IFEval instruction id"),
                                                 ("startend:quotation,startend:quotation", "an instruction is given twice")])
def test_a_paired_instruction_that_cannot_be_asked_is_refused_before_the_model_loads(tmp_path, capsys, vector_path, paired, message):
    from lm_eval_steer.cli import main

    instruction = "change_case:english_lowercase" if paired.startswith("change_case") else INSTRUCTION
    code = main(["validate", "--model_args", f"pretrained={tmp_path / 'no-model'}", "--out", str(tmp_path / "o.json"),
                 "--instruction", instruction, "--paired-with", paired, f"a={vector_path}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error


def test_keyword_questions_take_the_words_in_turn_and_route_each_words_entry(tmp_path):
    questions = ["What is a cat?", "Name a colour.", "Why is the sky blue?"]
    targets = targets_for("keywords:existence", ["river", "moon"])
    checks = checks_for(targets, questions, 0)
    words = [dict(check.instructions[0][1])["keywords"] for check in checks]
    assert words == [["river"], ["moon"], ["river"]] * 2  # untold, then told: the same word per question
    assert [c.text for c in checks[:3]] == questions and all("river" in c.checker_prompt or "moon" in c.checker_prompt for c in checks)
    # the build words question i for a word as it would in that word's own validation
    assert checks[4].text == prompts.validation_prompts(targets[1], questions, 0, also_with_instruction=True)[4].text
    entries = [
        SteeringEntry(f"keywords:existence:{word}", torch.ones(64), 1, "add", 1.0, applies_to=AppliesTo("keywords:existence", {"keywords": [word]}))
        for word in ("river", "sun")
    ]
    path = tmp_path / "k.safetensors"
    save_vector_file(path, entries, model="tiny", hidden_size=64, num_layers=4)
    rows = rows_for(load_candidate(f"k={path}", "keywords:existence"), checks)
    assert [[e.name for e in row] for row in rows] == [["keywords:existence:river"], [], ["keywords:existence:river"]] * 2  # no entry for "moon"


def test_keywords_are_refused_for_an_instruction_without_words(tmp_path, capsys, vector_path):
    from lm_eval_steer.cli import main

    code = main(["validate", "--model_args", f"pretrained={tmp_path / 'no-model'}", "--out", str(tmp_path / "o.json"),
                 "--instruction", INSTRUCTION, "--keywords", "river", f"a={vector_path}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert f"--keywords: only for the keyword instructions (keywords:existence, keywords:forbidden_words), not {INSTRUCTION}" in error
