"""``lm-eval-steer quality``: perplexity of logged responses under the unsteered model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from results_fixtures import ifeval_scores, table_rows, write_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_steer.analysis import quality
from lm_eval_steer.cli import main
from lm_eval_steer.analysis.results import ResultsError, load_single_run

TASK = "ifeval_format_noinst"
SCORES = {TASK: ifeval_scores(0.1, 0.1, 0.1, 0.1)}


def sample(doc_id: int, response: str, prompt: str | None = None) -> dict:
    """A logged generation: lm-eval stores each request's (context, gen_kwargs) and its filtered response."""
    return {"doc_id": doc_id, "doc": {}, "arguments": [[prompt or f"question {doc_id}?", {"max_gen_toks": 8}]], "resps": [[response]], "filtered_resps": [response]}


def fake_scorer(pairs):
    # one "token" per character, log p = -1 per token unless the response shouts, then -3
    return [(-3.0 * len(text) if text.isupper() else -1.0 * len(text), len(text)) for _, text in pairs]


def char_tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_stats_are_token_weighted_and_changed_documents_compared_pairwise(tmp_path):
    base = load_single_run(write_run(tmp_path / "base", SCORES, samples={TASK: [sample(0, "abcd"), sample(1, "ab"), sample(2, "same")]}))
    steered = load_single_run(write_run(tmp_path / "steer", SCORES, samples={TASK: [sample(0, "WXYZ"), sample(1, "ab"), sample(2, "same")]}))
    row = quality.task_quality(TASK, steered, base, fake_scorer, char_tokens)
    # all three: (12 + 2 + 4) nats over 10 tokens
    assert row.all.docs == 3 and row.all.perplexity == pytest.approx(math.exp(18 / 10))
    assert row.all.mean_tokens == pytest.approx(10 / 3) and row.all.degenerate == 0
    # only document 0 changed: steered exp(3) against the unsteered answer's exp(1)
    assert row.changed.docs == 1 and row.changed.perplexity == pytest.approx(math.exp(3))
    assert row.baseline_changed.docs == 1 and row.baseline_changed.perplexity == pytest.approx(math.e)
    alone = quality.task_quality(TASK, base, base, fake_scorer, char_tokens)
    assert alone.changed is None and alone.all.perplexity == pytest.approx(math.e)


def test_repetitive_responses_count_as_degenerate(tmp_path):
    run = load_single_run(write_run(tmp_path / "r", SCORES, samples={TASK: [sample(0, "abc" * 10), sample(1, "abcdefghijklmnopqrstu")]}))
    assert quality.task_quality(TASK, run, None, fake_scorer, char_tokens).all.degenerate == 0.5


def test_different_prompts_for_the_same_document_are_refused(tmp_path):
    base = load_single_run(write_run(tmp_path / "base", SCORES, samples={TASK: [sample(0, "a", prompt="with instruction")]}))
    other = load_single_run(write_run(tmp_path / "other", SCORES, samples={TASK: [sample(0, "b", prompt="without")]}))
    with pytest.raises(ResultsError, match="different prompts"):
        quality.task_quality(TASK, other, base, fake_scorer, char_tokens)


def test_samples_without_prompts_are_a_clear_error(tmp_path):
    run = load_single_run(write_run(tmp_path / "r", SCORES, samples={TASK: [{"doc_id": 0, "doc": {}}]}))
    with pytest.raises(ResultsError, match="no prompt/response"):
        quality.responses(run.sample_files[TASK])


