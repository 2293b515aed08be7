"""``steered-hf`` on a tiny random model: equivalences with ``hf``, routing, loglikelihood, cache, records."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM
from lm_eval.models.huggingface import HFLM

from lm_eval_steer.runtime.model import SteeredHFLM
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, VectorFileError, save_vector_file

LOWER = "change_case:english_lowercase"
COMMA = "punctuation:no_comma"
GEN = {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}


def doc(*instruction_ids: str, kwargs: list | None = None) -> dict:
    return {"instruction_id_list": list(instruction_ids), "kwargs": kwargs or [{} for _ in instruction_ids]}


DOCS = [doc(LOWER), doc(COMMA), doc("detectable_format:title"), doc(LOWER, COMMA), doc(COMMA)]
PROMPTS = ["Write a poem about the sea.", "Describe a cat", "Hi", "Tell me a long story about two dragons and a knight", "Why?"]


def gen_requests(docs=DOCS, prompts=PROMPTS) -> list[Instance]:
    return [Instance("generate_until", d, (p, dict(GEN)), i) for i, (d, p) in enumerate(zip(docs, prompts))]


def ll_requests(docs=DOCS, prompts=PROMPTS) -> list[Instance]:
    return [Instance("loglikelihood", d, (p, " and then it rained all day"), i) for i, (d, p) in enumerate(zip(docs, prompts))]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> str:
    generator = torch.Generator().manual_seed(7)
    entries = [
        SteeringEntry(LOWER, torch.randn(64, generator=generator), 2, "project", 6.0, "all", AppliesTo(LOWER)),
        SteeringEntry(COMMA, torch.randn(64, generator=generator), 1, "add", 5.0, "all", AppliesTo(COMMA)),
    ]
    path = tmp_path_factory.mktemp("vectors") / "fmt.safetensors"
    save_vector_file(path, entries, model="tiny-llama", hidden_size=64, num_layers=4)
    return str(path)


@pytest.fixture(scope="module")
def steered(tiny_model_dir, vectors) -> SteeredHFLM:
    return SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, batch_size=8)


@pytest.fixture(scope="module")
def plain(tiny_model_dir) -> HFLM:
    return HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=8)


def test_strength_zero_and_route_none_equal_the_plain_hf_model(tiny_model_dir, vectors, plain):
    zero = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, mode="add", scale=0.0, batch_size=8)
    none = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, route="none", batch_size=8)
    expected_text = plain.generate_until(gen_requests())
    expected_ll = plain.loglikelihood(ll_requests())
    for model in (zero, none):
        assert model.generate_until(gen_requests()) == expected_text
        assert model.loglikelihood(ll_requests()) == expected_ll


def test_auto_route_steers_only_matching_documents(steered, plain):
    steered_text = steered.generate_until(gen_requests())
    plain_text = plain.generate_until(gen_requests())
    changed = [a != b for a, b in zip(steered_text, plain_text)]
    assert changed[2] is False, "a document no entry applies to must be generated as by hf"
    assert changed[0] and changed[1] and changed[3], (steered_text, plain_text)


def test_mixed_route_batch_equals_separate_runs(steered):
    batched = steered.generate_until(gen_requests())
    alone = [steered.generate_until([request])[0] for request in gen_requests()]
    assert batched == alone


def test_route_all_applies_every_entry_to_every_document(tiny_model_dir, vectors, steered):
    everything = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, route="all", batch_size=8)
    # document 3 has both instructions, so route=auto already gives it every entry
    assert everything.generate_until(gen_requests())[3] == steered.generate_until(gen_requests())[3]
    assert everything.generate_until(gen_requests())[2] != steered.generate_until(gen_requests())[2]


def test_loglikelihood_is_steered_per_document_and_batch_equals_single(steered, plain):
    steered_ll = steered.loglikelihood(ll_requests())
    plain_ll = plain.loglikelihood(ll_requests())
    assert steered_ll[2] == plain_ll[2]
    assert steered_ll[0] != plain_ll[0] and steered_ll[1] != plain_ll[1]
    alone = [steered.loglikelihood([request])[0] for request in ll_requests()]
    assert [round(a[0], 4) for a in alone] == [round(b[0], 4) for b in steered_ll]


def test_positions_generated_in_loglikelihood_steers_only_continuation_tokens(tiny_model_dir, vectors, plain):
    generated = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, positions="generated", batch_size=8)
    one_token = [Instance("loglikelihood", doc(COMMA), ("Describe a cat", " and"), 0)]
    many_tokens = ll_requests()[1:2]
    # a one-token continuation is predicted from the (unsteered) context alone
    assert generated.loglikelihood(one_token) == plain.loglikelihood(one_token)
    assert generated.loglikelihood(many_tokens) != plain.loglikelihood(many_tokens)


def test_loglikelihood_rolling_is_steered(tiny_model_dir, vectors, plain):
    everything = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, route="all", batch_size=4)
    requests = [Instance("loglikelihood_rolling", doc(), ("The quick brown fox jumps over the lazy dog. " * 3,), 0)]
    assert everything.loglikelihood_rolling(requests) != plain.loglikelihood_rolling(requests)


def test_strength_rule_and_kwargs_filter_choose_per_document_strength(tiny_model_dir, tmp_path, plain):
    from lm_eval_steer.runtime.vectorfile import StrengthRule

    generator = torch.Generator().manual_seed(3)
    rule = StrengthRule("num_sentences", ((1.0, 0.0), (5.0, 8.0)))
    entries = [
        SteeringEntry("len", torch.randn(64, generator=generator), 1, "add", 8.0, "all", AppliesTo("length_constraints:number_sentences", {}, rule)),
        SteeringEntry("kw", torch.randn(64, generator=generator), 2, "add", 8.0, "all", AppliesTo("keywords:existence", {"keywords": ["dragon"]})),
    ]
    path = tmp_path / "len.safetensors"
    save_vector_file(path, entries, model="tiny-llama", hidden_size=64, num_layers=4)
    model = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(path), batch_size=4)
    docs = [
        doc("length_constraints:number_sentences", kwargs=[{"num_sentences": 1, "relation": "less than"}]),  # strength 0
        doc("length_constraints:number_sentences", kwargs=[{"num_sentences": 5, "relation": "less than"}]),
        doc("keywords:existence", kwargs=[{"keywords": ["Dragon", "knight"]}]),  # filter matches (case, subset)
        doc("keywords:existence", kwargs=[{"keywords": ["knight"]}]),  # no match
    ]
    prompts = ["Describe a cat"] * 4
    got = model.generate_until(gen_requests(docs, prompts))
    base = plain.generate_until(gen_requests(docs, prompts))
    assert [g != b for g, b in zip(got, base)] == [False, True, True, False]


def test_use_cache_never_mixes_steered_and_unsteered_answers(steered, plain, tmp_path):
    database = str(tmp_path / "cache.db")
    unsteered_answers = CachingLM(plain, database).generate_until(gen_requests())
    steered_answers = CachingLM(steered, database).generate_until(gen_requests())
    assert steered_answers == steered.generate_until(gen_requests())
    assert steered_answers != unsteered_answers
    # and a second steered run is served from the cache (the model is never called)
    cached = CachingLM(steered, database)
    original = steered.generate_until
    steered.generate_until = lambda *args, **kwargs: pytest.fail("cache miss")  # type: ignore[method-assign]
    try:
        assert cached.generate_until(gen_requests()) == steered_answers
    finally:
        steered.generate_until = original  # type: ignore[method-assign]


def test_results_record_files_hashes_entries_and_overrides(tiny_model_dir, vectors):
    model = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, layer=3, scale=0.5, batch_size=2)
    info = model.get_model_info()["steering"]
    assert info["route"] == "auto"
    assert info["overrides"] == {"layer": 3, "scale": 0.5}
    (record,) = info["vector_files"]
    assert record["path"] == vectors and len(record["sha256"]) == 64
    assert [e["name"] for e in record["entries"]] == [LOWER, COMMA]


def test_steered_generation_still_stops_at_end_of_turn(tiny_model_dir, tmp_path, smol_tokenizer):
    # An add vector along the (tied) embedding of <|im_end|> at the last layer makes the model emit
    # end-of-turn at once; generation must then stop instead of running to max_gen_toks.
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings().weight
    eos = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = tmp_path / "eos.safetensors"
    save_vector_file(path, [SteeringEntry("eos", weights[eos].detach() * 1000, 3, "add", 1.0)], model="tiny-llama", hidden_size=64, num_layers=4)
    model = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(path), batch_size=2, skip_first_token=False)
    request = Instance("generate_until", doc(), ("Describe a cat", {"until": ["never"], "max_gen_toks": 30, "do_sample": False}), 0)
    calls = []
    original = model.model.forward
    model.model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    assert model.generate_until([request]) == [""]
    assert len(calls) == 1, "generation went on after end-of-turn"


def test_bad_model_args_and_mismatched_files_fail_clearly(tiny_model_dir, vectors, tmp_path):
    with pytest.raises(ValueError, match="route='sometimes' is not one of auto, all, none"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, route="sometimes")
    with pytest.raises(ValueError, match="layer=9 is out of range for a 4-layer model"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=vectors, layer=9)
    other = tmp_path / "wide.safetensors"
    save_vector_file(other, [SteeringEntry("a", torch.ones(32), 1)], model="x", hidden_size=32, num_layers=4)
    with pytest.raises(VectorFileError, match="built for hidden_size 32, but the model has hidden_size 64"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=f"{vectors}+{other}")


def test_vectors_from_another_model_name_warn_but_load(tiny_model_dir, tmp_path):
    path = tmp_path / "other.safetensors"
    save_vector_file(path, [SteeringEntry("a", torch.ones(64), 1)], model="Org/other-model", hidden_size=64, num_layers=4)
    with pytest.warns(UserWarning, match="built on 'Org/other-model'"):
        model = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(path))
    assert model.vector_files[0].model == "Org/other-model"


def test_same_prompt_routed_two_ways_in_one_call(steered, plain):
    # One prompt, two documents: one needs a vector, one does not (e.g. a task run with and without it).
    requests = gen_requests([doc(LOWER), doc("detectable_format:title")], ["Describe a cat", "Describe a cat"])
    steered_text, unsteered_text = steered.generate_until(requests)
    assert steered_text == steered.generate_until(requests[:1])[0]
    assert unsteered_text == plain.generate_until(requests[1:])[0]
    assert steered_text != unsteered_text


def count_generate_batches(monkeypatch) -> list[int]:
    """Records the size of every batch the steered model generates."""
    sizes: list[int] = []
    original = SteeredHFLM._model_generate
    monkeypatch.setattr(SteeredHFLM, "_model_generate", lambda self, context, *args, **kwargs: sizes.append(context.shape[0]) or original(self, context, *args, **kwargs))
    return sizes


def count_passes(monkeypatch) -> list[int]:
    """Records the size of every pass of the harness's generate_until."""
    sizes: list[int] = []
    original = SteeredHFLM._generate_with
    monkeypatch.setattr(SteeredHFLM, "_generate_with", lambda self, subset, *args: sizes.append(len(subset)) or original(self, subset, *args))
    return sizes


