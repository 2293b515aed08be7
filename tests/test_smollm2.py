"""Slow checks on the real packaged SmolLM2-135M-Instruct (GGUF, CPU): ``pytest -m "not slow"`` skips them."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOL_GGUF, smollm2_dir
from lm_eval.api.instance import Instance

from lm_eval_steer.runtime.hooks import find_decoder_layers, steering
from lm_eval_steer.runtime.model import SteeredHFLM
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

pytestmark = pytest.mark.slow
LOWER = "change_case:english_lowercase"


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> SteeredHFLM:
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("vectors") / "smol.safetensors"
    entry = SteeringEntry(LOWER, torch.randn(576, generator=generator), 18, "project", 150.0, "all", AppliesTo(LOWER))
    save_vector_file(path, [entry], model="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=576, num_layers=30)
    return SteeredHFLM(pretrained=str(smollm2_dir()), gguf_file=SMOL_GGUF, vectors=str(path), batch_size=4)


def chat(model: SteeredHFLM, text: str) -> str:
    return model.apply_chat_template([{"role": "user", "content": text}])


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
    encoded = smol.tokenizer([chat(smol, "Name two rivers."), chat(smol, "Write one sentence about the moon in summer.")], return_tensors="pt", padding=True, add_special_tokens=False)
    entry = smol.vector_files[0].entries[0]
    outputs = []
    for use_cache in (True, False):
        with steering(smol.model, [[entry], []]):
            outputs.append(smol.model.generate(**encoded, max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=smol.tokenizer.pad_token_id))
    assert torch.equal(outputs[0], outputs[1])


def test_routed_document_is_steered_and_other_document_is_not(smol):
    generation = {"until": [], "max_gen_toks": 16, "do_sample": False}
    docs = [{"instruction_id_list": [LOWER], "kwargs": [{}]}, {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    prompt = chat(smol, "Write a short note to a friend.")
    requests = [Instance("generate_until", doc, (prompt, dict(generation)), i) for i, doc in enumerate(docs)]
    steered = smol.generate_until(requests)
    smol.route = "none"
    try:
        plain = smol.generate_until(requests)
    finally:
        smol.route = "auto"
    assert steered[1] == plain[1]
    assert steered[0] != plain[0]
