"""vector_builder.pipeline on a tiny random Llama: the full build per method, pooling, resume, the CLI's build."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lm_eval_steer.runtime.routing import entries_for_document
from lm_eval_steer.runtime.vectorfile import load_vector_file
from vector_builder import BuildSettings, Validation, build, report, search
from vector_builder.cli import print_summary
from vector_builder.methods import diffmean, pick
from vector_builder.methods.learned import LearnedSettings, stage, training
from vector_builder.methods.learned.targets import TargetSettings
from vector_builder.methods.token import TokenDirectionError, first_token
from vector_builder.prompts import chat_ids, split_queries
from vector_builder.runner import GenerationSettings
from vector_builder.search import SearchSettings

QUERIES = [f"Question number {i}: what is {i} plus {i + 1}?" for i in range(12)]
SEARCH = SearchSettings(layers=(1, 2), multipliers=(1.0, 4.0))
SMALL = dict(n_train=4, n_val=2, method="diffmean", generation=GenerationSettings(batch_size=4, max_new_tokens=6, seed=0), search=SEARCH)
TINY_LEARNED = dict(learned=LearnedSettings(layers=(1,), steps=4, batch_size=2), targets=TargetSettings(samples=1, max_tokens=6))


def run_build(network, tokenizer, /, *, out, report_dir, scorer, resume=False, **settings):
    """``build`` on the test questions with ``BuildSettings(**settings)`` (``model=`` is its name)."""
    validation = Validation(scorer=scorer)
    return build(network, tokenizer, BuildSettings(**settings), out=out, report_dir=report_dir, queries=QUERIES, resume=resume, validation=validation)


def hash_scorer(instruction_id, kwargs, prompt, response) -> bool:
    """Deterministic stand-in for the IFEval checker: random-looking but fixed per response text."""
    return hashlib.sha256(f"{instruction_id}|{response}".encode()).digest()[0] % 2 == 0


pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_writes_a_loadable_file_report_and_plot(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "vec.safetensors"
    result = run_build(model, tokenizer, instructions=["punctuation:no_comma", "change_case:english_lowercase", "length", "keywords"], out=out,
                       report_dir=tmp_path / "rep", model="tiny", scorer=hash_scorer, keywords=["apple"], **SMALL)
    payload = json.loads(result.report_path.read_text())
    assert result.plot_path.read_bytes()[:4] == b"\x89PNG"
    names = [t["name"] for t in payload["targets"]]
    assert names == ["punctuation:no_comma", "change_case:english_lowercase", "length_constraints:number_sentences",
                     "length_constraints:number_words", "keywords:existence:apple", "keywords:forbidden_words:apple"]
    exclusion = payload["targets"][-1]["candidates"]
    assert all(c["strength"] < 0 for c in exclusion[1:])  # the inclusion direction, subtracted
    for row in payload["targets"]:
        assert len(row["candidates"]) == 5 and all(c["n"] == 2 for c in row["candidates"])
        assert sum(c["chosen"] for c in row["candidates"]) == 1
        assert all(c["new_looping"] + c["cured_looping"] <= c["n"] for c in row["candidates"])
        assert row["candidates"][0]["new_looping"] == row["candidates"][0]["cured_looping"] == 0  # no steering changes nothing
        assert (row["chosen"] == "none") == (row["note"] is not None)
    chosen = {t["name"]: t for t in payload["targets"] if t["chosen"] != "none"}
    assert chosen, "the hash scorer should make at least one candidate win"
    loaded = load_vector_file(out)
    assert (loaded.hidden_size, loaded.num_layers) == (64, 4)
    assert {e.name for e in loaded.entries} == set(chosen)
    for entry in loaded.entries:
        row = chosen[entry.name]
        assert entry.layer == row["layer"] and entry.strength == pytest.approx(row["strength"])
        assert entry.mode == ("add" if entry.name.startswith(("length", "keywords")) else "project")
        assert entry.name.startswith(entry.applies_to.instruction_id)
        assert float(entry.vector.norm()) == pytest.approx(1.0, abs=1e-5)
        if entry.name.startswith("length"):
            assert entry.applies_to.kwargs == {"relation": "less than"} and entry.applies_to.strength_rule is not None
    # steered-hf's routing serves each entry to the documents of its instruction (with the rule's strength)
    for entry in loaded.entries:
        kwargs = {"relation": "less than", "num_sentences": 3, "num_words": 50} if entry.name.startswith("length") else {}
        kwargs.update({"keywords": ["apple", "pear"]} if "existence" in entry.name else {"forbidden_words": ["apple"]} if "forbidden" in entry.name else {})
        doc = {"instruction_id_list": [entry.applies_to.instruction_id], "kwargs": [kwargs]}
        (routed,) = entries_for_document(doc, [loaded], "auto")
        assert routed.name == entry.name and torch.equal(routed.vector, entry.vector)
        rule = entry.applies_to.strength_rule
        assert routed.strength == pytest.approx(rule.strength_for(kwargs[rule.kwarg]) if rule else entry.strength)
        assert entries_for_document({"instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}, [loaded], "auto") == ()
    settings = json.loads(loaded.extra_metadata["builder"])
    assert settings["n_train"] == 4 and loaded.extra_metadata["data_sha256"] == settings["data_sha256"]
    assert settings["builder_version"] == 2 and settings["search"]["layers"] == [1, 2]
    assert payload["vector_file_sha256"] == loaded.sha256


def _file_content(path: Path) -> tuple[dict, dict]:
    """Metadata and tensor bytes (safetensors writes its metadata map in no fixed order, so files that
    hold the same content need not be byte-identical)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}