def test_a_prompt_routed_several_ways_rides_in_full_batches(steered, plain, monkeypatch):
    # IFEval's keyword documents: documents share a question, each needs its own word's vector.
    # "Describe a cat" is routed four ways (lowercase, comma, both, none), "Why?" three ways.
    title = doc("detectable_format:title")
    docs = [doc(LOWER), doc(COMMA), title, doc(LOWER), doc(COMMA), doc(LOWER, COMMA), doc(COMMA), doc(LOWER, COMMA), doc(LOWER), title, doc(COMMA)]
    cat, why = "Describe a cat", "Why?"
    prompts = [cat, cat, cat, "Hi", why, why, "Hi", cat, why, why, cat]
    requests = gen_requests(docs, prompts)
    passes, batches = count_passes(monkeypatch), count_generate_batches(monkeypatch)
    together = steered.generate_until(requests)
    assert passes == [len(requests)]
    assert batches == [8, len(requests) - 8]  # ceil(11 / 8) batches, the first full: no tail passes
    passes.clear()
    alone = [steered.generate_until([request])[0] for request in requests]
    assert together == alone
    assert [together[2], together[9]] == plain.generate_until([requests[2], requests[9]])  # routed to nothing
    assert len({together[i] for i in (0, 1, 2, 7)}) == 4, "the four routes of one prompt must answer differently for this test to mean anything"


