"""Builder faults in the checkpoint and the report: damaged checkpoint files name their file, other
settings or another builder version are refused under --resume, killed writes leave nothing behind,
report.json is strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from lm_eval_steer.core.atomic import remove_leftovers, write_json
from vector_builder.report import Checkpoint, CheckpointError, finite_json, write_report

SETTINGS = {"model": "tiny", "seed": 0}


@pytest.mark.parametrize(
    ("name", "content"),
    [("settings.json", "{not json"), ("settings.json", "[1, 2]"), ("settings.json", "{\"settings\": [1]}"), ("sums.safetensors", "garbage"), ("targets/t.json", "{\"name\": 1}"), ("learned/d.safetensors", "")],
)
def test_damaged_checkpoint_file_names_the_file(tmp_path, name, content):
    Checkpoint(tmp_path, SETTINGS, resume=False)
    damaged = tmp_path / "checkpoint" / name
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_text(content)
    with pytest.raises(CheckpointError, match=f"{damaged}: damaged checkpoint file"):
        checkpoint = Checkpoint(tmp_path, SETTINGS, resume=True)
        checkpoint.load_sums()
        checkpoint.load_targets()
        checkpoint.load_learned()


def test_other_settings_are_still_refused_under_resume(tmp_path):
    Checkpoint(tmp_path, SETTINGS, resume=False)
    with pytest.raises(CheckpointError, match="other settings"):
        Checkpoint(tmp_path, {**SETTINGS, "seed": 1}, resume=True)


def test_a_checkpoint_from_before_a_setting_was_added_resumes_only_at_its_as_before_value(tmp_path):
    current = {**SETTINGS, "search": {"layers": [1], "start_after_tokens": [], "stop_once_followed": False}, "targets": {"samples": 4, "max_repetition": None}}
    older = {**SETTINGS, "search": {"layers": [1]}, "targets": {"samples": 4}}
    Checkpoint(tmp_path, older, resume=False)
    Checkpoint(tmp_path, current, resume=True)  # the missing settings were their as-before values
    for changed in (
        {"search": {"layers": [1], "start_after_tokens": [4], "stop_once_followed": False}},
        {"search": {"layers": [1], "start_after_tokens": [], "stop_once_followed": True}},  # a stop rule changes what is generated
        {"targets": {"samples": 4, "max_repetition": 0.5}},
    ):
        with pytest.raises(CheckpointError, match="other settings"):
            Checkpoint(tmp_path, {**current, **changed}, resume=True)


def test_a_checkpoint_of_another_builder_version_is_refused_in_one_line(tmp_path):
    Checkpoint(tmp_path, {"builder_version": 1, **SETTINGS}, resume=False)
    with pytest.raises(CheckpointError, match=r"settings\.json: written by builder version 1, .*rebuild without --resume") as error:
        Checkpoint(tmp_path, {"builder_version": 2, **SETTINGS}, resume=True)
    assert "\n" not in str(error.value)


def test_resume_removes_the_temp_files_of_a_killed_run(tmp_path):
    Checkpoint(tmp_path, SETTINGS, resume=False)
    leftovers = [tmp_path / ".report.json.abc.tmp", tmp_path / "checkpoint" / ".sums.safetensors.x1.tmp", tmp_path / "checkpoint" / "targets" / ".t.json.y.tmp"]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text("half")
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    Checkpoint(tmp_path, SETTINGS, resume=True)
    assert not any(leftover.exists() for leftover in leftovers)
    assert keep.exists()
    other = tmp_path / ".other.safetensors.z.tmp"
    other.write_text("")
    assert remove_leftovers(tmp_path, "v.safetensors") == [] and other.exists()


def test_report_json_is_strict_json(tmp_path):
    payload = {"loss": [1.0, math.nan, math.inf], "nested": {"x": -math.inf, "ok": 2.5}, "tuple": (1, math.nan)}
    path = write_report(tmp_path, payload)
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json")) == {
        "loss": [1.0, None, None], "nested": {"x": None, "ok": 2.5}, "tuple": [1, None]
    }
    assert finite_json({"a": 1}) == {"a": 1}
    write_json(tmp_path / "plain.json", {"a": 1.5})  # other writers unchanged