def test_interrupted_then_resumed_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    kwargs = dict(instructions=["punctuation:no_comma", "startend:quotation", "change_case:english_capital"], model="tiny", scorer=hash_scorer, **SMALL)
    full = run_build(model, tokenizer, out=tmp_path / "full.safetensors", report_dir=tmp_path / "full", **kwargs)

    saved = []
    original = report.Checkpoint.save_target

    def save_then_crash(self, result):
        original(self, result)
        saved.append(result.name)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(report.Checkpoint, "save_target", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_build(model, tokenizer, out=tmp_path / "resumed.safetensors", report_dir=tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed.safetensors").exists()
    resumed = run_build(model, tokenizer, out=tmp_path / "resumed.safetensors", report_dir=tmp_path / "resumed", resume=True, **kwargs)
    assert saved[0] not in saved[1:], "the finished target must come from the checkpoint"
    assert _file_content(tmp_path / "full.safetensors") == _file_content(tmp_path / "resumed.safetensors")
    strip = lambda r: {k: v for k, v in json.loads(r.report_path.read_text()).items() if k not in ("timing_seconds", "peak_rss_mib", "vector_file", "vector_file_sha256")}  # noqa: E731
    assert strip(full) == strip(resumed)

    with pytest.raises(report.CheckpointError, match="other settings"):
        run_build(model, tokenizer, out=tmp_path / "x.safetensors", report_dir=tmp_path / "resumed", resume=True, **{**kwargs, "generation": replace(SMALL["generation"], seed=1)})


def test_ties_leave_entries_out(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.warns(UserWarning, match="not written"):
        result = run_build(model, tokenizer, instructions=["punctuation:no_comma"], out=tmp_path / "v.safetensors", report_dir=tmp_path,
                           model="tiny", scorer=lambda *args: True, **{**SMALL, "search": replace(SEARCH, validation_prompts="without and with instruction")})
    assert result.vector_file is None and not (tmp_path / "v.safetensors").exists()
    row = json.loads(result.report_path.read_text())["targets"][0]
    assert row["chosen"] == "none" and "ties go to no steering" in row["note"]
    assert all(c["score"] == c["score_with_instruction"] == 1.0 and c["n"] == 4 for c in row["candidates"])


SALT = "0"


def test_keyword_sample_pools_one_choice_for_every_word(tiny, tmp_path):
    model, tokenizer = tiny
    words = ["apple", "pear", "plum", "fig", "kiwi"]
    salted_scorer = lambda iid, kwargs, prompt, response: hash_scorer(iid, kwargs, prompt, SALT + response)  # noqa: E731

    result = run_build(model, tokenizer, instructions=["keywords:existence"], keywords=words, out=tmp_path / "k.safetensors",
                       report_dir=tmp_path / "rep", model="tiny", scorer=salted_scorer, **{**SMALL, "search": replace(SEARCH, keyword_sample=2)})
    sampled = result.pooled["keywords:existence"]
    assert len(sampled) == 2 and set(sampled) <= {f"keywords:existence:{w}" for w in words}
    pooled = result.results["keywords:existence (pooled over 2 words)"]
    # only the sampled words were validated; the pooled score is over their 2 x n_val prompts
    assert {name for name in result.results if name.startswith("keywords:existence:")} == set(sampled)
    assert all(len(item.follows) == 2 * SMALL["n_val"] for item in pooled.candidates)
    report_json = json.loads(result.report_path.read_text())
    assert report_json["pooled_over"] == {"keywords:existence": sampled} and report_json["settings"]["search"]["keyword_sample"] == 2
    assert pooled.chosen is not None  # this salt's fixed scores favour a steered candidate
    chosen = pooled.candidate(pooled.chosen)
    assert all(result.results[name].chosen == pooled.chosen for name in sampled)  # the report shows what was applied
    entries = load_vector_file(tmp_path / "k.safetensors").entries
    assert sorted(e.name for e in entries) == sorted(f"keywords:existence:{w}" for w in words)  # every word, sampled or not
    assert {e.layer for e in entries} == {chosen.layer}
    sums = {e.name: e for e in entries}
    # each word's strength is the multiplier times its own direction's norm at that layer
    norms = {w: report_json["directions"][f"keywords:existence:{w}"]["shift_norm"][chosen.layer] for w in words}
    for word in words:
        assert sums[f"keywords:existence:{word}"].strength == pytest.approx(chosen.multiplier * norms[word], rel=1e-5)


def changed_from_first_scorer():
    """Follows = the response differs from the first response seen for that prompt: the search scores
    the unsteered candidate first, so every steered candidate that changes the output wins."""
    first: dict[str, str] = {}
    return lambda iid, kwargs, prompt, response: first.setdefault(prompt, response) != response


def test_token_method_steers_each_word_along_its_own_output_embedding(tiny, tmp_path):
    model, tokenizer = tiny
    words = ["apple", "pear", "medalist"]  # SmolLM2 spells "medalist" " medal" + "ist"
    settings = {**SMALL, "method": "token", "search": replace(SEARCH, token_multipliers=(0.5, 1.0), keyword_sample=2)}
    result = run_build(model, tokenizer, instructions=["keywords:existence"], keywords=words, out=tmp_path / "k.safetensors",
                       report_dir=tmp_path / "rep", model="tiny", scorer=changed_from_first_scorer(), **settings)
    pooled = result.results["keywords:existence (pooled over 2 words, token)"]
    assert pooled.chosen is not None and set(result.methods.values()) == {"token"}
    chosen = pooled.candidate(pooled.chosen)
    vector_file = load_vector_file(tmp_path / "k.safetensors")
    assert json.loads(vector_file.extra_metadata["methods"]) == {f"keywords:existence:{w}": "token" for w in words}
    with torch.no_grad():  # r[L]: mean norm of layer L's output over the training prompts' real tokens, first excluded
        ids = [chat_ids(tokenizer, query) for query in split_queries(QUERIES, SMALL["n_train"], SMALL["n_val"], 0)[0]]
        hidden = [model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states for seq in ids]
        norms = torch.stack([torch.cat([h[layer + 1][0, 1:].norm(dim=-1) for h in hidden]).mean() for layer in range(3)])
    output = model.get_output_embeddings().weight
    for entry in vector_file.entries:
        word = entry.name.rsplit(":", 1)[1]
        row = output[first_token(tokenizer, word)]
        torch.testing.assert_close(entry.vector, row / row.norm())
        assert (entry.layer, entry.mode) == (chosen.layer, "add")
        assert entry.strength == pytest.approx(chosen.multiplier * float(norms[chosen.layer]), rel=1e-4)
        pieces = ("medal",) if word == "medalist" else ()  # the push can only write a longer word's first token
        assert entry.stop_after == (word, *pieces), "an inclusion entry stops steering once the word (or its pushed piece) is written"


def test_token_method_refuses_non_keyword_instructions(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(TokenDirectionError, match="keyword instructions only"):
        run_build(model, tokenizer, instructions=["punctuation:no_comma"], out=tmp_path / "x.safetensors", report_dir=tmp_path / "rep",
                  model="tiny", scorer=hash_scorer, **{**SMALL, "method": "token"})


def test_cli_build_on_saved_tiny_model(tiny_model_dir, tmp_path, capsys):
    from lm_eval_steer.cli import main

    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query": q}) + "\n" for q in QUERIES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["build", "--model_args", f"pretrained={tiny_model_dir},dtype=float32,device=cpu", "--instructions", "punctuation:no_comma",
                     "--queries", str(queries), "--out", str(tmp_path / "v.safetensors"), "--report", str(tmp_path / "rep"),
                     "--layers", "1,3", "--multipliers", "1", "--n-train", "5", "--n-val", "2", "--batch-size", "4", "--max-new-tokens", "5",
                     "--method", "both", "--learned-layers", "2", "--learned-steps", "2", "--target-samples", "0", "--target-max-tokens", "5",
                     "--objective", "fluent", "--learned-fluency", "0.5"])
    text = capsys.readouterr().out
    assert code in (0, 1) and "punctuation:no_comma" in text and "(fluent " in text
    assert (tmp_path / "rep" / "report.json").is_file() and (tmp_path / "rep" / "scores.png").is_file()
    assert (code == 0) == (tmp_path / "v.safetensors").is_file()
    report_json = json.loads((tmp_path / "rep" / "report.json").read_text())
    # answers without commas pass no_comma (and repair removes commas): a learned vector is trained at layer 2
    assert report_json["settings"]["method"] == "both" and report_json["settings"]["learned"]["layers"] == [2]
    assert report_json["settings"]["learned"]["fluency"] == 0.5
    assert report_json["settings"]["search"]["objective"] == "fluent" and all("fluent_score" in c for c in report_json["targets"][0]["candidates"])
    assert list(report_json["learned"]["punctuation:no_comma"]["layers"]) == ["2"]
    assert (tmp_path / "rep" / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_both_methods_keep_the_better_method_per_instruction(tiny, tmp_path):
    model, tokenizer = tiny
    instructions = ["punctuation:no_comma", "change_case:english_lowercase"]
    settings = {**SMALL, **TINY_LEARNED, "n_train": 6, "method": "both", "learned": replace(TINY_LEARNED["learned"], multipliers=(1.0, 8.0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_build(model, tokenizer, instructions=instructions, out=tmp_path / "v.safetensors", report_dir=tmp_path / "rep",
                           model="tiny", scorer=hash_scorer, **settings)
    # Both instructions have enough (repaired) targets, so each was searched under both methods.
    assert {"punctuation:no_comma@learned", "change_case:english_lowercase@learned"} <= set(result.results)
    assert [item.label for item in result.results["punctuation:no_comma@learned"].candidates] == ["none", "L1x1", "L1x8"]
    for name in instructions:
        assert result.methods[name] == pick({"diffmean": result.results[name], "learned": result.results[name + "@learned"]})
    report_json = json.loads(result.report_path.read_text())
    assert report_json["methods"] == result.methods
    curves = report_json["learned"]["punctuation:no_comma"]["layers"]["1"]
    assert len(curves["train_loss"]) == 4 and curves["heldout_loss"][0][0] == 0
    if result.vector_file is None:
        return
    meta = json.loads(result.vector_file.extra_metadata["methods"])
    for entry in result.vector_file.entries:
        assert meta[entry.name] == result.methods[entry.name]
        if result.methods[entry.name] == "learned":  # add mode at the learned layer, strength = multiplier x trained norm
            norm = report_json["learned"][entry.name]["layers"]["1"]["norm"]
            assert entry.mode == "add" and entry.layer == 1
            assert any(abs(entry.strength - m * norm) < 1e-3 for m in (1.0, 8.0))
        else:
            assert entry.mode == "project"


def test_a_layer_where_training_learned_nothing_is_not_validated_and_a_warning_says_so(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    real = training.train_vectors

    def idle_at_layer_1(runner, train, heldout, layers, settings, desc=""):
        trained = real(runner, train, heldout, layers, settings, desc=desc)
        # the held-out loss never fell below its start: the kept vector is the zero start
        return {layer: replace(item, vector=torch.zeros_like(item.vector), best_step=0) if layer == 1 else item for layer, item in trained.items()}

    monkeypatch.setattr(training, "train_vectors", idle_at_layer_1)
    settings = {**SMALL, **TINY_LEARNED, "n_train": 6, "method": "learned", "learned": replace(TINY_LEARNED["learned"], layers=(1, 2))}
    with pytest.warns(UserWarning, match=r"punctuation:no_comma: the learned vector at layer\(s\) 1 never lowered its held-out loss"):
        result = run_build(model, tokenizer, instructions=["punctuation:no_comma"], out=tmp_path / "v.safetensors", report_dir=tmp_path / "rep",
                           model="tiny", scorer=hash_scorer, **settings)
    assert [item.label for item in result.results["punctuation:no_comma@learned"].candidates] == ["none", "L2x1"]

    monkeypatch.setattr(training, "train_vectors", lambda runner, train, heldout, layers, settings, desc="": {
        layer: replace(item, vector=torch.zeros(64), best_step=0) for layer, item in real(runner, train, heldout, layers, settings, desc=desc).items()})
    with pytest.warns(UserWarning, match=r"layer\(s\) 1, 2 never lowered"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no entry beat")
        result = run_build(model, tokenizer, instructions=["punctuation:no_comma"], out=tmp_path / "w.safetensors", report_dir=tmp_path / "rep2",
                           model="tiny", scorer=hash_scorer, **settings)
    assert "punctuation:no_comma@learned" not in result.results  # nothing left to validate
    assert result.vector_file is None and result.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_a_joint_build_trains_one_set_and_writes_an_entry_per_layer(tiny, tmp_path, capsys):
    """--learned-joint: the vectors at layers 1 and 2 are trained as one set, every candidate steers
    with both, and the chosen set becomes two entries routed to the instruction, each adding its own
    trained vector times the chosen multiplier."""
    model, tokenizer = tiny
    learned = replace(TINY_LEARNED["learned"], layers=(1, 2), multipliers=(1.0, 2.0), joint=True)
    settings = {**SMALL, **TINY_LEARNED, "n_train": 6, "method": "learned", "learned": learned}
    name = "punctuation:no_comma"
    result = run_build(model, tokenizer, instructions=[name], out=tmp_path / "j.safetensors", report_dir=tmp_path / "rep", model="tiny",
                       scorer=changed_from_first_scorer(), **settings)
    searched = result.results[f"{name}@learned"]
    assert [item.label for item in searched.candidates] == ["none", "L1+2x1", "L1+2x2"]
    assert searched.chosen is not None
    chosen = searched.candidate(searched.chosen)
    report_json = json.loads(result.report_path.read_text())
    layers = report_json["learned"][name]["layers"]
    assert layers["1"]["train_loss"] == layers["2"]["train_loss"] and layers["1"]["best_step"] == layers["2"]["best_step"]  # one training run
    assert report_json["targets"][0]["joint_layers"] == [1, 2]
    vector_file = load_vector_file(tmp_path / "j.safetensors")
    entries = vector_file.entries
    assert [(entry.name, entry.layer) for entry in entries] == [(name, 1), (f"{name}@L2", 2)]
    for entry in entries:
        assert entry.mode == "add" and entry.applies_to is not None and entry.applies_to.instruction_id == name
        assert entry.strength == pytest.approx(chosen.multiplier * layers[str(entry.layer)]["norm"], rel=1e-3)
    assert entries[0].strength != pytest.approx(entries[1].strength)  # each layer at its own trained norm
    assert json.loads(vector_file.extra_metadata["methods"]) == {name: "learned", f"{name}@L2": "learned"}
    document = {"instruction_id_list": [name], "kwargs": [{}]}
    assert [entry.name for entry in entries_for_document(document, [vector_file], "auto")] == [name, f"{name}@L2"]
    print_summary(result)
    assert f"layers 1+2 (joint), strength {chosen.strength:.3g}" in capsys.readouterr().out


def test_joint_training_needs_two_layers():
    with pytest.raises(ValueError, match="--learned-joint .* at least two distinct --learned-layers, got \\[3, 3\\]"):
        LearnedSettings(layers=(3, 3), joint=True)
    with pytest.raises(ValueError, match="--learned-joint"):
        LearnedSettings(joint=True)  # the default is one layer


def test_learned_build_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    settings = {**SMALL, **TINY_LEARNED, "n_train": 6, "method": "learned", "model": "tiny", "scorer": hash_scorer}
    instructions = ["punctuation:no_comma", "startend:quotation"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = run_build(model, tokenizer, instructions=instructions, out=tmp_path / "full.safetensors", report_dir=tmp_path / "full", **settings)
        original = stage.learn_direction
        calls = []

        def die_after_first(*args, **kwargs):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(stage, "learn_direction", die_after_first)
        with pytest.raises(KeyboardInterrupt):
            run_build(model, tokenizer, instructions=instructions, out=tmp_path / "r.safetensors", report_dir=tmp_path / "r", **settings)
        resumed_calls = []
        monkeypatch.setattr(stage, "learn_direction", lambda *a, **k: resumed_calls.append(1) or original(*a, **k))
        resumed = run_build(model, tokenizer, instructions=instructions, out=tmp_path / "r.safetensors", report_dir=tmp_path / "r", resume=True, **settings)
    assert len(resumed_calls) == 1  # the first direction came from the checkpoint

    def without_timing(result):
        learned = json.loads(result.report_path.read_text())["learned"]
        for item in learned.values():
            item.pop("targets_seconds")
            for layer in item["layers"].values():
                layer.pop("seconds")
        return learned

    assert without_timing(resumed) == without_timing(full) and without_timing(full)
    assert {name: r.to_json() for name, r in resumed.results.items()} == {name: r.to_json() for name, r in full.results.items()}
    assert (full.vector_file is None) == (resumed.vector_file is None)
    if full.vector_file is not None:
        assert _file_content(tmp_path / "full.safetensors") == _file_content(tmp_path / "r.safetensors")



def test_resume_with_other_guards_reuses_the_checkpoint_and_equals_a_fresh_build(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    kwargs = dict(instructions=["punctuation:no_comma", "startend:quotation"], model="tiny", scorer=hash_scorer, **SMALL)
    guards = dict(search=replace(SEARCH, allowed_degenerate=2, min_length_ratio=0.9, objective="fluent"))
    run_build(model, tokenizer, out=tmp_path / "first.safetensors", report_dir=tmp_path / "resumed", **kwargs)
    fresh = run_build(model, tokenizer, out=tmp_path / "fresh.safetensors", report_dir=tmp_path / "fresh", **{**kwargs, **guards})

    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed build must not validate again")

    monkeypatch.setattr(search, "generate", no_generation)
    resumed = run_build(model, tokenizer, out=tmp_path / "resumed.safetensors", report_dir=tmp_path / "resumed", resume=True, **{**kwargs, **guards})
    strip = lambda r: {k: v for k, v in json.loads(r.report_path.read_text()).items() if k not in ("timing_seconds", "peak_rss_mib", "vector_file", "vector_file_sha256")}  # noqa: E731
    assert strip(resumed) == strip(fresh)
    assert strip(resumed)["settings"]["search"]["allowed_degenerate"] == 2 and strip(resumed)["settings"]["search"]["objective"] == "fluent"
    assert (fresh.vector_file is None) == (resumed.vector_file is None)
    if fresh.vector_file is not None:
        assert _file_content(tmp_path / "fresh.safetensors") == _file_content(tmp_path / "resumed.safetensors")
    # the repetition threshold decides which answers count as degenerate: a checkpoint is not valid for another one
    with pytest.raises(report.CheckpointError, match="other settings"):
        run_build(model, tokenizer, out=tmp_path / "x.safetensors", report_dir=tmp_path / "resumed", resume=True, **{**kwargs, "search": replace(SEARCH, max_repetition=0.3)})


def test_resume_with_other_multipliers_keeps_the_training_and_validates_again(tiny, tmp_path, monkeypatch):
    """Offering another strength after a build (here × 2 beside × 1) needs no training: the checkpoint's
    vectors and sums are kept, every candidate is validated again, and the result is a fresh build's."""
    model, tokenizer = tiny
    kwargs = dict(SMALL, **TINY_LEARNED, method="both", instructions=["punctuation:no_comma", "startend:quotation"], model="tiny", scorer=hash_scorer)
    wider = dict(kwargs, search=replace(SEARCH, multipliers=(1.0, 4.0, 8.0)), learned=replace(TINY_LEARNED["learned"], multipliers=(1.0, 2.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_build(model, tokenizer, out=tmp_path / "first.safetensors", report_dir=tmp_path / "resumed", **kwargs)
        fresh = run_build(model, tokenizer, out=tmp_path / "fresh.safetensors", report_dir=tmp_path / "fresh", **wider)
        validated = []
        monkeypatch.setattr(stage, "learn_direction", lambda *a, **k: pytest.fail("a resumed build must not train again"))
        monkeypatch.setattr(diffmean, "collect_sums", lambda *a, **k: pytest.fail("a resumed build must not collect activations again"))
        original_generate = search.generate
        monkeypatch.setattr(search, "generate", lambda *a, **k: validated.append(1) or original_generate(*a, **k))
        resumed = run_build(model, tokenizer, out=tmp_path / "resumed.safetensors", report_dir=tmp_path / "resumed", resume=True, **wider)
    assert validated, "the stored validation answers belong to other candidates: validation must run again"
    labels = {c["candidate"] for t in json.loads(resumed.report_path.read_text())["targets"] for c in t["candidates"]}
    assert {"L1x2", "L1x8"} <= labels
    assert {name: r.to_json() for name, r in resumed.results.items()} == {name: r.to_json() for name, r in fresh.results.items()}
    assert (fresh.vector_file is None) == (resumed.vector_file is None)
    if fresh.vector_file is not None:
        assert _file_content(tmp_path / "fresh.safetensors")[1] == _file_content(tmp_path / "resumed.safetensors")[1]
    # anything that changes what is trained still refuses the checkpoint
    with pytest.raises(report.CheckpointError, match="other settings"):
        run_build(model, tokenizer, out=tmp_path / "x.safetensors", report_dir=tmp_path / "resumed", resume=True,
                  **dict(wider, learned=replace(wider["learned"], steps=5)))


def windowed_build(tiny, tmp_path, **windows):
    """A diffmean build of three format instructions searching the given answer-window axes:
    ``(result, report payload, {entry name: its chosen candidate's report row}, written entries)``."""
    model, tokenizer = tiny
    out = tmp_path / "vec.safetensors"
    result = run_build(model, tokenizer, instructions=["punctuation:no_comma", "change_case:english_lowercase", "startend:quotation"], out=out,
                       report_dir=tmp_path / "rep", model="tiny", scorer=hash_scorer, **dict(SMALL, search=replace(SEARCH, **windows)))
    payload = json.loads(result.report_path.read_text())
    chosen = {t["name"]: next(c for c in t["candidates"] if c["chosen"]) for t in payload["targets"] if t["chosen"] != "none"}
    assert chosen, "the hash scorer should make at least one candidate win"
    return result, payload, chosen, load_vector_file(out).entries


def test_a_build_searches_token_stop_rules_and_writes_the_chosen_one(tiny, tmp_path, capsys):
    """``--stop-after-tokens``: every candidate is also tried steering only its first N answer tokens;
    the chosen candidate's rule becomes its entry's ``stop_after_tokens``."""
    result, payload, chosen, entries = windowed_build(tiny, tmp_path, stop_after_tokens=(2,))
    assert payload["settings"]["search"]["stop_after_tokens"] == [2]
    for row in payload["targets"]:
        labels = [c["candidate"] for c in row["candidates"]]
        assert labels == ["none", "L1x1@2", "L1x1", "L1x4@2", "L1x4", "L2x1@2", "L2x1", "L2x4@2", "L2x4"]
        assert [c["stop_after_tokens"] for c in row["candidates"][1:3]] == [2, None]
    for entry in entries:
        assert entry.stop_after_tokens == chosen[entry.name]["stop_after_tokens"]
    # the printed summary names the chosen rule beside layer and strength
    print_summary(result)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[0] in chosen}
    for name, candidate in chosen.items():
        rule = candidate["stop_after_tokens"]
        assert (f"first {rule} tokens" in lines[name]) == (rule is not None), lines[name]


def test_a_build_searches_delayed_starts_and_writes_the_chosen_one(tiny, tmp_path, capsys):
    """``--start-after-tokens``: every candidate is also tried starting after the answer's first K
    tokens; the chosen candidate's start becomes its entry's ``start_after_tokens``."""
    result, payload, chosen, entries = windowed_build(tiny, tmp_path, start_after_tokens=(2,), stop_after_tokens=(4,))
    assert payload["settings"]["search"]["start_after_tokens"] == [2]
    for row in payload["targets"]:
        labels = [c["candidate"] for c in row["candidates"]]
        assert labels[:5] == ["none", "L1x1>2@4", "L1x1@4", "L1x1>2", "L1x1"] and len(labels) == 1 + 4 * 4
        assert [(c["start_after_tokens"], c["stop_after_tokens"]) for c in row["candidates"][1:5]] == [(2, 4), (None, 4), (2, None), (None, None)]
    for entry in entries:
        assert (entry.start_after_tokens, entry.stop_after_tokens) == (chosen[entry.name]["start_after_tokens"], chosen[entry.name]["stop_after_tokens"])
    print_summary(result)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[0] in chosen}
    for name, candidate in chosen.items():
        assert ("from token 2" in lines[name]) == (candidate["start_after_tokens"] is not None), lines[name]


def test_token_stop_rules_must_be_distinct_positive_and_below_the_answer_length():
    for bad in ((0,), (4, 4), (-1,)):
        with pytest.raises(ValueError, match="--stop-after-tokens must be distinct positive token counts"):
            SearchSettings(stop_after_tokens=bad)
    with pytest.raises(ValueError, match=r"--stop-after-tokens \[6\] must be below --max-new-tokens 6"):
        BuildSettings(model="tiny", instructions=["format"], **dict(SMALL, search=replace(SEARCH, stop_after_tokens=(2, 6))))
    for bad in ((0,), (3, 3)):
        with pytest.raises(ValueError, match="--start-after-tokens must be distinct positive token counts"):
            SearchSettings(start_after_tokens=bad)
    with pytest.raises(ValueError, match=r"--start-after-tokens \[8\] must be below --max-new-tokens 6"):
        BuildSettings(model="tiny", instructions=["format"], **dict(SMALL, search=replace(SEARCH, start_after_tokens=(2, 8))))