def test_a_prompt_asked_under_two_gen_kwargs_gets_a_pass_per_group(steered, monkeypatch):
    # The harness batches gen_kwargs groups apart, in an order not relied on: a pass per group.
    short = {**GEN, "max_gen_toks": 6}
    requests = [
        Instance("generate_until", doc(LOWER), ("Describe a cat", dict(GEN)), 0),
        Instance("generate_until", doc(COMMA), ("Describe a cat", dict(short)), 1),
        Instance("generate_until", doc(COMMA), ("Hi", dict(short)), 2),
        Instance("generate_until", doc(COMMA), ("Describe a cat", dict(GEN)), 3),
    ]
    passes = count_passes(monkeypatch)
    together = steered.generate_until(requests)
    assert passes == [3, 1]
    passes.clear()
    assert together == [steered.generate_until([request])[0] for request in requests]


def test_stop_after_entry_stops_steering_once_its_string_is_generated(tiny_model_dir, tmp_path):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))

    def answers(name: str, model_args: dict | None = None, **changes) -> list[str]:
        entry = SteeringEntry("kw", vector, 1, "add", 8.0, changes.pop("positions", "all"), AppliesTo(COMMA), **changes)
        save_vector_file(tmp_path / name, [entry], model="tiny-llama", hidden_size=64, num_layers=4)
        model = SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(tmp_path / name), batch_size=8, **(model_args or {}))
        return model.generate_until(gen_requests())

    always, prompt_only = answers("always.safetensors"), answers("prompt.safetensors", positions="prompt")
    assert always[1] != prompt_only[1], "the vector must change the answer for this test to mean anything"
    assert answers("never.safetensors", stop_after=("never written",)) == always
    # the answer's first character is written by its first token: no generated position is steered
    first = (always[1].strip()[0],)
    assert answers("first.safetensors", stop_after=first)[1] == prompt_only[1]
    # stop_rules=off (model argument) steers to the end regardless
    assert answers("first.safetensors", {"stop_rules": "off"}, stop_after=first) == always
