"""``lm-eval-steer merge``: later files replace entries by name, provenance recorded, bad merges refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lm_eval_steer.cli import main
from lm_eval_steer.runtime.entrysets import member_name, set_name
from lm_eval_steer.tools.merge import merge
from lm_eval_steer.runtime.routing import resolve_strength
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, StrengthRule, VectorFileError, load_vector_file, save_vector_file, split_scale


def write(path, entries, model="tiny-llama", num_layers=4, **metadata):
    save_vector_file(path, entries, model=model, hidden_size=8, num_layers=num_layers, extra_metadata=metadata)
    return str(path)


def entry(name, fill, layer=1, instruction=None):
    return SteeringEntry(name, torch.full((8,), float(fill)), layer, "add", 1.0, "all", AppliesTo(instruction or name))


@pytest.fixture
def old_and_new(tmp_path):
    old = write(tmp_path / "old.safetensors", [entry("title", 1), entry("lowercase", 2)], builder="old build")
    new = write(tmp_path / "new.safetensors", [entry("lowercase", 3, layer=2), entry("quotation", 4)], builder="new build")
    return old, new


def test_later_file_replaces_same_name_and_keeps_the_rest(old_and_new, tmp_path):
    old, new = old_and_new
    merged, taken_from = merge([old, new], str(tmp_path / "merged.safetensors"))
    vectors = {e.name: (e.layer, e.vector[0].item()) for e in merged.entries}
    assert vectors == {"title": (1, 1.0), "lowercase": (2, 3.0), "quotation": (1, 4.0)}
    assert taken_from == {"title": old, "lowercase": new, "quotation": new}
    sources = json.loads(load_vector_file(tmp_path / "merged.safetensors").extra_metadata["merged_from"])
    assert [(s["path"], s["entries"], s["metadata"]["builder"]) for s in sources] == [(old, ["title"], "old build"), (new, ["lowercase", "quotation"], "new build")]
    assert sources[0]["sha256"] == load_vector_file(old).sha256


def test_order_decides_which_entry_wins(old_and_new, tmp_path):
    old, new = old_and_new
    merged, _ = merge([new, old], str(tmp_path / "merged.safetensors"))
    assert merged.entry("lowercase").vector[0].item() == 2.0


def test_different_model_shape_is_refused(old_and_new, tmp_path):
    old, _ = old_and_new
    other = write(tmp_path / "other.safetensors", [entry("x", 1)], num_layers=6)
    with pytest.raises(VectorFileError, match="other.safetensors: built for 6 layers, but .* has 4 layers"):
        merge([old, other], str(tmp_path / "merged.safetensors"))
    assert not (tmp_path / "merged.safetensors").exists()


def test_two_names_for_the_same_documents_are_refused_unless_stacked(old_and_new, tmp_path):
    old, _ = old_and_new
    twin = write(tmp_path / "twin.safetensors", [entry("title-v2", 5, instruction="title")])
    with pytest.raises(VectorFileError, match="'title' and 'title-v2' are routed to the same documents"):
        merge([old, twin], str(tmp_path / "merged.safetensors"))
    merged, _ = merge([old, twin], str(tmp_path / "merged.safetensors"), stack=True)
    assert {e.name for e in merged.entries} == {"title", "lowercase", "title-v2"}


def test_a_jointly_trained_set_is_merged_and_replaced_as_one_unit(old_and_new, tmp_path):
    """A set (``lowercase``, ``lowercase@L2``, ``lowercase@L3``: one instruction's vectors trained
    together) merges without --stack, and a later single ``lowercase`` removes the whole old set."""
    old, new = old_and_new
    joint = write(tmp_path / "joint.safetensors", [entry("lowercase", 5), entry("lowercase@L2", 6, layer=2, instruction="lowercase"),
                                                    entry("lowercase@L3", 7, layer=3, instruction="lowercase")])
    merged, taken_from = merge([old, joint], str(tmp_path / "a.safetensors"))
    assert {e.name: e.vector[0].item() for e in merged.entries} == {"title": 1.0, "lowercase": 5.0, "lowercase@L2": 6.0, "lowercase@L3": 7.0}
    merged, taken_from = merge([joint, new], str(tmp_path / "b.safetensors"))
    assert {e.name: (e.layer, e.vector[0].item()) for e in merged.entries} == {"lowercase": (2, 3.0), "quotation": (1, 4.0)}
    # a set still may not stack onto another name for the same documents
    stray = write(tmp_path / "stray.safetensors", [entry("lower-v2", 8, instruction="lowercase")])
    with pytest.raises(VectorFileError, match="'lowercase' and 'lower-v2' are routed to the same documents"):
        merge([joint, stray], str(tmp_path / "c.safetensors"))


@pytest.mark.parametrize(("name", "expected"), [("lowercase@L6", "lowercase"), ("keywords:existence:pie@L12", "keywords:existence:pie"),
                                                ("lowercase", "lowercase"), ("x@L", "x@L"), ("x@Lfour", "x@Lfour"), ("@L3", "@L3")])
def test_set_names_strip_only_a_layer_suffix(name, expected):
    assert set_name(name) == expected
    if expected != name:
        assert member_name(expected, int(name.rsplit("@L", 1)[1])) == name


def test_cli_merges_and_refuses_bad_input_in_one_line(old_and_new, tmp_path, capsys):
    old, new = old_and_new
    out = tmp_path / "merged.safetensors"
    assert main(["merge", old, new, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"lowercase\t<- {new}" in printed and "3 entries from 2 of 2 files" in printed
    before = (tmp_path / "old.safetensors").read_bytes()
    assert main(["merge", old, new, "--out", old]) == 2
    assert "is one of the input files" in capsys.readouterr().err
    assert (tmp_path / "old.safetensors").read_bytes() == before
    (tmp_path / "broken.safetensors").write_bytes(b"not a vector file")
    assert main(["merge", old, str(tmp_path / "broken.safetensors"), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "broken.safetensors" in error


def test_a_glob_after_hash_takes_only_the_matching_entries_of_that_file(old_and_new, tmp_path):
    old, new = old_and_new
    merged, taken_from = merge([old, f"{new}#quot*"], str(tmp_path / "merged.safetensors"))
    assert {e.name: e.layer for e in merged.entries} == {"title": 1, "lowercase": 1, "quotation": 1}
    assert taken_from["lowercase"] == old and taken_from["quotation"] == new


@pytest.mark.parametrize("suffix", ["#nothing-matches", "#"])
def test_a_glob_that_takes_nothing_is_refused_in_one_line(old_and_new, tmp_path, capsys, suffix):
    old, new = old_and_new
    assert main(["merge", old, new + suffix, "--out", str(tmp_path / "m.safetensors")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "new.safetensors" in line and not (tmp_path / "m.safetensors").exists()


def test_files_built_on_different_models_are_refused(old_and_new, tmp_path):
    """The merged file records one model, so a same-shaped file of another model is refused."""
    old, _ = old_and_new
    base = write(tmp_path / "base.safetensors", [entry("x", 1)], model="tiny-llama-base")
    with pytest.raises(VectorFileError, match="base.safetensors: built on 'tiny-llama-base', not on 'tiny-llama'"):
        merge([old, base], str(tmp_path / "merged.safetensors"))
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_packaged_file_is_named_as_vectors_show_names_it(tmp_path, capsys):
    from lm_eval_steer.core.paths import packaged_vector_files

    packaged = load_vector_file(packaged_vector_files()["smollm2-135m-instruct"])
    out = tmp_path / "lowercase.safetensors"
    merged, taken_from = merge(["smollm2-135m-instruct#change_case:*"], str(out))
    expected = [e.name for e in packaged.entries if e.name.startswith("change_case:")]
    assert [e.name for e in merged.entries] == expected and set(taken_from.values()) == {str(packaged_vector_files()["smollm2-135m-instruct"])}
    assert main(["merge", "no-such-model", "--out", str(tmp_path / "x.safetensors")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no-such-model" in error and "smollm2-135m-instruct" in error


def test_a_scaled_source_takes_its_entries_at_that_strength_and_records_the_scale(old_and_new, tmp_path, capsys):
    old, new = old_and_new
    rule = AppliesTo("number_sentences", {"relation": "less than"}, StrengthRule("num_sentences", ((2.0, 10.0), (20.0, 4.0))))
    ruled = write(tmp_path / "ruled.safetensors", [SteeringEntry("number_sentences", torch.ones(8), 2, "add", 3.0, "all", rule)])
    merged, taken_from = merge([old, f"{new}#quot**1.5", f"{ruled}*0.5"], str(tmp_path / "merged.safetensors"))
    strengths = {e.name: e.strength for e in merged.entries}
    assert strengths == {"title": 1.0, "lowercase": 1.0, "quotation": 1.5, "number_sentences": 1.5}
    assert merged.entry("number_sentences").applies_to.strength_rule.points == ((2.0, 5.0), (20.0, 2.0))
    assert torch.equal(merged.entry("quotation").vector, load_vector_file(new).entry("quotation").vector)  # the vector itself is unchanged
    assert taken_from["quotation"] == f"{new} ×1.5" and taken_from["title"] == old
    records = json.loads(merged.extra_metadata["merged_from"])
    assert [record.get("scale") for record in records] == [None, 1.5, 0.5]
    assert main(["merge", old, f"{new}*2", "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert f"lowercase\t<- {new} ×2\n" in capsys.readouterr().out
    # a number after a glob's last * is a scale: the message says so when the rest matches nothing
    with pytest.raises(VectorFileError, match=r"no entry name matches 'quot' \(the number after the last \* was read as a scale; write #GLOB\*\*SCALE"):
        merge([old, f"{new}#quot*1.5"], str(tmp_path / "m.safetensors"))


@given(strength=st.floats(-1e3, 1e3, allow_nan=False), factor=st.floats(1e-3, 1e3), count=st.floats(0, 40, allow_nan=False))
def test_a_scaled_entry_steers_as_the_scale_argument_does(strength, factor, count):
    """``entry.scaled(m)`` at ``scale=1`` gets the strength ``entry`` gets at the runtime's ``scale=m``,
    for a plain strength and for a strength rule over a document's kwarg."""
    rule = AppliesTo("number_sentences", {}, StrengthRule("num_sentences", ((2.0, strength), (20.0, -strength / 2))))
    for original in (entry("title", 1), SteeringEntry("n", torch.ones(8), 1, "add", strength, "all", rule)):
        kwargs = {"num_sentences": count}
        assert resolve_strength(original.scaled(factor), kwargs, 1.0) == pytest.approx(resolve_strength(original, kwargs, factor), rel=1e-12, abs=1e-9)