def test_harness_scorer_equals_direct_perplexity(tiny_model_dir):
    score, tokenize = quality.harness_scorer(f"pretrained={tiny_model_dir}", "cpu", 2)
    pairs = [("Tell me a story.", " Once upon a time"), ("Hi", " there, friend."), ("Empty", "")]
    scored = score(pairs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for (prompt, text), (logprob, count) in zip(pairs[:2], scored[:2]):
        context = tokenizer(prompt, add_special_tokens=False).input_ids
        whole = tokenizer(prompt + text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        expected = sum(float(logits[i - 1, whole[i]]) for i in range(len(context), len(whole)))
        assert count == len(whole) - len(context) and logprob == pytest.approx(expected, abs=1e-3)
    assert scored[2] == (0.0, 0)
    assert tokenize(" there") == tokenizer(" there", add_special_tokens=False).input_ids


def test_harness_scorer_scores_each_pair_once(tiny_model_dir, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    asked: list[tuple[str, str]] = []
    original = HFLM.loglikelihood

    def counting(self, requests, *args, **kwargs):
        asked.extend(request.args for request in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", counting)
    score, _ = quality.harness_scorer(f"pretrained={tiny_model_dir}", "cpu", 2)
    first = score([("Hi", " there"), ("Hi", " you"), ("Hi", " there")])
    second = score([("Hi", " you"), ("Bye", " now"), ("Bye", "")])
    assert asked == [("Hi", " there"), ("Hi", " you"), ("Bye", " now")]
    assert first[0] == first[2] and second[0] == first[1] and second[2] == (0.0, 0)


def test_cli_writes_markdown_and_json(tmp_path, tiny_model_dir, capsys):
    base = write_run(tmp_path / "base", SCORES, samples={TASK: [sample(0, " one two"), sample(1, " three")]})
    steered = write_run(tmp_path / "steer", SCORES, samples={TASK: [sample(0, " one two"), sample(1, " four five six")]}, model_type="steered-hf")
    out = tmp_path / "quality"
    assert main(["quality", str(base), str(steered), "--baseline", str(base), "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads((out / "quality.json").read_text())
    assert [row["changed"] and row["changed"]["docs"] for row in payload["rows"]] == [None, 1]
    rows = table_rows((out / "quality.md").read_text())
    assert rows[0][:4] == ["task", "run", "docs", "PPL"] and len(rows) == 3
    assert rows[2][6] == "1"  # one changed document for the steered run


def test_cli_refuses_runs_without_samples(tmp_path, capsys):
    bare = write_run(tmp_path / "bare", SCORES)
    assert main(["quality", str(bare), "--model_args", "pretrained=unused", "--out", str(tmp_path / "q")]) == 2
    assert "--log_samples" in capsys.readouterr().err


def test_baseline_is_scored_only_on_the_tasks_the_other_runs_logged(tmp_path):
    other = "ifeval_length_noinst"
    scores = {**SCORES, other: ifeval_scores(0.1, 0.1, 0.1, 0.1)}
    base = load_single_run(write_run(tmp_path / "base", scores, samples={TASK: [sample(0, " a")], other: [sample(0, " b")]}))
    steered = load_single_run(write_run(tmp_path / "steer", SCORES, samples={TASK: [sample(0, " c")]}, model_type="steered-hf"))
    assert quality.tasks_to_score(base, [base, steered], base) == [TASK]
    assert quality.tasks_to_score(steered, [base, steered], base) == [TASK]
    assert quality.tasks_to_score(base, [base], base) == [TASK, other]  # the baseline alone: every task


def test_cli_parses_each_samples_file_once(tmp_path, monkeypatch):
    # Two steered runs compared with one baseline: the baseline's file serves both without a re-read.
    base = write_run(tmp_path / "base", SCORES, samples={TASK: [sample(0, " one"), sample(1, " two")]})
    steered = [write_run(tmp_path / f"s{i}", SCORES, samples={TASK: [sample(0, " one"), sample(1, f" new {i}")]}, model_type="steered-hf") for i in range(2)]
    reads: list[str] = []
    real_read = quality.read_samples
    monkeypatch.setattr(quality, "read_samples", lambda path: (reads.append(str(path)), real_read(path))[1])
    monkeypatch.setattr(quality, "harness_scorer", lambda *args: (fake_scorer, char_tokens))
    argv = ["quality", str(base), *map(str, steered), "--baseline", str(base), "--model_args", "pretrained=unused", "--out", str(tmp_path / "q")]
    assert main(argv) == 0
    assert len(reads) == 3 and len(set(reads)) == 3
    payload = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert [row["changed"] and row["changed"]["docs"] for row in payload["rows"]] == [None, 1, 1]
