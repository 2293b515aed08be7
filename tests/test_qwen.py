"""Slow checks on Qwen2.5-Coder-0.5B-Instruct (GGUF, CPU): ``steered-hf`` keeps on a second model
family the guarantees ``test_smollm2.py`` proves on SmolLM2, and equals ``hf`` where it should.

Skipped unless ``lm-eval-steer models fetch qwen2.5-coder-0.5b-instruct`` put the verified file in
the cache (CI must not download 491 MB). The model loads once for the module (about half a minute
and 4 GB); the ``hf`` baseline wraps the same loaded weights, so any difference is steering's.
"""

from __future__ import annotations


import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from real_models import chat, generations_with_and_without_kv_cache, lowercase_vectors, routed_requests

from lm_eval_steer.core import paths
from lm_eval_steer.tools import models
from lm_eval_steer.runtime.model import SteeredHFLM

pytestmark = [pytest.mark.slow, pytest.mark.qwen]
QWEN = models.MODELS[models.QWEN_CODER]
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> str:
    return lowercase_vectors(tmp_path_factory.mktemp("vectors"), model="Qwen/Qwen2.5-Coder-0.5B-Instruct", hidden_size=896, num_layers=24, layer=12)


@pytest.fixture(scope="module")
def qwen(vectors) -> SteeredHFLM:
    folder = QWEN.present(paths.models_cache_dir())
    if folder is None:
        pytest.skip(f"{QWEN.name} is not in {paths.models_cache_dir()} (lm-eval-steer models fetch {QWEN.name})")
    return SteeredHFLM(pretrained=str(folder), gguf_file=QWEN.gguf, vectors=vectors, batch_size=4)


@pytest.fixture(scope="module")
def plain(qwen) -> HFLM:
    return HFLM(pretrained=qwen.model, tokenizer=qwen.tokenizer, device="cpu", batch_size=4)


def test_the_chat_template_adds_qwens_default_system_prompt(qwen):
    # IFEval prompts carry no system turn: Qwen's template supplies one, so results include its effect.
    assert chat(qwen, "Hi") == f"{QWEN_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_scale_zero_generates_exactly_what_hf_generates(qwen, plain, vectors):
    zero = SteeredHFLM(pretrained=qwen.model, tokenizer=qwen.tokenizer, vectors=vectors, mode="add", scale=0.0, batch_size=4)
    assert zero.generate_until(routed_requests(zero, max_gen_toks=12)) == plain.generate_until(routed_requests(plain, max_gen_toks=12))


def test_unrouted_document_is_byte_identical_to_hf_and_routed_one_is_steered(qwen, plain):
    steered = qwen.generate_until(routed_requests(qwen, max_gen_toks=12))
    unsteered = plain.generate_until(routed_requests(plain, max_gen_toks=12))
    assert steered[1] == unsteered[1]
    assert steered[0] != unsteered[0]


def test_steered_greedy_generation_is_the_same_with_and_without_kv_cache(qwen):
    with_cache, without_cache = generations_with_and_without_kv_cache(qwen)
    assert torch.equal(with_cache, without_cache)


def test_the_recommended_file_steers_only_the_instructions_it_has_vectors_for(qwen, plain):
    # The packaged file (found by name) has learned (add-mode) entries for english_lowercase, title and
    # constrained_response, difference-of-means (project-mode) ones for end_checker, and none for
    # response_language.
    shipped = SteeredHFLM(pretrained=qwen.model, tokenizer=qwen.tokenizer, vectors="qwen2.5-coder-0.5b-instruct", batch_size=4)
    prompt = chat(shipped, "Write a short note to a friend.")
    generation = {"until": [], "max_gen_toks": 12, "do_sample": False}
    docs = [{"instruction_id_list": [ids], "kwargs": [{}]} for ids in ("change_case:english_lowercase", "detectable_format:title", "startend:end_checker", "detectable_format:constrained_response", "language:response_language")]

    def requests() -> list[Instance]:
        return [Instance("generate_until", doc, (prompt, dict(generation)), i) for i, doc in enumerate(docs)]

    steered, unsteered = shipped.generate_until(requests()), plain.generate_until(requests())
    assert [s != u for s, u in zip(steered, unsteered)] == [True, True, True, True, False]