@given(source=st.text(st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), min_size=1), factor=st.floats(1e-6, 1e6))
def test_a_scale_suffix_reads_back_and_a_glob_star_is_left_alone(source, factor):
    assert split_scale(f"{source}*{factor!r}") == (source, factor)
    assert split_scale(source) == (source, None)
    assert split_scale(f"{source}#keywords:*") == (f"{source}#keywords:*", None)


@pytest.mark.parametrize("suffix", ["*0", "*-1", "*nan", "*inf"])
def test_a_scale_that_is_not_above_zero_is_refused_in_one_line(old_and_new, tmp_path, capsys, suffix):
    old, new = old_and_new
    assert main(["merge", old, new + suffix, "--out", str(tmp_path / "m.safetensors")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"new.safetensors{suffix}" in line and "finite number above 0" in line and not (tmp_path / "m.safetensors").exists()


def test_entries_that_differ_only_in_not_with_still_count_as_stacked(tmp_path):
    plain = SteeringEntry("a", torch.ones(8), 1, "add", 1.0, "all", AppliesTo("keywords:existence"))
    narrowed = SteeringEntry("b", torch.ones(8), 2, "add", 1.0, "all", AppliesTo("keywords:existence", not_with=("punctuation:no_comma",)))
    first, second = write(tmp_path / "a.safetensors", [plain]), write(tmp_path / "b.safetensors", [narrowed])
    with pytest.raises(VectorFileError, match="routed to the same documents"):
        merge([first, second], str(tmp_path / "m.safetensors"))
    merged, _ = merge([first, second], str(tmp_path / "m.safetensors"), stack=True)
    assert merged.entry("b").applies_to.not_with == ("punctuation:no_comma",)
    # a file that already stacks them merges with another without --stack: its stacking was on purpose
    other = write(tmp_path / "c.safetensors", [entry("title", 3)])
    again, _ = merge([str(tmp_path / "m.safetensors"), other], str(tmp_path / "again.safetensors"))
    assert {e.name for e in again.entries} == {"a", "b", "title"}
    with pytest.raises(VectorFileError, match="'a' and 'a2' are routed to the same documents"):
        merge([str(tmp_path / "m.safetensors"), write(tmp_path / "d.safetensors", [SteeringEntry("a2", torch.ones(8), 3, "add", 1.0, "all", AppliesTo("keywords:existence"))])], str(tmp_path / "x.safetensors"))
