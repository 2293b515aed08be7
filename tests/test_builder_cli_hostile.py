"""Builder faults: unwritable outputs fail before the build, damaged checkpoints name their file,
killed writes leave nothing behind under --resume, report.json is strict JSON, writes name the target."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from safetensors import SafetensorError

from lm_eval_steer.core.atomic import WriteError, atomic_write, check_writable, remove_leftovers, write_json
from lm_eval_steer.cli import main
from lm_eval_steer.runtime.vectorfile import SteeringEntry, save_vector_file
from vector_builder.report import Checkpoint, CheckpointError, finite_json, write_report

SETTINGS = {"model": "tiny", "seed": 0}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lm-eval-steer build: error: "), err
    return err[0]


@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_unwritable_outputs_fail_before_the_model_loads(tmp_path, capsys, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    paths = {"--out": str(tmp_path / "v.safetensors"), "--report": str(tmp_path / "build")}
    paths[flag] = str(blocker / "below")
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before outputs were checked")):
        assert main(["build", "--model_args", "pretrained=/no/model", "--instructions", "format", "--out", paths["--out"], "--report", paths["--report"]]) == 2
    assert "a parent path is a file" in one_error_line(capsys)


def test_out_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(WriteError, match="is a directory"):
        check_writable(tmp_path)


@pytest.mark.parametrize("model_args", ["pretrained=/no/such/model", "name=x", "pretrained=/tmp,dtype=float8"])
def test_bad_model_args_are_one_line(tmp_path, capsys, model_args):
    assert main(["build", "--model_args", model_args, "--instructions", "format", "--out", str(tmp_path / "v.safetensors"), "--report", str(tmp_path / "r")]) == 2
    assert "--model_args" in one_error_line(capsys)


@pytest.mark.parametrize("value", ["nan,1", "1,inf", "-inf", ""])
def test_non_finite_multipliers_are_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--model_args", "pretrained=/x", "--instructions", "format", "--out", str(tmp_path / "v.safetensors"), "--multipliers", value])
    assert exit_.value.code == 2
    assert "--multipliers" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--min-length-ratio", "1.5"), ("--min-length-ratio", "nan"), ("--learned-steps", "0")])
def test_bad_build_options_fail_before_the_model_loads(tmp_path, capsys, flag, value):
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the options were checked")):
        assert main(["build", "--model_args", "pretrained=/x", "--instructions", "format", "--out", str(tmp_path / "v.safetensors"), f"{flag}={value}"]) == 2
    assert flag in one_error_line(capsys)


def test_disk_full_names_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "v.safetensors"
    entries = [SteeringEntry("v", torch.ones(8), 1, "add", 1.0)]
    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    with mock.patch("lm_eval_steer.runtime.vectorfile.save_file", side_effect=full), pytest.raises(WriteError) as error:
        save_vector_file(target, entries, model="tiny", hidden_size=8, num_layers=4)
    assert str(error.value).startswith(f"{target}: cannot be written") and "No space left" in str(error.value)
    assert ".tmp" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_os_errors_inside_a_write_name_the_target(tmp_path):
    def write(temp: str) -> None:
        raise PermissionError(13, "Permission denied", temp)

    with pytest.raises(WriteError, match=r"x\.json: cannot be written \(Permission denied\)") as error:
        atomic_write(tmp_path / "x.json", write)
    assert ".tmp" not in str(error.value)


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
