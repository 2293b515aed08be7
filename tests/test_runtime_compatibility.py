"""``check_compatible``: the one model/vector-file compatibility check (runtime, builder, merge, gguf)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig

from lm_eval_steer.core.errors import UserError
from lm_eval_steer.runtime.compatibility import ModelMismatchError, ModelShape, check_compatible, same_model_name
from lm_eval_steer.runtime.vectorfile import SteeringEntry, VectorFileError, save_vector_file


@pytest.fixture
def vector_file(tmp_path):
    entry = SteeringEntry("e", torch.ones(8), 1, "add", 1.0, "all", None)
    return save_vector_file(tmp_path / "v.safetensors", [entry], model="org/Tiny-Instruct", hidden_size=8, num_layers=4)


def test_same_shape_passes_silently(vector_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(vector_file, ModelShape("/models/tiny-instruct q4.gguf", 8, 4))
        check_compatible(ModelShape("a", 64, 4), ModelShape("a", 64, 4))


def test_a_shape_mismatch_names_the_file_and_both_shapes(vector_file):
    with pytest.raises(ModelMismatchError, match=r"v.safetensors: built for hidden_size 8, but the model has hidden_size 16$"):
        check_compatible(vector_file, ModelShape("", 16, 4))
    with pytest.raises(ModelMismatchError, match=r"v.safetensors: built for 4 layers, but m has 6 layers$"):
        check_compatible(vector_file, ModelShape("m", 8, 6))
    with pytest.raises(ModelMismatchError, match="vectors built on 'a': built for 4 layers, but b has 6 layers"):
        check_compatible(ModelShape("a", 64, 4), ModelShape("b", 64, 6))


def test_a_mismatch_is_a_one_line_user_error(vector_file):
    with pytest.raises(UserError) as error:
        check_compatible(vector_file, ModelShape("", 16, 4))
    assert isinstance(error.value, (VectorFileError, ValueError)) and "\n" not in str(error.value)


def test_unknown_sizes_are_not_checked(vector_file):
    check_compatible(vector_file, ModelShape("", None, 4))
    check_compatible(vector_file, ModelShape("", 8, None))
    with pytest.raises(ModelMismatchError):
        check_compatible(vector_file, ModelShape("", None, 5))


def test_a_different_name_warns_or_is_refused(vector_file):
    with pytest.warns(UserWarning, match="built on 'org/Tiny-Instruct', applied to 'org/Tiny-Base'"):
        check_compatible(vector_file, ModelShape("org/Tiny-Base", 8, 4))
    with pytest.raises(ModelMismatchError, match="built on 'org/Tiny-Instruct', not on 'org/Tiny-Base'"):
        check_compatible(vector_file, ModelShape("org/Tiny-Base", 8, 4), same_name=True)


@pytest.mark.parametrize(
    ("built_on", "applied_to", "same"),
    [("org/Tiny", "/cache/tiny q4.gguf", True), ("", "anything", True), ("a", "", True), ("instruct", "base", False)],
)
def test_same_model_name(built_on, applied_to, same):
    assert same_model_name(built_on, applied_to) is same


def test_shape_of_configs_objects_dicts_and_multimodal():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    assert ModelShape.of_config(config, "m") == ModelShape("m", 64, 3)
    assert ModelShape.of_config({"text_config": {"hidden_size": 32, "num_hidden_layers": 2}, "hidden_size": 999}) == ModelShape("", 32, 2)
    assert ModelShape.of_config({"hidden_size": True, "num_hidden_layers": 2}) is None
    assert ModelShape.of_config({"hidden_size": "64", "num_hidden_layers": 2}) is None


def test_shape_of_a_model_directory(tmp_path):
    assert ModelShape.of_model_dir(None) is None
    assert ModelShape.of_model_dir(str(tmp_path / "absent")) is None
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 4}))
    assert ModelShape.of_model_dir(str(tmp_path)) == ModelShape(str(tmp_path), 16, 4)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VectorFileError, match="config.json: not a readable config"):
        ModelShape.of_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16}))
    with pytest.raises(VectorFileError, match="config.json: no integer hidden_size/num_hidden_layers"):
        ModelShape.of_model_dir(str(tmp_path))


def test_shape_of_a_loaded_model_counts_its_decoder_layers():
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    assert ModelShape.of_model(LlamaForCausalLM(config), "tiny") == ModelShape("tiny", 64, 3)
