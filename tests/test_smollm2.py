"""Slow checks on the real packaged SmolLM2-135M-Instruct (GGUF, CPU): ``pytest -m "not slow"`` skips them."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT, SMOL_GGUF, smollm2_dir
from lm_eval.api.instance import Instance
from real_models import chat, generations_with_and_without_kv_cache, lowercase_vectors, routed_requests
from test_runtime_model import count_generate_batches

from lm_eval_steer.runtime.hooks import find_decoder_layers
from lm_eval_steer.runtime.model import SteeredHFLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> SteeredHFLM:
    vectors = lowercase_vectors(tmp_path_factory.mktemp("vectors"), model="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=576, num_layers=30, layer=18)
    return SteeredHFLM(pretrained=str(smollm2_dir()), gguf_file=SMOL_GGUF, vectors=vectors, batch_size=4)


def test_first_token_is_an_attention_sink_with_a_huge_norm(smol):
    # The reason skip_first_token defaults to true: rewriting this token's component collapses output.
    ids = smol.tokenizer(chat(smol, "Describe a rainy day."), return_tensors="pt", add_special_tokens=False).input_ids
    seen = []
    handle = find_decoder_layers(smol.model)[15].register_forward_hook(lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            smol.model(ids)
    finally:
        handle.remove()
    norms = seen[0][0].norm(dim=-1)
    assert norms[0] > 50 * norms[1:].median()


def test_steered_greedy_generation_is_the_same_with_and_without_kv_cache(smol):
    with_cache, without_cache = generations_with_and_without_kv_cache(smol)
    assert torch.equal(with_cache, without_cache)


def test_routed_document_is_steered_and_other_document_is_not(smol):
    requests = routed_requests(smol, max_gen_toks=16)
    steered = smol.generate_until(requests)
    smol.route = "none"
    try:
        plain = smol.generate_until(requests)
    finally:
        smol.route = "auto"
    assert steered[1] == plain[1]
    assert steered[0] != plain[0]


@pytest.mark.filterwarnings("ignore:.*built on 'HuggingFaceTB/SmolLM2-135M-Instruct'")  # a model object has no GGUF file name to compare
def test_keyword_documents_sharing_a_question_ride_in_full_batches(smol, monkeypatch):
    # IFEval's no-instruction keyword documents: one question, a different word each (the shipped
    # vectors have a stop_after entry per word), mixed with a format route, an unrouted document and
    # another question. One pass in full batches, and each answer is its request's answer alone.
    shipped = SteeredHFLM(pretrained=smol.model, tokenizer=smol.tokenizer, vectors=str(REPO_ROOT / "vectors" / "smollm2-135m-instruct.safetensors"), batch_size=4)
    question, other = chat(smol, "Write a short note to a friend."), chat(smol, "Describe your favourite place.")
    keyword = [{"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": [word]}]} for word in ("cat", "mom", "meal")]
    no_comma, unrouted = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, {"instruction_id_list": ["keywords:forbidden_words"], "kwargs": [{}]}
    asked = [(question, keyword[0]), (other, keyword[0]), (question, keyword[1]), (question, unrouted), (question, no_comma), (other, keyword[2]), (question, keyword[2])]
    generation = {"until": [], "max_gen_toks": 24, "do_sample": False}
    requests = [Instance("generate_until", doc, (prompt, dict(generation)), i) for i, (prompt, doc) in enumerate(asked)]
    batches = count_generate_batches(monkeypatch)
    together = shipped.generate_until(requests, disable_tqdm=True)
    assert batches == [4, 3]
    assert together == [shipped.generate_until([request], disable_tqdm=True)[0] for request in requests]
    assert len({together[i] for i in (0, 2, 3, 4, 6)}) == 5, "the five routes of one question must answer differently for this test to mean anything"
