"""Hostile vector files: the loader never crashes, never accepts what it cannot apply, never echoes
megabytes, and tells a FIFO, a directory or a device from a missing file."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lm_eval_steer.runtime.vectorfile import FLOAT32_MAX, FORMAT_VERSION, MAX_HEADER_BYTES, VectorFileError, load_vector_file

HIDDEN, LAYERS = 8, 4


def entry(**changes) -> dict:
    return {"name": "v", "layer": 1, "mode": "add", "strength": 1.0, "positions": "all", **changes}


def write(path, entries, tensors=None, **metadata):
    meta = {"format": FORMAT_VERSION, "model": "tiny", "hidden_size": str(HIDDEN), "num_layers": str(LAYERS)}
    meta["entries"] = entries if isinstance(entries, str) else json.dumps(entries)
    meta.update(metadata)
    save_file(tensors if tensors is not None else {"v": torch.ones(HIDDEN)}, str(path), metadata=meta)
    return path


def refused(path, expected: str) -> str:
    with pytest.raises(VectorFileError) as error:
        load_vector_file(path)
    message = str(error.value)
    assert expected in message and len(message) < 1000 and "\n" not in message
    return message


NESTED = [1]
for _ in range(30):
    NESTED = [NESTED]

HOSTILE = {
    "strength 1e39 (finite in float64, not float32)": ([entry(strength=1e39)], None, "finite number in float32"),
    "strength 10**400 as a JSON integer": ('[{"name": "v", "layer": 1, "mode": "add", "strength": 1' + "0" * 400 + ', "positions": "all"}]', None, "integer of about 400 digits"),
    "strength 1e400 (inf)": ('[{"name": "v", "layer": 1, "mode": "add", "strength": 1e400, "positions": "all"}]', None, "finite number"),
    "layer with 5000 digits": ('[{"name": "v", "layer": 1' + "0" * 5000 + ', "mode": "add", "strength": 1, "positions": "all"}]', None, "not valid JSON"),
    "layer 1.5": ([entry(layer=1.5)], None, "layer must be an integer"),
    "layer true": ([entry(layer=True)], None, "layer must be an integer"),
    "name a list": ([entry(name=["v"])], None, "valid 'name'"),
    "name an object": ([entry(name={"v": 1})], None, "valid 'name'"),
    "mode a list": ([entry(mode=["add"])], None, "unknown mode"),
    "rule point 1e39": ([entry(applies_to={"instruction_id": "x", "strength_rule": {"kwarg": "n", "points": [[1, 1e39]]}})], None, "strength_rule strength"),
    "rule x 10**400": ('[{"name": "v", "layer": 1, "mode": "add", "strength": 1, "positions": "all", "applies_to": {"instruction_id": "x", "strength_rule": {"kwarg": "n", "points": [[1' + "0" * 400 + ', 1]]}}}]', None, "strength_rule x"),
    "deep kwargs": ([entry(applies_to={"instruction_id": "x", "kwargs": {"k": NESTED}})], None, "nested more than"),
    "100000-deep entries": ("[" * 100_000 + "]" * 100_000, None, "nested more than"),
    "project with elements 1e19 (norm overflows)": ([entry(mode="project")], {"v": torch.full((HIDDEN,), 1e19)}, "norm overflows"),
    "ablate with elements 1e-30 (norm underflows)": ([entry(mode="ablate")], {"v": torch.full((HIDDEN,), 1e-30)}, "zero vector"),
    "float64 elements beyond float32": ([entry()], {"v": torch.full((HIDDEN,), 1e300, dtype=torch.float64)}, "NaN or infinite"),
    "add overflows after strength": ([entry(strength=1e30)], {"v": torch.full((HIDDEN,), 1e10)}, "overflows float32"),
    "huge tensor": ([entry()], {"v": torch.ones(100_000)}, "does not match hidden_size"),
    "5 MB mode string": ([entry(mode="x" * 5_000_000)], None, "unknown mode"),
    "hidden_size with 3000 digits": ([entry()], None, "hidden_size must be an integer"),
    **{
        f"applies_to.kwargs {value!r}": ([entry(applies_to={"instruction_id": "x", "kwargs": value})], None, f"entry 'v': applies_to.kwargs must be a JSON object or null, got {value!r}")
        for value in ("", 0, False, [], "a", ["k"], 1.5)
    },
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_with_a_short_line(tmp_path, case):
    entries, tensors, expected = HOSTILE[case]
    extra = {"hidden_size": "9" * 3000} if case.startswith("hidden_size") else {}
    refused(write(tmp_path / "bad.safetensors", entries, tensors, **extra), expected)


def test_header_over_the_cap_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.safetensors"
    header = json.dumps({"__metadata__": {"format": FORMAT_VERSION, "entries": " " * (MAX_HEADER_BYTES + 10)}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refused(path, "exceeds the 8 MiB limit")


def test_special_files_are_named_for_what_they_are(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "is a FIFO")
    refused(tmp_path, "is a directory")
    if os.path.exists("/dev/zero"):
        refused("/dev/zero", "is a character device")
    refused(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    refused(tmp_path / "short.safetensors", "not a readable safetensors file")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
APPLIES_TO = st.fixed_dictionaries(
    {"instruction_id": st.just("change_case:english_lowercase") | JSON_VALUES},
    optional={"kwargs": JSON_VALUES, "strength_rule": st.none() | JSON_VALUES},
)
FIELDS = {"name": st.just("v") | JSON_VALUES, "layer": st.integers(-2, 6) | JSON_VALUES, "mode": st.sampled_from(["add", "project", "ablate"]) | JSON_VALUES,
          "strength": st.floats(allow_nan=True, allow_infinity=True) | JSON_VALUES, "positions": st.sampled_from(["all", "prompt", "generated"]) | JSON_VALUES,
          "applies_to": st.none() | APPLIES_TO | JSON_VALUES, "stop_after": st.lists(st.text(max_size=8), max_size=3) | JSON_VALUES}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    raw=st.fixed_dictionaries({}, optional=FIELDS),
    vector=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=HIDDEN, max_size=HIDDEN),
)
def test_any_entry_is_loaded_applicable_or_refused_cleanly(tmp_path, raw, vector):
    """Property: for any entry JSON and any float64 vector, the loader either refuses with a short
    VectorFileError, or returns an entry that steering can apply in float32."""
    path = write(tmp_path / "p.safetensors", [raw], {"v": torch.tensor(vector, dtype=torch.float64)})
    try:
        loaded = load_vector_file(path)
    except VectorFileError as error:
        assert len(str(error)) < 1000
        return
    (item,) = loaded.entries
    assert isinstance(item.name, str) and isinstance(item.layer, int) and not isinstance(item.layer, bool) and 0 <= item.layer < LAYERS
    assert math.isfinite(item.strength) and abs(item.strength) <= FLOAT32_MAX
    assert item.vector.dtype == torch.float32 and torch.isfinite(item.vector).all()
    assert isinstance(item.stop_after, tuple) and all(isinstance(text, str) and text.strip() for text in item.stop_after)
    assert_applies_to_kept(raw.get("applies_to"), item)
    if item.mode == "add":
        assert torch.isfinite(item.strength * item.vector).all()
    else:
        norm = float(item.vector.norm())
        assert math.isfinite(norm) and norm > 0


def assert_applies_to_kept(given, item) -> None:
    """An accepted ``applies_to`` is what the file says; its ``kwargs`` was a JSON object, or absent/null."""
    if given is None:
        assert item.applies_to is None
        return
    assert isinstance(given, dict) and item.applies_to.instruction_id == given["instruction_id"]
    kwargs = given.get("kwargs")
    assert kwargs is None or isinstance(kwargs, dict), f"kwargs {kwargs!r} was accepted"
    assert json.dumps(dict(item.applies_to.kwargs), sort_keys=True) == json.dumps(kwargs or {}, sort_keys=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(applies_to=st.none() | APPLIES_TO | JSON_VALUES)
def test_any_applies_to_is_kept_as_written_or_refused_cleanly(tmp_path, applies_to):
    """Property: on an otherwise valid entry, any ``applies_to`` (in particular any ``kwargs``: "",
    0, false, [] are not "no filter") is loaded exactly as written or refused in one short line."""
    path = write(tmp_path / "a.safetensors", [entry(applies_to=applies_to)])
    try:
        loaded = load_vector_file(path)
    except VectorFileError as error:
        assert len(str(error)) < 1000 and "\n" not in str(error) and f"{path}: " in str(error)
        return
    assert_applies_to_kept(applies_to, loaded.entries[0])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(tmp_path, data):
    path = tmp_path / "r.safetensors"
    path.write_bytes(data)
    with pytest.raises(VectorFileError):
        load_vector_file(path)
