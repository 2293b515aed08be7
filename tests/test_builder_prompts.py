"""vector_builder.prompts: the query split, instruction wording, the plan of directions and targets,
chat prompts and validation prompts."""

from __future__ import annotations

import random

import pytest

from vector_builder import prompts


def test_split_is_deterministic_and_disjoint():
    queries = prompts.load_queries()
    assert len(queries) >= 200
    train, val = prompts.split_queries(queries, 20, 5, seed=3)
    assert (train, val) == prompts.split_queries(queries, 20, 5, seed=3)
    assert not set(train) & set(val)
    assert prompts.split_queries(queries, 20, 5, seed=4) != (train, val)
    with pytest.raises(prompts.PromptError, match="only"):
        prompts.split_queries(queries[:3], 2, 2, seed=0)


def test_a_packaged_question_set_is_named_from_any_directory_and_a_path_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here: the names resolve to the package's own files
    assert set(prompts.PACKAGED_QUERIES) == {"queries", "writing_tasks"}
    assert prompts.load_queries("queries") == prompts.load_queries()
    writing = prompts.load_queries("writing_tasks")
    assert len(writing) == 120 and not set(writing) & set(prompts.load_queries())
    (tmp_path / "writing_tasks").write_text('{"query": "Mine?"}\n')  # an existing file wins over the name
    assert prompts.load_queries("writing_tasks") == ["Mine?"]
    with pytest.raises(prompts.PromptError) as error:
        prompts.load_queries("nope")
    assert str(error.value) == "--queries 'nope': no such file, and no packaged question set of that name (packaged: queries, writing_tasks)"
    with pytest.raises(FileNotFoundError):
        prompts.load_queries("nope.jsonl")  # written as a path: the missing file is named by open()


def test_instruction_text_is_seeded_and_leaves_global_random_alone():
    prompts.describe("punctuation:no_comma", {}, "warm-up")  # importing the registry may itself draw
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = prompts.describe("length_constraints:number_sentences", {"relation": "less than"}, "s")
    assert random.random() == expected_next
    assert first == prompts.describe("length_constraints:number_sentences", {"relation": "less than"}, "s")
    assert first[1]["relation"] == "less than"


def test_plan_groups():
    ids = prompts.expand_instructions(["format", "length"])
    specs, targets = prompts.plan(ids)
    assert {t.mode for t in targets if t.instruction_id in prompts.FORMAT_IDS} == {"project"}
    length = [t for t in targets if t.instruction_id in prompts.LENGTH_IDS]
    assert {t.direction for t in length} == {prompts.CONCISE_KEY} and {t.mode for t in length} == {"add"}
    assert len(specs) == len(prompts.FORMAT_IDS) + 1
    specs, targets = prompts.plan(prompts.expand_instructions(["keywords"]), ["apple"])
    assert [s.key for s in specs] == ["keywords:existence:apple"]
    exclusion = next(t for t in targets if t.instruction_id == "keywords:forbidden_words")
    assert exclusion.sign == -1.0 and exclusion.direction == "keywords:existence:apple"
    assert exclusion.fixed_kwargs == {"forbidden_words": ["apple"]}
    with pytest.raises(prompts.PromptError, match="keywords"):
        prompts.plan(["keywords:existence"])
    with pytest.raises(prompts.PromptError, match="neither a group"):
        prompts.expand_instructions(["nonsense"])


def test_chat_prompt_has_a_single_bos(smol_tokenizer):
    ids = prompts.chat_ids(smol_tokenizer, "Why is the sky blue?")
    templated = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], tokenize=False, add_generation_prompt=True)
    assert smol_tokenizer.decode(ids) == templated
    bos = smol_tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos  # the template's own BOS, not a second one


def test_validation_prompts_hide_the_instruction_but_score_against_it():
    target = prompts.Target("length_constraints:number_words", prompts.CONCISE_KEY, "length_constraints:number_words", "add", 1.0, {"relation": "less than"}, "num_words")
    plain = prompts.validation_prompts(target, ["Why?", "How?"], seed=0)
    both = prompts.validation_prompts(target, ["Why?", "How?"], seed=0, also_with_instruction=True)
    assert [p.text for p in plain] == ["Why?", "How?"] and both[:2] == plain
    assert all(p.kwargs["relation"] == "less than" and p.checker_prompt.startswith(q) for p, q in zip(plain, ["Why?", "How?"]))
    assert [p.text for p in both[2:]] == [p.checker_prompt for p in plain]
