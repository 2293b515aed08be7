"""``lm-eval-steer anti-looping``: the repeat flags, the direction's formula, the choice on held-out
answers, the teacher-forced passes it is built from, and the command end to end on a tiny random
Llama whose greedy answers loop for about half the requests."""

from __future__ import annotations

import argparse
import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_llama
from lm_eval_steer.cli import main
from lm_eval_steer.core.degeneracy import NGRAM, is_degenerate, repeated_ngram_ends, repetition
from lm_eval_steer.runtime.vectorfile import load_vector_file
from vector_builder.activations import RunningSum, left_pad, positions_from_mask
from vector_builder.antiloop import FLUENT, REPEATING, AntiLoopingError, HeldOut, LayerDirection, choose, default_layers, directions, settings_from, token_groups
from vector_builder.teacher_forcing import answer_logprobs, answer_state_sums

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTES = "detectable_format:title,punctuation:no_comma"
LOWER = "change_case:english_lowercase"


@given(st.lists(st.integers(0, 3), max_size=60))
def test_repeated_ngram_ends_count_the_repeats_that_repetition_measures(tokens):
    flags = repeated_ngram_ends(tokens)
    grams = [tuple(tokens[i : i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)]
    assert len(flags) == len(tokens)
    assert sum(flags) == len(grams) - len(set(grams))
    assert not any(flags[: NGRAM - 1])
    if grams:
        assert math.isclose(repetition(tokens), sum(flags) / len(grams))


def test_token_groups_take_repeats_of_looping_answers_and_every_token_of_fluent_ones():
    looping = [5, 6, 7, 8] * 6  # 24 tokens, loops
    fluent = list(range(100, 124))
    assert is_degenerate(looping) and not is_degenerate(fluent)
    loop_groups, fluent_groups = token_groups([looping, fluent], skip_tokens=2)
    assert fluent_groups == [None, None] + [FLUENT] * 22
    assert loop_groups == [None] * 7 + [REPEATING] * 17  # no 4-gram repeats before the loop's second pass ends one


def sums_of(rows: list[list[float]]) -> RunningSum:
    total = RunningSum.zeros(1, 2)
    total.add(torch.tensor(rows, dtype=torch.float32)[:, None, :])
    return total


def test_the_direction_is_the_difference_of_the_two_means():
    sums = {REPEATING: sums_of([[4.0, 0.0], [6.0, 2.0]]), FLUENT: sums_of([[1.0, 1.0], [1.0, 1.0], [1.0, -2.0]])}
    (found,) = directions(sums, [7])
    assert found.layer == 7 and found.repeating_tokens == 2 and found.fluent_tokens == 3
    assert torch.allclose(found.vector, torch.tensor([4.0, 1.0]))
    assert math.isclose(found.repeating_projection - found.fluent_projection, found.norm, rel_tol=1e-6)


@pytest.mark.parametrize(("missing", "message"), [(REPEATING, "no training answer loops"), (FLUENT, "every training answer loops")])
def test_a_direction_needs_both_kinds_of_answer(missing, message):
    sums = {REPEATING: sums_of([[1.0, 0.0]]), FLUENT: sums_of([[0.0, 1.0]])}
    del sums[missing]
    with pytest.raises(AntiLoopingError, match=message):
        directions(sums, [0])


@given(d=st.lists(st.floats(-10, 10), min_size=3, max_size=3).filter(lambda v: sum(x * x for x in v) > 1e-3), m=st.floats(0.1, 3))
def test_the_entry_subtracts_m_times_d(d, m):
    vector = torch.tensor(d)
    entry = LayerDirection(3, vector, 1, 1, 0.0, 0.0).entry(m)
    assert entry.mode == "add" and entry.positions == "generated" and entry.layer == 3
    assert torch.allclose(entry.strength * entry.vector, -m * vector, atol=1e-4)


def result(label: str, loops: int, ppl: float | None, multiplier: float = 1.0) -> HeldOut:
    return HeldOut(label, 1, multiplier, [True] * loops + [False] * (10 - loops), 100.0, ppl, [])


def test_choose_takes_the_fewest_loops_within_the_perplexity_bound():
    unsteered = result("unsteered", 6, 2.0, 0.0)
    candidates = [result("a", 1, 2.8), result("b", 2, 2.4), result("c", 2, 2.3, 0.5), result("d", 7, 2.0), result("e", 3, None)]
    assert choose(unsteered, candidates, 0.5).label == "c"  # a is above the bound; c beats b on perplexity
    assert choose(unsteered, candidates, 1.0).label == "a"
    assert choose(unsteered, [result("same", 6, 2.0)], 0.5) is None  # no fewer loops than unsteered
    assert choose(result("unsteered", 6, None, 0.0), candidates, 0.5) is None


def test_default_layers_sit_at_40_and_60_percent_of_the_depth():
    assert default_layers(30) == (12, 18) and default_layers(24) == (10, 14) and default_layers(4) == (2,)


def test_options_given_twice_make_one_candidate():
    args = argparse.Namespace(layers=(3, 1, 3), multipliers=(0.5, 1.0, 0.5), n_train=8, n_val=4, skip_tokens=2, max_new_tokens=16,
                              batch_size=4, max_perplexity_rise=0.5, route="detectable_format:title,detectable_format:title",
                              not_with=" punctuation:no_comma,punctuation:no_comma ")
    chosen = settings_from(args, num_layers=4)
    assert (chosen.layers, chosen.multipliers, chosen.routes) == ((3, 1), (0.5, 1.0), ("detectable_format:title",))
    assert chosen.not_with == ("punctuation:no_comma",)
    assert settings_from(argparse.Namespace(**{**vars(args), "layers": None}), num_layers=30).layers == (12, 18)


# --------------------------------------------------------------------------- teacher-forced passes


def test_answer_logprobs_match_each_sequence_scored_alone(tiny):
    model, tokenizer = tiny
    prompts = [[1, 50, 60, 70, 80], [1, 90]]
    answers = [[11, 12, 13], [21, 22, 23, 24, 25]]
    batched = answer_logprobs(model, prompts, answers, batch_size=2, pad_id=tokenizer.pad_token_id)
    for (prompt, answer), (logprob, count) in zip(zip(prompts, answers), batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        alone = sum(float(logits[len(prompt) - 1 + j, token]) for j, token in enumerate(answer))
        assert count == len(answer) and math.isclose(logprob, alone, rel_tol=1e-4, abs_tol=1e-3)
    assert answer_logprobs(model, [[1, 2]], [[]], batch_size=1, pad_id=tokenizer.pad_token_id) == [(0.0, 0)]


def test_answer_state_sums_add_the_chosen_tokens_states_at_each_layer(tiny):
    model, tokenizer = tiny
    prompts, answers = [[1, 50, 60], [1, 70, 80, 90, 95]], [[11, 12, 13, 14], [21, 22]]
    groups = [["a", None, "b", "a"], [None, "b"]]
    sums = answer_state_sums(model, prompts, answers, groups, [0, 2], batch_size=2, pad_id=tokenizer.pad_token_id)
    expected = {"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}
    for prompt, answer, row_groups in zip(prompts, answers, groups):
        ids, mask = left_pad([prompt + answer], 0)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), output_hidden_states=True).hidden_states
        for j, group in enumerate(row_groups):
            if group is not None:
                expected[group] += torch.stack([hidden[layer + 1][0, len(prompt) + j] for layer in (0, 2)])
    assert sums["a"].count == 2 and sums["b"].count == 2
    for group in ("a", "b"):
        assert torch.allclose(sums[group].total.float(), expected[group], atol=1e-4)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def looping_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny Llama whose greedy answers loop for some writing requests and not for others."""
    directory = tmp_path_factory.mktemp("tiny-looping")
    model = build_tiny_llama(len(smol_tokenizer), seed=0, weight_std=0.09)
    model.config.bos_token_id, model.config.eos_token_id = smol_tokenizer.bos_token_id, smol_tokenizer.eos_token_id
    model.config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(directory)
    smol_tokenizer.save_pretrained(directory)
    return directory


def command(model_dir, tmp_path, *extra: str) -> list[str]:
    return ["anti-looping", "--model_args", f"pretrained={model_dir},dtype=float32,device=cpu,name=tiny", "--out", str(tmp_path / "al.safetensors"),
            "--report", str(tmp_path / "report"), "--n-train", "12", "--n-val", "8", "--max-new-tokens", "40", "--batch-size", "8",
            "--layers", "1,2", "--multipliers", "0.25,0.5,1", "--skip-tokens", "4", *extra]  # fmt: skip


def test_the_command_writes_the_chosen_entry_routed_to_each_instruction(looping_model_dir, tmp_path, capsys):
    assert main(command(looping_model_dir, tmp_path, "--route", ROUTES, "--not-with", f"{LOWER},punctuation:no_comma", "--max-perplexity-rise", "1e9")) == 0
    report = json.loads((tmp_path / "report" / "anti-looping.json").read_text())
    assert (tmp_path / "report" / "anti-looping.png").stat().st_size > 0
    unsteered, *candidates = report["held_out"]
    assert [c["label"] for c in candidates] == ["L1 x0.25", "L1 x0.5", "L1 x1", "L2 x0.25", "L2 x0.5", "L2 x1"]
    assert all(len(c["texts"]) == 8 and len(c["looping"]) == 8 for c in report["held_out"])
    chosen = next(c for c in candidates if c["label"] == report["chosen"])
    # the choice is the rule applied to the recorded numbers
    fewest = min(sum(c["looping"]) for c in candidates)
    assert sum(chosen["looping"]) == fewest < sum(unsteered["looping"])
    assert chosen["perplexity"] == min(c["perplexity"] for c in candidates if sum(c["looping"]) == fewest)
    direction = next(d for d in report["directions"] if d["layer"] == chosen["layer"])
    vectors = load_vector_file(tmp_path / "al.safetensors")
    assert [e.name for e in vectors.entries] == [f"{route}:anti-looping" for route in ROUTES.split(",")]
    for entry in vectors.entries:
        assert entry.applies_to.instruction_id == entry.name.removesuffix(":anti-looping")
        # kept off prompts that also ask for lowercase, and the title copy off no-comma prompts (not the no-comma copy: its own)
        assert entry.applies_to.not_with == ((LOWER, "punctuation:no_comma") if entry.applies_to.instruction_id == "detectable_format:title" else (LOWER,))
        assert (entry.layer, entry.mode, entry.positions) == (chosen["layer"], "add", "generated")
        assert math.isclose(entry.strength, -chosen["multiplier"] * direction["norm"], rel_tol=1e-5)
    assert json.loads(vectors.extra_metadata["anti_looping"])["chosen"] == report["chosen"]
    assert "<- chosen" in capsys.readouterr().out


def test_no_candidate_within_the_bound_writes_no_file(looping_model_dir, tmp_path, capsys):
    assert main(command(looping_model_dir, tmp_path, "--max-perplexity-rise", "0")) == 1
    assert not (tmp_path / "al.safetensors").exists()
    report = json.loads((tmp_path / "report" / "anti-looping.json").read_text())
    unsteered = report["held_out"][0]
    assert report["chosen"] is None and all(c["perplexity"] > unsteered["perplexity"] for c in report["held_out"][1:])
    assert "no vector file written" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lm-eval-steer anti-looping: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--route", "detectable_format:titles"], "--route 'detectable_format:titles'"),
        (["--route", "detectable_format:title", "--not-with", "no_comma"], "--not-with 'no_comma': matches no IFEval instruction id"),
        (["--not-with", "punctuation:no_comma"], "--not-with needs --route"),
        (["--route", "detectable_format:title", "--not-with", "punctuation:*,nothing:*"], "--not-with 'nothing:*': matches no IFEval instruction id"),
        (["--n-train", "100", "--n-val", "30"], "only 120 requests"),
        (["--n-val", "0"], "at least 1"),
        (["--skip-tokens", "40"], "--skip-tokens 40"),
        (["--max-perplexity-rise", "nan"], "--max-perplexity-rise"),
    ],
)
def test_bad_options_fail_in_one_line_before_the_model_loads(tmp_path, capsys, extra, named):
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the options were checked")):
        assert main(command(tmp_path / "no-model", tmp_path, *extra)) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("value", ["0", "-1,1", "nan", "inf", "a", ""])
def test_multipliers_must_be_positive_and_finite(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["anti-looping", "--model_args", "pretrained=/x", "--out", str(tmp_path / "v.safetensors"), "--report", str(tmp_path), "--multipliers", value])
    assert exit_.value.code == 2 and "--multipliers" in capsys.readouterr().err


def test_layers_outside_the_model_are_refused_before_its_weights_load(looping_model_dir, tmp_path, capsys):
    arguments = command(looping_model_dir, tmp_path)
    arguments[arguments.index("--layers") + 1] = "2,4"
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the layers were checked")):
        assert main(arguments) == 2
    assert capsys.readouterr().err.strip() == "lm-eval-steer anti-looping: error: --layers 4: the model has layers 0-3"
    assert not (tmp_path / "report" / "anti-looping.json").exists()
