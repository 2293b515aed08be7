"""Vector file format v1: round trip, atomic writes, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm_eval_steer.runtime.vectorfile import (
    FORMAT_VERSION,
    AppliesTo,
    SteeringEntry,
    StrengthRule,
    VectorFileError,
    load_vector_file,
    save_vector_file,
)

HIDDEN, LAYERS = 8, 4


def good_entry(**changes) -> dict:
    entry = {"name": "fmt", "layer": 2, "mode": "project", "strength": 3.5, "positions": "all", "applies_to": {"instruction_id": "change_case:english_lowercase"}}
    entry.update(changes)
    return entry


def write_raw(path: Path, entry_list: list, tensors: dict | None = None, **metadata_changes) -> Path:
    """Writes a safetensors file by hand, so that tests can build files our writer would refuse."""
    metadata = {"format": FORMAT_VERSION, "model": "tiny", "hidden_size": str(HIDDEN), "num_layers": str(LAYERS), "entries": json.dumps(entry_list)}
    metadata.update(metadata_changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if tensors is None:
        tensors = {e["name"]: torch.ones(HIDDEN) for e in entry_list if isinstance(e, dict) and "name" in e}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_round_trip_keeps_every_field_and_extra_metadata(tmp_path):
    rule = StrengthRule("num_sentences", ((1.0, 8.0), (5.0, 2.0)))
    entries = [
        SteeringEntry("fmt", torch.arange(HIDDEN, dtype=torch.float32), 2, "project", 3.5, "generated", AppliesTo("change_case:english_lowercase")),
        SteeringEntry("len", torch.ones(HIDDEN), 1, "add", -2.0, "all", AppliesTo("length_constraints:number_sentences", {}, rule), stop_after_tokens=48, start_after_tokens=4),
        SteeringEntry("kw", torch.ones(HIDDEN), 3, "add", 4.0, "prompt", AppliesTo("keywords:existence", {"keywords": ["barbarians"]}), ("barbarians",)),
        SteeringEntry("prose", torch.ones(HIDDEN), 3, "add", -1.0, "generated", AppliesTo("keywords:existence", not_with=("punctuation:no_comma", "change_case:english_capital"))),
        SteeringEntry("everyone", torch.ones(HIDDEN), 0, "ablate", 0.0, "all", None),
    ]
    path = tmp_path / "v.safetensors"
    save_vector_file(path, entries, model="tiny", hidden_size=HIDDEN, num_layers=LAYERS, extra_metadata={"builder": "{\"seed\": 1}"})
    loaded = load_vector_file(path)
    assert (loaded.model, loaded.hidden_size, loaded.num_layers) == ("tiny", HIDDEN, LAYERS)
    assert [e.to_json() for e in loaded.entries] == [e.to_json() for e in entries]
    assert torch.equal(loaded.entry("fmt").vector, entries[0].vector)
    assert loaded.extra_metadata == {"builder": "{\"seed\": 1}"}
    assert loaded.sha256 is not None and len(loaded.sha256) == 64
    assert loaded.entry("len").applies_to.strength_rule.strength_for(3.0) == pytest.approx(5.0)
    assert loaded.entry("kw").stop_after == ("barbarians",) and "stop_after" not in loaded.entry("fmt").to_json()
    assert loaded.entry("prose").applies_to.not_with == ("punctuation:no_comma", "change_case:english_capital")
    assert "not_with" not in loaded.entry("fmt").to_json()["applies_to"]  # files without exclusions read and write as before
    assert loaded.entry("len").stop_after_tokens == 48 and "stop_after_tokens" not in loaded.entry("fmt").to_json()
    assert loaded.entry("len").start_after_tokens == 4 and "start_after_tokens" not in loaded.entry("fmt").to_json()
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "written like a plain open() would, not 0600"


def test_strength_rule_interpolates_and_clamps():
    rule = StrengthRule("n", ((1.0, 10.0), (3.0, 4.0), (7.0, 0.0)))
    assert [rule.strength_for(v) for v in (0, 1, 2, 3, 5, 7, 100)] == [10.0, 10.0, 7.0, 4.0, 2.0, 0.0, 0.0]


def test_failed_write_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "v.safetensors"
    save_vector_file(path, [SteeringEntry("a", torch.ones(HIDDEN), 1)], model="m", hidden_size=HIDDEN, num_layers=LAYERS)
    before = path.read_bytes()
    with pytest.raises(VectorFileError, match="layer 9 is out of range"):
        save_vector_file(path, [SteeringEntry("a", torch.ones(HIDDEN), 9)], model="m", hidden_size=HIDDEN, num_layers=LAYERS)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


BAD_FILES = {
    "layer out of range": ([good_entry(layer=4)], None, {}, "entry 'fmt': layer 4 is out of range"),
    "negative layer": ([good_entry(layer=-1)], None, {}, "layer -1 is out of range"),
    "unknown mode": ([good_entry(mode="multiply")], None, {}, "unknown mode 'multiply'"),
    "unknown positions": ([good_entry(positions="last")], None, {}, "unknown positions 'last'"),
    "unknown entry key": ([good_entry(colour="red")], None, {}, "unknown entry key(s) ['colour']"),
    "missing entry key": ([{k: v for k, v in good_entry().items() if k != "strength"}], None, {}, "missing entry key(s) ['strength']"),
    "non-finite strength": ([good_entry(strength=float("inf"))], None, {}, "strength must be a finite number"),
    "wrong shape": ([good_entry()], {"fmt": torch.ones(HIDDEN + 1)}, {}, "shape (9,) does not match hidden_size 8"),
    "2-d tensor": ([good_entry()], {"fmt": torch.ones(2, HIDDEN)}, {}, "shape (2, 8) does not match"),
    "nan": ([good_entry()], {"fmt": torch.tensor([float("nan")] + [1.0] * (HIDDEN - 1))}, {}, "NaN or infinite"),
    "integer dtype": ([good_entry()], {"fmt": torch.ones(HIDDEN, dtype=torch.int32)}, {}, "not a float type"),
    "zero vector in project mode": ([good_entry()], {"fmt": torch.zeros(HIDDEN)}, {}, "zero vector has no direction"),
    "zero vector in ablate mode": ([good_entry(mode="ablate")], {"fmt": torch.zeros(HIDDEN)}, {}, "zero vector has no direction"),
    "duplicate names": ([good_entry(), good_entry()], None, {}, "entry 'fmt': duplicate entry name"),
    "tensor without entry": ([good_entry()], {"fmt": torch.ones(HIDDEN), "stray": torch.ones(HIDDEN)}, {}, "['stray'] are stored but not listed"),
    "entry without tensor": ([good_entry(), good_entry(name="ghost")], {"fmt": torch.ones(HIDDEN)}, {}, "entry 'ghost': listed in metadata but no tensor"),
    "wrong format": ([good_entry()], None, {"format": "repeng/1"}, "metadata 'format' is 'repeng/1'"),
    "missing num_layers": ([good_entry()], None, {"num_layers": None}, "missing metadata key(s) ['num_layers']"),
    "entries not json": ([good_entry()], {"fmt": torch.ones(HIDDEN)}, {"entries": "[{"}, "not valid JSON"),
    "stop_after not a list": ([good_entry(stop_after="mom")], None, {}, "stop_after must be a list of at most 16 strings"),
    "stop_after too long a list": ([good_entry(stop_after=["w"] * 17)], None, {}, "stop_after must be a list of at most 16 strings"),
    "stop_after blank string": ([good_entry(stop_after=["mom", " "])], None, {}, "stop_after items must be non-blank strings"),
    "stop_after number": ([good_entry(stop_after=[3])], None, {}, "stop_after items must be non-blank strings"),
    "stop_after_tokens zero": ([good_entry(stop_after_tokens=0)], None, {}, "entry 'fmt': stop_after_tokens must be at least 1, got 0"),
    "stop_after_tokens negative": ([good_entry(stop_after_tokens=-3)], None, {}, "stop_after_tokens must be at least 1, got -3"),
    "stop_after_tokens float": ([good_entry(stop_after_tokens=2.5)], None, {}, "stop_after_tokens must be an integer"),
    "stop_after_tokens bool": ([good_entry(stop_after_tokens=True)], None, {}, "stop_after_tokens must be an integer"),
    "stop_after_tokens huge": ([good_entry(stop_after_tokens=10**30)], None, {}, "stop_after_tokens must be an integer up to 1048576"),
    "start_after_tokens zero": ([good_entry(start_after_tokens=0)], None, {}, "entry 'fmt': start_after_tokens must be at least 1, got 0"),
    "start_after_tokens float": ([good_entry(start_after_tokens=1.5)], None, {}, "start_after_tokens must be an integer"),
    "start_after_tokens on the prompt": ([good_entry(start_after_tokens=4, positions="prompt")], None, {}, "start_after_tokens needs positions 'all' or 'generated'"),
    "window closed before it opens": ([good_entry(start_after_tokens=8, stop_after_tokens=8)], None, {}, "stop_after_tokens (8) must be larger than start_after_tokens (8)"),
    "bad applies_to": ([good_entry(applies_to={"instruction": "x"})], None, {}, "unknown applies_to key(s) ['instruction']"),
    "bad strength rule": ([good_entry(applies_to={"instruction_id": "x", "strength_rule": {"kwarg": "n", "points": [[3, 1], [1, 2]]}})], None, {}, "strictly increasing"),
    "not_with not a list": ([good_entry(applies_to={"instruction_id": "x", "not_with": "punctuation:no_comma"})], None, {}, "applies_to.not_with must be null or a list of 1 to 64 instruction ids"),
    "not_with empty": ([good_entry(applies_to={"instruction_id": "x", "not_with": []})], None, {}, "applies_to.not_with must be null or a list of 1 to 64"),
    "not_with too long": ([good_entry(applies_to={"instruction_id": "x", "not_with": [f"i{n}" for n in range(65)]})], None, {}, "a list of 1 to 64 instruction ids"),
    "not_with number": ([good_entry(applies_to={"instruction_id": "x", "not_with": [3]})], None, {}, "applies_to.not_with items must be non-empty strings"),
    "not_with empty id": ([good_entry(applies_to={"instruction_id": "x", "not_with": [""]})], None, {}, "applies_to.not_with items must be non-empty strings"),
    "not_with twice": ([good_entry(applies_to={"instruction_id": "x", "not_with": ["y", "y"]})], None, {}, "lists an instruction id twice"),
    "not_with its own instruction": ([good_entry(applies_to={"instruction_id": "x", "not_with": ["y", "x"]})], None, {}, "lists the entry's own instruction 'x': it would serve no document"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_line_error_naming_file_and_problem(tmp_path, case):
    entries, tensors, metadata, expected = BAD_FILES[case]
    path = write_raw(tmp_path / "bad.safetensors", entries, tensors, **metadata)
    with pytest.raises(VectorFileError) as error:
        load_vector_file(path)
    message = str(error.value)
    assert message.startswith(str(path) + ": ")
    assert expected in message
    assert "\n" not in message


def test_not_a_safetensors_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04pickle? no thanks")
    with pytest.raises(VectorFileError, match="junk.safetensors: not a readable safetensors file"):
        load_vector_file(junk)
    with pytest.raises(VectorFileError, match="nothere.safetensors: no such file"):
        load_vector_file(tmp_path / "nothere.safetensors")


#: The models the shipped files in vectors/ are for: file-name prefix -> (model, hidden size, layers).
SHIPPED_MODELS = {
    "smollm2-": ("HuggingFaceTB/SmolLM2-135M-Instruct", 576, 30),
    "qwen2.5-coder-0.5b-": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", 896, 24),
}
SHIPPED = sorted((Path(__file__).resolve().parents[1] / "vectors").glob("*.safetensors"))


def test_every_model_has_shipped_files():
    for prefix in SHIPPED_MODELS:
        assert any(path.name.startswith(prefix) for path in SHIPPED), prefix


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_vector_files_load_and_match_their_model(path: Path):
    (model, hidden_size, num_layers), = [spec for prefix, spec in SHIPPED_MODELS.items() if path.name.startswith(prefix)]
    vector_file = load_vector_file(path)  # every validation the runtime applies to an untrusted file
    assert (vector_file.model, vector_file.hidden_size, vector_file.num_layers) == (model, hidden_size, num_layers)
    assert vector_file.entries and all(0 <= entry.layer < num_layers for entry in vector_file.entries)
