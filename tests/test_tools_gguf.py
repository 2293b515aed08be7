"""GGUF control-vector export/import (llama.cpp's and repeng's format)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lm_eval_steer.cli import main
from lm_eval_steer.tools.gguf import export_gguf, import_gguf
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, VectorFileError, load_vector_file, save_vector_file


@pytest.fixture
def vector_file(tmp_path):
    path = tmp_path / "v.safetensors"
    entries = [
        SteeringEntry("a", torch.arange(8, dtype=torch.float32), 2, "add", 2.0),
        SteeringEntry("b", torch.ones(8), 2, "add", -1.0, "all", AppliesTo("keywords:existence")),
        SteeringEntry("c", torch.ones(8), 3, "add", 0.5),
        SteeringEntry("p", torch.ones(8), 3, "project", 4.0),
    ]
    save_vector_file(path, entries, model="tiny-llama", hidden_size=8, num_layers=4)
    return path


def test_export_writes_llama_cpp_layout_with_strength_folded_in(vector_file, tmp_path):
    target = tmp_path / "v.gguf"
    export_gguf(vector_file, target, ["a", "b", "c"], sum_entries=True)
    reader = gguf.GGUFReader(str(target))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "tiny-llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.2", "direction.3"]
    np.testing.assert_allclose(tensors["direction.2"], 2.0 * np.arange(8) - 1.0)
    np.testing.assert_allclose(tensors["direction.3"], np.full(8, 0.5))


def test_round_trip_through_gguf_steers_the_same(vector_file, tmp_path):
    export_gguf(vector_file, tmp_path / "v.gguf", ["a", "c"])
    back = import_gguf(tmp_path / "v.gguf", tmp_path / "back.safetensors", num_layers=4, instruction_id="change_case:english_lowercase")
    assert [(e.name, e.layer, e.mode, e.strength) for e in back.entries] == [("direction.2", 2, "add", 1.0), ("direction.3", 3, "add", 1.0)]
    assert torch.allclose(back.entry("direction.2").vector, 2.0 * torch.arange(8, dtype=torch.float32))
    assert back.entries[0].applies_to.instruction_id == "change_case:english_lowercase"
    assert load_vector_file(tmp_path / "back.safetensors").model == "tiny-llama"


def test_an_entry_name_exports_its_jointly_trained_set_whole(tmp_path):
    lower = AppliesTo("change_case:english_lowercase")
    entries = [
        SteeringEntry("lower", torch.ones(8), 1, "add", 2.0, "all", lower),
        SteeringEntry("lower@L3", torch.arange(8, dtype=torch.float32), 3, "add", 0.5, "all", lower),
        SteeringEntry("title", torch.ones(8), 2, "add", 1.0, "all", AppliesTo("detectable_format:title")),
    ]
    save_vector_file(tmp_path / "set.safetensors", entries, model="tiny-llama", hidden_size=8, num_layers=4)
    export_gguf(tmp_path / "set.safetensors", tmp_path / "set.gguf", ["lower"])
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "set.gguf")).tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]
    np.testing.assert_allclose(tensors["direction.3"], 0.5 * np.arange(8))
    export_gguf(tmp_path / "set.safetensors", tmp_path / "one.gguf", ["lower@L3"])  # a member by its own name: that layer only
    assert [t.name for t in gguf.GGUFReader(str(tmp_path / "one.gguf")).tensors] == ["direction.3"]

def test_project_mode_and_bad_gguf_are_refused(vector_file, tmp_path):
    with pytest.raises(VectorFileError, match="'project' mode cannot be exported"):
        export_gguf(vector_file, tmp_path / "x.gguf")
    stopping = tmp_path / "stop.safetensors"
    save_vector_file(stopping, [SteeringEntry("k", torch.ones(8), 2, "add", 1.0, stop_after=("mom",))], model="tiny-llama", hidden_size=8, num_layers=4)
    with pytest.raises(VectorFileError, match="entry 'k': stop_after cannot be exported: llama.cpp steers to the end"):
        export_gguf(stopping, tmp_path / "x.gguf")
    counted = tmp_path / "counted.safetensors"
    save_vector_file(counted, [SteeringEntry("n", torch.ones(8), 2, "add", 1.0, stop_after_tokens=32)], model="tiny-llama", hidden_size=8, num_layers=4)
    with pytest.raises(VectorFileError, match="entry 'n': stop_after_tokens cannot be exported: llama.cpp steers to the end"):
        export_gguf(counted, tmp_path / "x.gguf")
    delayed = tmp_path / "delayed.safetensors"
    save_vector_file(delayed, [SteeringEntry("k", torch.ones(8), 2, "add", 1.0, start_after_tokens=4)], model="tiny-llama", hidden_size=8, num_layers=4)
    with pytest.raises(VectorFileError, match="entry 'k': start_after_tokens cannot be exported: llama.cpp steers from the first prompt token"):
        export_gguf(delayed, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(VectorFileError, match="junk.gguf: not a readable GGUF file"):
        import_gguf(junk, tmp_path / "y.safetensors", num_layers=4)


def test_cli_export_and_import(vector_file, tmp_path, capsys):
    assert main(["gguf", "export", str(vector_file), str(tmp_path / "c.gguf"), "--entries", "c"]) == 0
    assert main(["gguf", "import", str(tmp_path / "c.gguf"), str(tmp_path / "c.safetensors"), "--num-layers", "4"]) == 0
    assert main(["gguf", "export", str(vector_file), str(tmp_path / "p.gguf"), "--entries", "p"]) == 2
    assert "cannot be exported" in capsys.readouterr().err
