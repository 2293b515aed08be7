"""vector_builder.settings: the nested record a build is asked to do and records, its checks, and the
recorded layout as ``lm-eval-steer vectors`` reads it (this layout and builder version 1's)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from lm_eval_steer.runtime.vectorfile import SteeringEntry, load_vector_file, save_vector_file
from lm_eval_steer.tools.vectors import describe, entry_rows
from vector_builder import BuildSettings
from vector_builder.methods.learned import LearnedSettings
from vector_builder.methods.learned.targets import TargetSettings
from vector_builder.search import SearchSettings

QUERIES = [f"Question number {i}: what is {i} plus {i + 1}?" for i in range(12)]


def test_build_settings_are_the_recorded_settings():
    settings = BuildSettings(model="tiny", instructions=["length"], search=SearchSettings(multipliers=[1, 2], validation_prompts="without and with instruction"))
    recorded = asdict(settings)
    assert list(recorded) == [
        "builder_version", "model", "search_model", "instructions", "keywords", "n_train", "n_val", "method", "data_sha256",
        "generation", "search", "learned", "targets",
    ]  # fmt: skip
    assert {part: list(recorded[part]) for part in ("generation", "search", "learned", "targets")} == {
        "generation": ["batch_size", "seed", "max_new_tokens", "skip_first_token"],
        "search": ["layers", "multipliers", "token_multipliers", "strength_base", "validation_prompts", "keyword_sample", "max_repetition",
                   "allowed_degenerate", "min_length_ratio", "degeneracy_guard", "stop_after_keyword", "stop_after_first_token", "stop_after_tokens",
                   "start_after_tokens", "objective", "stop_once_followed"],
        "learned": ["layers", "multipliers", "steps", "lr", "batch_size", "l2", "fluency", "eval_every", "patience", "heldout_fraction", "joint"],
        "targets": ["samples", "max_tokens", "temperature", "max_repetition"],
    }  # fmt: skip
    assert recorded["builder_version"] == 2
    assert settings.search.multipliers == (1.0, 2.0) and settings.search.with_instruction_too
    resolved = settings.resolved(num_layers=10, queries=QUERIES)
    assert resolved.instructions == ("length_constraints:number_sentences", "length_constraints:number_words")
    assert resolved.search.layers == (2, 4, 6, 8) and resolved.search_model == "tiny" and len(resolved.data_sha256) == 64
    assert replace(resolved.search, max_repetition=0.25).degeneracy_guard.count("> 0.25;") == 1  # derived fields follow
    with pytest.raises(ValueError, match="out of range"):
        replace(settings, search=replace(settings.search, layers=(10,))).resolved(num_layers=10, queries=QUERIES)
    with pytest.raises(ValueError, match="strength_base"):
        SearchSettings(strength_base="other")
    assert resolved.learned.layers == (2,)  # about n_layers / 5
    assert resolved.method_names == ("diffmean", "learned")
    with pytest.raises(ValueError, match="--learned-layers"):
        replace(settings, learned=LearnedSettings(layers=(12,))).resolved(num_layers=10, queries=QUERIES)
    with pytest.raises(ValueError):
        BuildSettings(model="tiny", instructions=["length"], method="magic")
    for bad in (dict(lr=float("nan")), dict(lr=0.0), dict(steps=0), dict(multipliers=[float("inf")])):
        with pytest.raises(ValueError, match="--learned-"):
            LearnedSettings(**bad)
    for bad in (dict(max_tokens=0), dict(samples=-1)):
        with pytest.raises(ValueError, match="--target-"):
            TargetSettings(**bad)


def test_vectors_show_reads_the_method_and_version_of_this_layout_and_version_1s(tmp_path):
    nested = asdict(BuildSettings(model="tiny", instructions=["format"], method="learned"))
    flat = {"builder_version": 1, "model": "tiny", "method": "diffmean", "learned_layers": [], "target_samples": 4}
    entry = SteeringEntry("lower", torch.ones(8), 1, "project", 2.5)
    for builder, version, method in ((nested, 2, "learned"), (flat, 1, "diffmean")):
        path = tmp_path / f"v{version}.safetensors"
        save_vector_file(path, [entry], model="tiny", hidden_size=8, num_layers=4, extra_metadata={"builder": json.dumps(builder)})
        loaded = load_vector_file(path)
        assert f"built by lm-eval-steer build (builder version {version})" in describe(loaded)
        assert entry_rows(loaded)[0][7] == method
