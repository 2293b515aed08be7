"""What the slow tests prove on every real model (SmolLM2, Qwen), written once so each proves the same.

Each model's test module loads its model once and passes it (a ``SteeredHFLM``) to these helpers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_steer.runtime.hooks import steering
from lm_eval_steer.runtime.model import SteeredHFLM
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

LOWER = "change_case:english_lowercase"


def lowercase_vectors(directory: Path, *, model: str, hidden_size: int, num_layers: int, layer: int) -> str:
    """A vector file with one random ``project`` entry (strength 150) routed to lowercase documents."""
    generator = torch.Generator().manual_seed(0)
    path = directory / "lower.safetensors"
    entry = SteeringEntry(LOWER, torch.randn(hidden_size, generator=generator), layer, "project", 150.0, "all", AppliesTo(LOWER))
    save_vector_file(path, [entry], model=model, hidden_size=hidden_size, num_layers=num_layers)
    return str(path)


def chat(model: HFLM, text: str) -> str:
    return model.apply_chat_template([{"role": "user", "content": text}])


def routed_requests(model: HFLM, max_gen_toks: int) -> list[Instance]:
    """One prompt for two documents in one batch: a lowercase one (routed to the vector) and a
    no-comma one (no vector)."""
    generation = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}
    docs = [{"instruction_id_list": [LOWER], "kwargs": [{}]}, {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    prompt = chat(model, "Write a short note to a friend.")
    return [Instance("generate_until", doc, (prompt, dict(generation)), i) for i, doc in enumerate(docs)]


def generations_with_and_without_kv_cache(model: SteeredHFLM) -> list[torch.Tensor]:
    """Greedy ids for two prompts, the first steered by the model's first entry, with and without the KV cache."""
    prompts = [chat(model, "Name two rivers."), chat(model, "Write one sentence about the moon in summer.")]
    encoded = model.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    entry = model.vector_files[0].entries[0]
    outputs = []
    for use_cache in (True, False):
        with steering(model.model, [[entry], []]):
            outputs.append(model.model.generate(**encoded, max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=model.tokenizer.pad_token_id))
    return outputs
