"""GGUF control vectors: export refuses what llama.cpp would apply differently unless the user chooses
explicitly; import is at least as strict as llama.cpp; bad files give one line, never a traceback."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from lm_eval_steer.cli import main
from lm_eval_steer.tools.gguf import export_gguf, import_gguf
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, StrengthRule, VectorFileError, load_vector_file, save_vector_file

RULE = AppliesTo("length_constraints:number_sentences", {}, StrengthRule("num_relation", ((1.0, 4.0), (5.0, 1.0))))


def vector_file(tmp_path, *entries: SteeringEntry):
    path = tmp_path / "v.safetensors"
    save_vector_file(path, entries, model="tiny", hidden_size=8, num_layers=4)
    return path


def write_gguf(path, tensors: dict[str, np.ndarray], architecture: str = "controlvector"):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string(f"{architecture}.model_hint", "tiny")
    writer.add_int32(f"{architecture}.layer_count", len(tensors))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_routed_entries_are_summed_only_with_sum(tmp_path):
    source = vector_file(
        tmp_path,
        SteeringEntry("kw:a", torch.ones(8), 2, "add", 1.0, "all", AppliesTo("keywords:forbidden_words", {"forbidden_words": ["a"]})),
        SteeringEntry("kw:b", torch.ones(8), 2, "add", 2.0, "all", AppliesTo("keywords:forbidden_words", {"forbidden_words": ["b"]})),
    )
    with pytest.raises(VectorFileError, match="2 entries share a layer.*--entry NAME.*--sum"):
        export_gguf(source, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert np.allclose(export_gguf(source, tmp_path / "one.gguf", ["kw:b"])[2], 2.0)
    assert np.allclose(export_gguf(source, tmp_path / "sum.gguf", sum_entries=True)[2], 3.0)


def test_entries_routed_differently_on_different_layers_need_sum_too(tmp_path):
    source = vector_file(
        tmp_path,
        SteeringEntry("x", torch.ones(8), 1, "add", 1.0, "all", AppliesTo("change_case:english_lowercase")),
        SteeringEntry("y", torch.ones(8), 2, "add", 1.0, "all", AppliesTo("punctuation:no_comma")),
    )
    with pytest.raises(VectorFileError, match="routed to different documents"):
        export_gguf(source, tmp_path / "x.gguf")
    assert sorted(export_gguf(source, tmp_path / "x.gguf", sum_entries=True)) == [1, 2]


def test_strength_rule_needs_an_explicit_strength(tmp_path, capsys):
    source = vector_file(tmp_path, SteeringEntry("len", torch.ones(8), 2, "add", 3.0, "all", RULE))
    with pytest.raises(VectorFileError, match="strength_rule.*--strength"):
        export_gguf(source, tmp_path / "x.gguf")
    assert np.allclose(export_gguf(source, tmp_path / "x.gguf", strength=-1.5)[2], -1.5)
    assert main(["gguf", "export", str(source), str(tmp_path / "y.gguf")]) == 2
    assert main(["gguf", "export", str(source), str(tmp_path / "y.gguf"), "--strength", "1e39"]) == 2
    assert main(["gguf", "export", str(source), str(tmp_path / "y.gguf"), "--strength", "2"]) == 0


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_positions_other_than_all_are_refused(tmp_path, positions):
    source = vector_file(tmp_path, SteeringEntry("g", torch.ones(8), 2, "add", 1.0, positions))
    with pytest.raises(VectorFileError, match=f"positions={positions} cannot be exported"):
        export_gguf(source, tmp_path / "x.gguf")


def test_unknown_entry_name_is_one_clean_line(tmp_path, capsys):
    source = vector_file(tmp_path, SteeringEntry("a", torch.ones(8), 2, "add", 1.0))
    assert main(["gguf", "export", str(source), str(tmp_path / "x.gguf"), "--entry", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lm-eval-steer gguf: error: {source}: no entry named 'nope' (it has 1: ['a'])"


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"direction.0": np.ones(8, np.float32)}, "layer >= 1"),
        ({"direction.1": np.ones(8, np.float32), "bias.1": np.ones(8, np.float32)}, "unexpected tensor 'bias.1'"),
        ({"direction.1": np.ones((2, 4), np.float32)}, "expected a 1-D F32 vector"),
        ({"direction.1": np.ones(8, np.float16)}, "expected a 1-D F32 vector"),
        ({"direction.1": np.ones(8, np.float32), "direction.2": np.ones(6, np.float32)}, "different lengths"),
        ({"direction.1": np.full(8, np.inf, np.float32)}, "NaN or infinite"),
        ({"direction.9": np.ones(8, np.float32)}, "out of range"),
    ],
    ids=["direction.0", "other tensor", "2-D", "float16", "two lengths", "infinite", "layer too high"],
)
def test_import_refuses_what_llama_cpp_refuses(tmp_path, capsys, tensors, expected):
    source = write_gguf(tmp_path / "bad.gguf", tensors)
    target = tmp_path / "out.safetensors"
    with pytest.raises(VectorFileError, match=expected) as error:
        import_gguf(source, target, num_layers=4)
    assert ".tmp" not in str(error.value) and not target.exists()
    assert main(["gguf", "import", str(source), str(target), "--num-layers", "4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_import_checks_the_hidden_size_and_layers_of_the_model(tmp_path):
    source = write_gguf(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)})
    with pytest.raises(VectorFileError, match="v.gguf: built for hidden_size 8, but --hidden-size has hidden_size 16"):
        import_gguf(source, tmp_path / "a.safetensors", num_layers=4, hidden_size=16)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 4}))
    with pytest.raises(VectorFileError, match="built for hidden_size 8, but .*model has hidden_size 16"):
        import_gguf(source, tmp_path / "a.safetensors", model=str(model))
    (model / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 4}))
    imported = import_gguf(source, tmp_path / "a.safetensors", model=str(model))
    assert (imported.hidden_size, imported.num_layers) == (8, 4)
    with pytest.raises(VectorFileError, match="built for 6 layers, but .*model has 4 layers"):
        import_gguf(source, tmp_path / "a.safetensors", num_layers=6, model=str(model))


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_gguf_is_a_clear_error(tmp_path, capsys, keep):
    whole = write_gguf(tmp_path / "whole.gguf", {"direction.1": np.ones(64, np.float32), "direction.2": np.ones(64, np.float32)})
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert main(["gguf", "import", str(cut), str(tmp_path / "out.safetensors"), "--num-layers", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.gguf" in err[0]


def test_save_vector_file_accepts_entries_that_share_one_tensor(tmp_path):
    shared = torch.arange(8, dtype=torch.float32)
    entries = [SteeringEntry(f"kw:{word}", shared, 2, "add", -1.0, "all", AppliesTo("keywords:forbidden_words", {"forbidden_words": [word]})) for word in "ab"]
    loaded = save_vector_file(tmp_path / "shared.safetensors", entries, model="tiny", hidden_size=8, num_layers=4)
    assert [entry.name for entry in loaded.entries] == ["kw:a", "kw:b"]
    assert torch.equal(load_vector_file(tmp_path / "shared.safetensors").entry("kw:b").vector, shared)
