"""Builder faults at the command line: unwritable outputs and bad options fail in one line before the
model loads, writes that fail name their target and leave no temporary file, and a checkpoint written
by another builder version is refused in one line under --resume."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from safetensors import SafetensorError

from lm_eval_steer.cli import main
from lm_eval_steer.core.atomic import WriteError, atomic_write, check_writable
from lm_eval_steer.runtime.vectorfile import SteeringEntry, save_vector_file

#: ``checkpoint/settings.json`` as builder version 1 (flat settings) wrote it for ``--instructions
#: punctuation:no_comma`` on the tiny model.
VERSION_1_SETTINGS = {
    "builder_version": 1, "model": "tiny", "search_model": "tiny", "instructions": ["punctuation:no_comma"], "keywords": [], "n_train": 64,
    "n_val": 8, "layers": [1, 3], "multipliers": [0.5, 1.0, 1.5], "batch_size": 8, "seed": 0, "max_new_tokens": 128, "max_repetition": 0.5,
    "allowed_degenerate": 0, "min_length_ratio": 0.5, "skip_first_token": True, "strength_base": "shift", "keyword_sample": None,
    "validation_prompts": "without instruction",
    "degeneracy_guard": "degenerate = repetition (1 - distinct 4-grams / 4-grams) > 0.5; a candidate with more than (unsteered count + 0) "
    "degenerate outputs is disqualified, and so is one whose mean answer length is below 0.5 x the unsteered mean (length instructions excepted)",
    "data_sha256": "076204e5c0c6dbf7c8abf4c940001eddf3d9b46bce6b1f2bac12eaa151690048", "method": "both", "learned_layers": [1],
    "learned_multipliers": [1.0], "learned_steps": 40, "learned_lr": 0.08, "learned_batch_size": 4, "learned_l2": 0.0, "target_samples": 4,
    "target_max_tokens": 128, "token_multipliers": [0.1, 0.2, 0.3], "stop_after_keyword": True,
}  # fmt: skip



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


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--min-length-ratio", "1.5"), ("--min-length-ratio", "nan"), ("--learned-steps", "0"), ("--learned-fluency", "-1"),
        ("--learned-fluency", "nan"),
    ],
)  # fmt: skip
def test_bad_build_options_fail_before_the_model_loads(tmp_path, capsys, flag, value):
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the options were checked")):
        assert main(["build", "--model_args", "pretrained=/x", "--instructions", "format", "--out", str(tmp_path / "v.safetensors"), f"{flag}={value}"]) == 2
    assert flag in one_error_line(capsys)


@pytest.mark.parametrize(("flag", "value", "named"), [("--layers", "1,9", "--layers [9]"), ("--learned-layers", "4", "--learned-layers [4]")])
def test_layers_outside_the_model_fail_before_its_weights_load(tiny_model_dir, tmp_path, capsys, flag, value, named):
    # The tiny model has 4 layers; its config.json says so, and that is all the check may read.
    with mock.patch("vector_builder.cli.load_model", side_effect=AssertionError("model loaded before the layers were checked")):
        assert main(["build", "--model_args", f"pretrained={tiny_model_dir}", "--instructions", "format", "--method", "both",
                     "--out", str(tmp_path / "v.safetensors"), "--report", str(tmp_path / "r"), flag, value]) == 2  # fmt: skip
    assert f"{named} out of range for a 4-layer model (0..3)" in one_error_line(capsys)
    assert not (tmp_path / "v.safetensors").exists()


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


def test_a_checkpoint_written_by_builder_version_1_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    settings_json = tmp_path / "rep" / "checkpoint" / "settings.json"
    settings_json.parent.mkdir(parents=True)
    settings_json.write_text(json.dumps({"settings": VERSION_1_SETTINGS}))
    model_args = f"pretrained={tiny_model_dir},dtype=float32,device=cpu,name=tiny"
    command = ["build", "--model_args", model_args, "--instructions", "punctuation:no_comma", "--out", str(tmp_path / "v.safetensors")]
    assert main([*command, "--report", str(tmp_path / "rep"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the model's loading progress, then the error
    assert [line for line in err if "error" in line] == err[-1:] and err[-1].startswith("lm-eval-steer build: error: ")
    assert f"{settings_json}: written by builder version 1" in err[-1] and "rebuild without --resume" in err[-1]
    assert json.loads(settings_json.read_text()) == {"settings": VERSION_1_SETTINGS}  # left as it was
