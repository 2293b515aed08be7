"""Slow checks on the real packaged SmolLM2-135M-Instruct (GGUF, CPU): ``pytest -m "not slow"`` skips them."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOL_GGUF, smollm2_dir
from real_models import chat, generations_with_and_without_kv_cache, lowercase_vectors, routed_requests

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
